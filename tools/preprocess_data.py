#!/usr/bin/env python
"""Tokenize JSONL / plain-text files into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx).

    python tools/preprocess_data.py --input data/shakespeare.jsonl --tokenizer-model data/tok.model \\
        --output-prefix data/shakespeare --workers 2

Documents: one per JSONL line (text under --json-key); a plain-text file is one document (a book,
a play) unless --split-text-on-blank-lines. Every document is followed by the tokenizer's EOD id
(what Megatron's GPTDataset resets masks/positions on) unless --no-append-eod. Empty documents
are skipped and counted.

Atomicity: the pair is written under temporary names in the output directory, checked with
`verify_indexed_dataset`, and renamed to PREFIX.bin then PREFIX.idx (any old PREFIX.idx is removed
first). So a failed or killed run leaves either the old pair, or a lone .bin, or nothing, never a
.bin/.idx pair that looks valid but is not.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from rf_megatron.indexed_data import (  # noqa: E402
    DataError, check_input_file, is_jsonl, iter_documents, starts_with_a_json_object, token_dtype,
    verify_indexed_dataset, write_tokenizer_record)
from rf_megatron.tokenizer import SentencePieceTokenizer, TokenizerError  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", action="extend", required=True, metavar="FILE",
                   help=".jsonl/.json (one document per line) and/or plain-text files")
    p.add_argument("--json-key", default="text", help="JSONL field holding the document text")
    p.add_argument("--split-text-on-blank-lines", action="store_true",
                   help="plain text: every blank-line-separated block is a document "
                        "(default: the whole file is one document)")
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model file")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="append the EOD token after every document")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--chunk-size", type=int, default=8, help="documents per task sent to a worker")
    p.add_argument("--log-interval", type=float, default=5.0,
                   help="seconds between progress lines on stderr")
    return p.parse_args(argv)


# ---- tokenization, in this process (--workers 1) or in pool workers (state set by _init) --------
_STATE = {}


def _init(tokenizer: SentencePieceTokenizer, append_eod: bool, dtype, in_worker: bool = True) -> None:
    if in_worker:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C, terminates us
    _STATE.update(tokenizer=tokenizer, append_eod=append_eod, dtype=dtype)


def _encode(text: str):
    """Token ids (+ EOD) as an array of the dataset dtype; None for an empty document."""
    if not text.strip():
        return None
    ids = _STATE["tokenizer"].tokenize(text)
    if _STATE["append_eod"]:
        ids.append(_STATE["tokenizer"].eod)
    return np.asarray(ids, dtype=_STATE["dtype"]) if ids else None


# ---- the run -----------------------------------------------------------------------------------
class Progress:
    """Counts documents/tokens; prints to stderr at most every `interval` seconds."""

    def __init__(self, interval: float):
        self.interval, self.docs, self.tokens, self.skipped = interval, 0, 0, 0
        self.start = self.last = time.perf_counter()

    def rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def add(self, n_tokens: int) -> None:
        self.docs += 1
        self.tokens += n_tokens
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            print(f"progress: {self.docs:,} documents, {self.tokens:,} tokens, "
                  f"{self.rate():,.0f} tokens/s", file=sys.stderr, flush=True)


def documents(args):
    """Document texts from all inputs, in order."""
    for path in args.input:
        for text, _ in iter_documents(path, args.json_key, args.split_text_on_blank_lines):
            yield text


def tokenized(args, tokenizer, dtype):
    """Token arrays (None for empty documents) in input order. `Pool.imap` keeps the order; it
    pulls documents in its feeder thread (bounded by the pipe to the workers), and a DataError
    raised while reading re-surfaces here, at that document's place in the sequence."""
    if args.workers == 1:
        _init(tokenizer, args.append_eod, dtype, in_worker=False)
        yield from map(_encode, documents(args))
        return
    # spawned, not forked: this process has native threads (numpy's BLAS pool; torch, imported for the builder) and
    # a SIGTERM handler, and a forked worker can inherit a lock one of them held: once, under load, a worker sat in a
    # futex wait after the last document and the pool's shutdown waited for it forever
    pool = multiprocessing.get_context("spawn").Pool(args.workers, _init, (tokenizer, args.append_eod, dtype))
    with pool:
        yield from pool.imap(_encode, documents(args), chunksize=args.chunk_size)


def write_dataset(args, tokenizer) -> Progress:
    """Tokenize everything into temporary files, verify them, then rename into place."""
    with warnings.catch_warnings():  # megatron warns about missing TE/Apex at import: noise here
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    dtype = token_dtype(tokenizer.vocab_size)
    prefix = os.path.abspath(args.output_prefix)
    out_dir, base = os.path.split(prefix)
    made_dir = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{base}.tmp-{os.getpid()}")
    progress = Progress(args.log_interval)
    builder = None
    ok = False
    try:
        builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
        with contextlib.closing(tokenized(args, tokenizer, dtype)) as arrays:  # closes the pool
            for ids in arrays:
                if ids is None:
                    progress.skipped += 1
                    continue
                builder.add_document(ids, [ids.size])
                progress.add(ids.size)
        if not progress.docs:
            raise DataError("no documents: every input document is empty")
        builder.finalize(tmp + ".idx")
        for suffix in (".bin", ".idx"):
            with open(tmp + suffix, "rb+") as f:
                os.fsync(f.fileno())  # data on disk before the rename makes it official
        verify_indexed_dataset(tmp)
        write_tokenizer_record(prefix, tokenizer)  # which tokenizer made the pair (training refuses another)
        if os.path.exists(prefix + ".idx"):
            os.remove(prefix + ".idx")
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
        ok = True
    finally:
        if builder is not None and not builder.data_file.closed:
            builder.data_file.close()
        for suffix in (".bin", ".idx"):
            if os.path.exists(tmp + suffix):
                os.remove(tmp + suffix)
        if not ok and made_dir and not os.listdir(out_dir):
            os.rmdir(out_dir)  # failed: leave the file system as we found it
    return progress


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and "error: ..."
        return int(e.code or 0)
    try:
        if args.workers < 1:
            raise DataError(f"--workers {args.workers}: must be at least 1")
        if args.chunk_size < 1:
            raise DataError(f"--chunk-size {args.chunk_size}: must be at least 1")
        if os.path.isdir(args.output_prefix):
            raise DataError(f"--output-prefix {args.output_prefix}: is a directory; give e.g. "
                            f"{os.path.join(args.output_prefix, 'data')}")
        for path in args.input:  # fail in milliseconds, not after the 5 s megatron import
            check_input_file(path)
            if not is_jsonl(path) and starts_with_a_json_object(path):
                how = "a document per blank-line block" if args.split_text_on_blank_lines else "one document"
                print(f"note: {path} is read as plain text ({how}), but its first line is a JSON object: name it "
                      ".jsonl to read a document per line", file=sys.stderr)
        tokenizer = SentencePieceTokenizer(args.tokenizer_model)
        progress = write_dataset(args, tokenizer)
    except (DataError, TokenizerError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if progress.skipped:
        print(f"skipped {progress.skipped:,} empty documents", file=sys.stderr)
    print(f"done: {progress.docs:,} documents, {progress.tokens:,} tokens, "
          f"{progress.rate():,.0f} tokens/s -> {args.output_prefix}", flush=True)
    return 0


if __name__ == "__main__":
    # SIGTERM (scancel, timeout) -> SystemExit, so the temporary files are cleaned up.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())

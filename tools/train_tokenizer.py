#!/usr/bin/env python
"""Train a SentencePiece tokenizer for rf-megatron from plain-text and/or JSONL files.

    python tools/train_tokenizer.py --input data/shakespeare.jsonl --vocab-size 8000 \\
        --output-prefix data/tok      # -> data/tok.model, data/tok.vocab

Why these settings:
* ids are fixed (pad=0, unk=1, bos=2, eos=3) so every model trained here agrees on the special
  ids Megatron's GPT dataset looks at (`eod` = eos, `pad` never occurs in data);
* byte fallback (on by default) means no text is ever mapped to <unk>: unseen characters,
  including the newline that SentencePiece never sees during line-based training, become bytes;
* the "identity" normalization and kept whitespace make detokenize(tokenize(text)) == text.
Every input line (every line of every JSONL document) is one training sentence; `--max-sentences`
caps them by seeded reservoir sampling. Both output files appear only when training succeeded.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from rf_megatron.indexed_data import (  # noqa: E402
    DataError, check_input_file, is_jsonl, iter_jsonl_texts, read_text_lines)

SPECIAL_PIECES = {"pad": (0, "<pad>"), "unk": (1, "<unk>"), "bos": (2, "<s>"), "eos": (3, "</s>")}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", action="extend", required=True, metavar="FILE",
                   help="text files (every line a sentence) and/or .jsonl/.json files")
    p.add_argument("--json-key", default="text", help="JSONL field holding the text")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="encode characters outside the vocabulary as UTF-8 bytes instead of <unk>")
    p.add_argument("--special-tokens", nargs="+", action="extend", default=[], metavar="TOKEN",
                   help="user-defined symbols, always one piece each (ids 4, 5, ...)")
    p.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="train on a seeded random sample of at most this many lines")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--seed", type=int, default=1234, help="seed for --max-sentences sampling")
    p.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--verbose", action="store_true", help="show SentencePiece's own log")
    return p.parse_args(argv)


def check_args(args) -> None:
    if args.vocab_size < 8:
        raise DataError(f"--vocab-size {args.vocab_size}: must be at least 8")
    if args.max_sentences < 1:
        raise DataError(f"--max-sentences {args.max_sentences}: must be at least 1")
    reserved = {piece for _, piece in SPECIAL_PIECES.values()}
    for tok in args.special_tokens:
        if not tok.strip() or tok in reserved or any(c in tok for c in "\n\t"):
            raise DataError(f"--special-tokens {tok!r}: empty, reserved ({', '.join(sorted(reserved))}) "
                            "or containing a tab/newline")
    if len(set(args.special_tokens)) != len(args.special_tokens):
        raise DataError("--special-tokens: duplicate token")
    for path in args.input:
        check_input_file(path)
    if os.path.isdir(args.output_prefix):
        raise DataError(f"--output-prefix {args.output_prefix}: is a directory; give e.g. "
                        f"{os.path.join(args.output_prefix, 'tokenizer')}")


def file_sentences(path: str, json_key: str):
    """Non-blank lines of one input file (JSONL documents are split into their lines)."""
    if is_jsonl(path):
        for text, _ in iter_jsonl_texts(path, json_key):
            yield from (line for line in text.splitlines() if line.strip())
    else:
        yield from read_text_lines(path)


def sample_sentences(args):
    """Read every input; return (sampled sentences, total lines). Reservoir keeps memory bounded."""
    rng = random.Random(args.seed)
    sample, total, chars = [], 0, 0
    for path in args.input:
        for line in file_sentences(path, args.json_key):
            if total < args.max_sentences:
                sample.append(line)
            else:
                j = rng.randrange(total + 1)
                if j < args.max_sentences:
                    sample[j] = line
            total += 1
            chars += len(line)
    # one line for the whole corpus (a corpus of 141 files is not 141 lines of output)
    what = args.input[0] if len(args.input) == 1 else f"{len(args.input):,} files ({args.input[0]}, ...)"
    print(f"read {what}: {total:,} lines, {chars:,} characters", flush=True)
    if not total:
        raise DataError("empty corpus: the inputs contain no text")
    if total > len(sample):
        print(f"sampled {len(sample):,} of {total:,} lines (--max-sentences)", flush=True)
    return sample, total


def train(args, sentences, model_prefix: str) -> None:
    import sentencepiece as spm

    special = {f"{name}_id": i for name, (i, _) in SPECIAL_PIECES.items()}
    special.update({f"{name}_piece": piece for name, (_, piece) in SPECIAL_PIECES.items()})
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_prefix=model_prefix,
            vocab_size=args.vocab_size, model_type=args.model_type,
            byte_fallback=args.byte_fallback, user_defined_symbols=args.special_tokens,
            character_coverage=args.character_coverage, num_threads=args.num_threads,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            max_sentence_length=1 << 16, minloglevel=0 if args.verbose else 2, **special)
    except RuntimeError as e:  # "INTERNAL: src/x.cc(744) [check] Vocabulary size too high ..."
        message = str(e).split('] ')[-1].strip()
        # its advice names its own options ("vocab_size", "--character_coverage"): name ours
        message = (message.replace(" with --character_coverage option", "")
                   .replace("character_coverage", f"--character-coverage (now {args.character_coverage:g})")
                   .replace("vocab_size", "--vocab-size"))
        raise DataError(f"sentencepiece: {message}") from None


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and "error: ..."
        return int(e.code or 0)
    tmpdir = made_dir = None
    try:
        check_args(args)
        sentences, _ = sample_sentences(args)
        out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
        if not os.path.isdir(out_dir):
            os.makedirs(out_dir)
            made_dir = out_dir
        tmpdir = tempfile.mkdtemp(prefix=".train_tokenizer-", dir=out_dir)
        chars = sum(map(len, sentences))
        print(f"training {args.model_type} tokenizer: vocab {args.vocab_size:,}, "
              f"{len(sentences):,} sentences, {chars:,} characters, "
              f"byte fallback {'on' if args.byte_fallback else 'off'}", flush=True)
        t0 = time.perf_counter()
        train(args, sentences, os.path.join(tmpdir, "tok"))
        seconds = time.perf_counter() - t0
        # Old .model first: an interrupted swap leaves no .model rather than a mismatched pair.
        model, vocab = args.output_prefix + ".model", args.output_prefix + ".vocab"
        if os.path.exists(model):
            os.remove(model)
        os.replace(os.path.join(tmpdir, "tok.vocab"), vocab)
        os.replace(os.path.join(tmpdir, "tok.model"), model)
        print(f"wrote {model} and {vocab} ({args.vocab_size:,} pieces) in {seconds:.1f} s", flush=True)
        return 0
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
        if made_dir and not os.listdir(made_dir):  # failed: leave the file system as we found it
            os.rmdir(made_dir)


if __name__ == "__main__":
    sys.exit(main())

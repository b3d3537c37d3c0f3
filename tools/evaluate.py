#!/usr/bin/env python
"""Evaluate an exported Hugging Face folder: lm-evaluation-harness tasks and/or held-out perplexity.

    python tools/evaluate.py hf/x --tasks hellaswag,arc_easy                 # lm-eval's hf backend, batch size auto
    python tools/evaluate.py hf/x --tasks my_task --include-path my_tasks/   # your own task YAML files
    python tools/evaluate.py hf/x --perplexity data/x_text_document --split 949,50,1   # the held-out documents
    python tools/evaluate.py hf/x --perplexity notes.txt                     # any text or JSONL file

The folder is what tools/convert_checkpoint_to_hf.py writes (vanilla: Llama; resformer/svformer: RFGPT, loaded
with trust_remote_code). Results go to FOLDER/eval/ (or --output): results.json and samples_TASK.jsonl from the
harness, perplexity.json. `--split` cuts an indexed dataset by documents exactly as training's data.split did, so
`--part valid` scores only documents the model never trained on; a dataset the model trained on is cut by its
run's own data.split when `--split` is not given (a note says so). Exit 2 with one line on bad input.
Needs `pip install 'rf-megatron[eval]'` for --tasks (lm-eval downloads public task data unless HF_HUB_OFFLINE=1).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from rf_megatron.hf.cli import HelpWithDefaults  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=HelpWithDefaults)
    p.add_argument("folder", help="exported Hugging Face folder")
    p.add_argument("--tasks", help="comma-separated lm-eval task names")
    p.add_argument("--include-path", help="a directory of extra lm-eval task YAML files")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--limit", type=float, help="examples per task (a fraction if < 1)")
    p.add_argument("--batch-size", default="auto", help="'auto', 'auto:N' or an integer")
    p.add_argument("--perplexity", metavar="DATA", help="indexed dataset prefix, or a text/JSONL file")
    p.add_argument("--split", help="train,valid,test weights of the indexed dataset (as data.split)")
    p.add_argument("--part", choices=("train", "valid", "test"), default="valid", help="which split --split scores")
    p.add_argument("--seq-length", type=int, help="perplexity window (default: the model's context)")
    p.add_argument("--max-tokens", type=int, help="score at most this many tokens")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--output", help="results folder (default: FOLDER/eval)")
    args = p.parse_args(argv)
    if not args.tasks and not args.perplexity:
        p.error("give --tasks, --perplexity or both")
    return args


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _split(text):
    from rf_megatron.hf.evaluate import EvaluationError

    try:
        weights = [float(w) for w in text.replace("/", ",").split(",")]
    except ValueError:
        raise EvaluationError(f"--split {text}: expected weights like 949,50,1") from None
    if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
        raise EvaluationError(f"--split {text}: expected three non-negative weights like 949,50,1")
    return weights


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    from rf_megatron.hf import evaluate as ev

    try:
        folder = ev.check_folder(args.folder)
        out = Path(args.output) if args.output else folder / "eval"
        if args.perplexity:
            split = _split(args.split) if args.split else None
            stem = ev.indexed_prefix(args.perplexity, split)  # a wrong path fails before the model loads
            trained_split = ev.training_split(folder, stem) if stem else None
            trained_weights = _split(trained_split) if trained_split else None
            if trained_split and not split:
                said = f"note: {args.perplexity} is this model's training data (data.paths of its run config)"
                if trained_weights[ev.SPLIT_PARTS.index(args.part)] > 0:
                    args.split, split = trained_split, trained_weights
                    unseen = ", the documents it did not train on" if args.part != "train" else ""
                    print(f"{said}: scoring the {args.part} part of its data.split {trained_split}{unseen} "
                          "(--split 100,0,0 --part train: all of it)", flush=True)
                else:  # its split held nothing of this dataset out
                    print(f"{said}, all of it (data.split {trained_split}): a score of documents it trained on",
                          flush=True)
            elif trained_split and split != trained_weights and args.part != "train":
                print(f"note: this model trained with data.split {trained_split}: --split {args.split} cuts "
                      "differently, so part of what it scores was trained on", flush=True)
            model, tokenizer = ev.load_model(folder, args.dtype, args.device)
            ids, n_bytes = ev.tokens_of(args.perplexity, tokenizer, split, args.part)
            seq = args.seq_length or model.config.max_position_embeddings
            if seq > model.config.max_position_embeddings:
                print(f"note: --seq-length {seq} is beyond the {model.config.max_position_embeddings} positions the "
                      "model trained with: a score of positions it never saw", flush=True)
            print(f"perplexity: {len(ids):,} tokens of {args.perplexity}"
                  f"{f' ({args.part} of {args.split})' if split else ''}, windows of {seq}", flush=True)
            result = ev.perplexity(model, ids, seq_length=seq, max_tokens=args.max_tokens)
            if n_bytes and not args.max_tokens:
                result["bits_per_byte"] = result["nll_sum"] / math.log(2) / n_bytes
            result.update(source=str(args.perplexity), split=args.split, part=args.part if split else None)
            out.mkdir(parents=True, exist_ok=True)
            (out / "perplexity.json").write_text(json.dumps(result, indent=2) + "\n")
            bpb = f", {result['bits_per_byte']:.4f} bits/byte" if "bits_per_byte" in result else ""
            print(f"loss {result['loss']:.4f} nats/token, perplexity {result['perplexity']:.3f}{bpb} "
                  f"({result['tokens']:,} tokens) -> {out / 'perplexity.json'}", flush=True)
            del model
        if args.tasks:
            batch = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
            limit = int(args.limit) if args.limit and args.limit >= 1 else args.limit
            ev.run_harness(folder, [t for t in args.tasks.split(",") if t], out, include_path=args.include_path,
                           batch_size=batch, num_fewshot=args.num_fewshot, limit=limit, dtype=args.dtype,
                           device=args.device)
    except ev.EvaluationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

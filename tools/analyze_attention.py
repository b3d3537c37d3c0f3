#!/usr/bin/env python
"""Attention concentration per layer of Megatron checkpoints, side by side.

    python tools/analyze_attention.py --checkpoint runs/vanilla/ckpt --checkpoint runs/resformer/ckpt \\
        --text data/sample.txt --out analysis/

For each checkpoint (a checkpoint directory with `latest`, or an iter_NNNNNNN directory; any
TP/PP layout): attention entropy, attention mass on the first token, and the mean pairwise cosine
similarity of hidden states, per layer, on non-overlapping windows of the text. Writes
OUT/attention_stats.csv, OUT/attention_stats.png and OUT/summary.json (LM loss on the text and the
check that the recomputed attention reproduces the kernel's output). One process, CPU (or GPU),
no launcher needed. Label a checkpoint with LABEL=PATH.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, help="[LABEL=]PATH, repeatable")
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--max-windows", type=int, default=16, help="sequences of seq_length tokens to average over")
    p.add_argument("--seq-length", type=int, help="window length (default: the model's seq_length)")
    p.add_argument("--tokenizer-model", help="default: data.tokenizer_model of the checkpoint's run config")
    p.add_argument("--max-recompute-err", type=float, default=1e-3,
                   help="fail if recomputed attention differs from the kernel's output by more")
    a = p.parse_args(argv)
    from rf_megatron.quiet import silence_known_warnings

    silence_known_warnings()  # before Megatron's import: the project's warning policy (rf_megatron/quiet.py)

    from megatron.core.dist_checkpointing.core import CheckpointingException

    from rf_megatron.config import ConfigError
    from rf_megatron.safe_checkpoint import UnsafeCheckpoint
    from rf_megatron.analysis.attention_stats import analyse_checkpoint, plot, table
    from rf_megatron.scaling.cli_common import write_json
    from rf_megatron.tokenizer import TokenizerError

    # a model key missing from the checkpoint (StrictHandling.RAISE_UNEXPECTED), no checkpoint,
    # a TE checkpoint, a bad run config / tokenizer, a text too short, a crafted pickle
    USER_ERRORS = (CheckpointingException, FileNotFoundError, NotImplementedError, ConfigError, TokenizerError,
                   ValueError, UnsafeCheckpoint)

    text = Path(a.text).read_text(encoding="utf-8")
    results = {}
    for item in a.checkpoint:
        label, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        try:
            res = analyse_checkpoint(path, text, a.max_windows, a.seq_length, a.tokenizer_model)
        except USER_ERRORS as exc:  # one line naming the checkpoint, not a traceback
            print(f"error: {path}: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        label = label or f"{res['name']} ({res['variant']})"
        if label in results:
            label = f"{label} [{len(results)}]"
        results[label] = res
        print(f"{label}: loss on text {res['loss']:.4f} over {res['tokens']} tokens; recompute max err "
              f"{res['recompute_max_err']:.2e}")
        if res["recompute_max_err"] > a.max_recompute_err:
            print(f"error: {label}: recomputed attention does not reproduce the kernel's output "
                  f"({res['recompute_max_err']:.3g} > {a.max_recompute_err})", file=sys.stderr)
            return 1
    df = table(results)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "attention_stats.csv", index=False)
    plot(df, out / "attention_stats.png")
    write_json({label: {k: v for k, v in r.items() if k != "layers"} for label, r in results.items()},
               out / "summary.json")
    with __import__("pandas").option_context("display.width", 200):
        print(df.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print(f"wrote {out / 'attention_stats.csv'}, {out / 'attention_stats.png'}, {out / 'summary.json'}")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

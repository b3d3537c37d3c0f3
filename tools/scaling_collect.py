#!/usr/bin/env python
"""Collect scaling runs into one table (CSV or Parquet).

    python tools/scaling_collect.py runs/scaling [more run dirs ...] --out table.csv

Finds every directory with config.yaml + metrics.jsonl under the given paths. Columns: name,
family, variant, lambda_mode, shape, N_nonembed, N_total, flops_per_token (exact), D (tokens
trained), C (= flops_per_token * D), C_6N, C_6N_total, budget (nominal, from the run name),
valid_loss (final), train_loss (last logged window mean), last_loss, tokens_per_s, finished.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rf_megatron.scaling.collect import collect, write_table  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories or directories holding them")
    p.add_argument("--out", required=True, help="table.csv or table.parquet")
    a = p.parse_args(argv)
    missing = [r for r in a.runs if not Path(r).is_dir()]
    if missing:
        print(f"error: {missing[0]}: no such folder (give run folders, or the folders holding them)", file=sys.stderr)
        return 2
    df = collect(a.runs)
    if df.empty:
        print(f"error: no runs found in {' '.join(a.runs)} (folders with config.yaml and metrics.jsonl)", file=sys.stderr)
        return 2
    write_table(df, a.out)
    done = int(df["finished"].sum())
    print(f"{len(df)} runs ({done} finished) -> {a.out}")
    with __import__("pandas").option_context("display.width", 200, "display.max_columns", 12):
        print(df[["name", "N_nonembed", "D", "C", "valid_loss", "tokens_per_s", "finished"]].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

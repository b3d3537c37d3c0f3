"""Runs -> one table: what each run was (family, shape, N) and what it cost and reached.

Sources are the files every run writes: `config.yaml` (the resolved RunConfig) and
`metrics.jsonl`. D is the tokens actually trained (last logged step x global batch x sequence
length), C = F_exact x D; `budget` is the nominal IsoFLOP budget from the run name
(`<family>-C<budget>-L<depth>`, see `plan`), else C itself. The final validation loss is the one
logged at the last step; unfinished runs are kept with `finished = False` (the fits drop them).
"""
from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Iterable, List

from ..errors import first_line
from .accounting import account
from .family import family_label
from .sweep import final_valid_loss, read_metrics

BUDGET_IN_NAME = re.compile(r"-C(\d+(?:\.\d+)?e[+-]?\d+)-")
COLUMNS = ["name", "family", "variant", "lambda_mode", "num_layers", "hidden_size", "num_attention_heads",
           "kv_heads", "ffn_hidden_size", "seq_length", "N_nonembed", "N_total", "flops_per_token", "steps",
           "train_steps", "D", "C", "C_6N", "C_6N_total", "budget", "valid_loss", "train_loss", "last_loss",
           "tokens_per_s", "finished", "run_dir"]


def find_run_dirs(paths: Iterable) -> List[Path]:
    """Every directory holding config.yaml + metrics.jsonl at or under the given paths."""
    found = []
    for path in map(Path, paths):
        candidates = [path] if (path / "config.yaml").exists() else sorted(p.parent for p in path.rglob("config.yaml"))
        found += [c for c in candidates if (c / "metrics.jsonl").exists()]
    return sorted(set(found))


def run_row(run_dir) -> dict:
    from ..run_config import load_run_config

    run_dir = Path(run_dir)
    cfg = load_run_config(str(run_dir / "config.yaml"))
    m, t = cfg.model, cfg.train
    acc = account(m)
    rows = read_metrics(run_dir)
    train_rows = {r["step"]: r for r in rows if "loss" in r}  # later rows win (resumed runs)
    steps = max(train_rows, default=0)
    d = steps * t.global_batch_size * m.seq_length
    valid = final_valid_loss(rows)
    speeds = [r["tokens_per_s"] for s, r in sorted(train_rows.items()) if "tokens_per_s" in r]
    match = BUDGET_IN_NAME.search(cfg.name)
    c = acc.flops_per_token * d
    return {
        "name": cfg.name, "family": family_label(m), "variant": m.variant,
        "lambda_mode": m.lambda_mode if m.variant == "resformer" else None,
        "num_layers": m.num_layers, "hidden_size": m.hidden_size, "num_attention_heads": m.num_attention_heads,
        "kv_heads": m.kv_heads, "ffn_hidden_size": m.ffn_size,
        "seq_length": m.seq_length, "N_nonembed": acc.N_nonembed, "N_total": acc.N_total,
        "flops_per_token": acc.flops_per_token, "steps": steps, "train_steps": t.train_steps, "D": d, "C": c,
        "C_6N": 6.0 * acc.N_nonembed * d, "C_6N_total": 6.0 * acc.N_total * d,
        "budget": float(match.group(1)) if match else c,
        "valid_loss": valid[1] if valid and valid[0] >= steps else float("nan"),
        "train_loss": train_rows[steps]["loss"] if steps else float("nan"),
        "last_loss": train_rows[steps].get("last_loss", float("nan")) if steps else float("nan"),
        # the first window includes start-up (graph building, allocation): median of the rest
        "tokens_per_s": statistics.median(speeds[1:] or speeds) if speeds else float("nan"),
        "finished": bool(valid and steps >= t.train_steps and valid[0] >= t.train_steps),
        "run_dir": str(run_dir),
    }


def collect(paths: Iterable):
    """A pandas DataFrame, one row per run found under `paths`."""
    import pandas as pd

    rows = [run_row(d) for d in find_run_dirs(paths)]
    return pd.DataFrame(rows, columns=COLUMNS)


def write_table(df, out) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        df.to_parquet(out, index=False)
    elif out.suffix == ".csv":
        df.to_csv(out, index=False)
    else:
        raise ValueError(f"{out}: write .csv or .parquet")


def read_table(path):
    """The table tools/scaling_collect.py wrote (CSV, or Parquet by its suffix); a one-line ValueError naming the
    path when there is none to read."""
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: a folder; give the table tools/scaling_collect.py wrote (its --out)")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except (OSError, ValueError, ImportError) as exc:  # pandas' parser errors are ValueErrors
        raise ValueError(f"{path}: cannot read it as a table ({first_line(exc)})") from None

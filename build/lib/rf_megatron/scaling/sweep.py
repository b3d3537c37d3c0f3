"""The sweep file: one run per line, `PRESET key=value ...`, and whether a run has finished.

A line is exactly the argument list of `pretrain/pretrain_resformer.py --config <line>` (word
split on whitespace, which is why no value may contain whitespace), so a SLURM array task and the
local runner launch the same thing. Lines starting with `#` are the header (the plan's rules)
and blank lines are ignored: array task i runs the i-th run line (0-based), e.g.
`grep -v -e '^#' -e '^[[:space:]]*$' sweep.txt | sed -n "$((SLURM_ARRAY_TASK_ID + 1))p"`.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Dict, List, Optional, Tuple


def format_line(preset: str, overrides: Dict[str, object]) -> str:
    parts = [preset]
    for key, value in overrides.items():
        text = _yaml_scalar(value)
        if any(c.isspace() for c in f"{key}{text}") or not text:
            raise ValueError(f"sweep override {key}={text!r}: values must be non-empty and hold no whitespace")
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _yaml_scalar(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_yaml_scalar(v) for v in value) + "]"
    return str(value)


def run_lines(path) -> List[str]:
    """The run lines of a sweep file, in order (header comments and blank lines dropped)."""
    return [line.strip() for line in Path(path).read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def parse_line(line: str) -> Tuple[str, List[str]]:
    """`PRESET k=v ...` -> (preset, [k=v, ...]), split as a shell splits it (quotes group words), the same
    way locally (scaling_run_local.py) and on SLURM (slurm/submit.py, sweep.sbatch)."""
    try:
        parts = shlex.split(line)
    except ValueError as exc:  # an unclosed quote
        raise ValueError(f"sweep line {line!r}: {exc}") from None
    if not parts or "=" in parts[0]:
        raise ValueError(f"sweep line {line!r}: expected `PRESET key=value ...`")
    return parts[0], parts[1:]


def load_line(line: str):
    """The RunConfig a sweep line resolves to (preset + overrides)."""
    from ..run_config import load_run_config

    preset, overrides = parse_line(line)
    return load_run_config(preset, overrides)


def read_metrics(run_dir) -> List[dict]:
    """metrics.jsonl rows; a resumed run appends, so a later row for the same step and kind wins."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return rows


def final_valid_loss(rows: List[dict]) -> Optional[Tuple[int, float]]:
    """(step, valid_loss) of the last validation row, or None."""
    valid = [(r["step"], r["valid_loss"]) for r in rows if "valid_loss" in r]
    return max(valid, key=lambda x: x[0]) if valid else None


def is_finished(run_dir, train_steps: int) -> bool:
    """Finished = a validation loss logged at the last training step (the trainer's final eval)."""
    last = final_valid_loss(read_metrics(run_dir))
    return last is not None and last[0] >= train_steps

#!/usr/bin/env python
"""Loss curves of one or more runs from their metrics.jsonl, in one PNG: no W&B or TensorBoard needed.

    python tools/plot_metrics.py runs/resformer runs/vanilla --out curves.png
    python tools/plot_metrics.py runs/a/metrics.jsonl --x tokens --smooth 0.9 --labels ResFormer

Each run is a folder holding metrics.jsonl (a run's logging.dir) or the file itself. Train loss (the mean over
each log interval) is a solid line, validation loss a dashed line with markers, one colour per run, named by its
folder (or --labels). A step logged twice (a run resumed from an earlier checkpoint) keeps its last value, the
one the final model descends from. Needs matplotlib (`pip install -e ".[scaling]"`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Tuple

Series = List[Tuple[int, float]]  # (step, value), by step


class MetricsError(ValueError):
    """A run whose metrics cannot be plotted; the message is one line naming the file."""


def metrics_file(run: str) -> Path:
    """The metrics.jsonl of a run folder, or the file given."""
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise MetricsError(f"{path}: no such file (give a run folder holding metrics.jsonl, or the file)")
    return path


def read_curves(path: Path) -> Dict[str, Series]:
    """{"loss": train loss, "valid_loss": validation loss, "tokens": tokens seen} by step, from one metrics.jsonl.
    A line that does not parse (a run killed while writing it) is skipped."""
    by_key: Dict[str, Dict[int, float]] = {"loss": {}, "valid_loss": {}, "tokens": {}}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            continue
        for key, values in by_key.items():
            if isinstance(row.get(key), (int, float)):
                values[row["step"]] = float(row[key])
    if not by_key["loss"] and not by_key["valid_loss"]:
        raise MetricsError(f"{path}: no training or validation loss in it (empty, or not a run's metrics.jsonl)")
    return {key: sorted(values.items()) for key, values in by_key.items()}


def ema(values: List[float], weight: float) -> List[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so the first points are not pulled to 0."""
    out, mean = [], 0.0
    for i, value in enumerate(values, 1):
        mean = weight * mean + (1 - weight) * value
        out.append(mean / (1 - weight ** i))
    return out


def to_tokens(steps: List[int], tokens: Series) -> List[float]:
    """Tokens seen at each step, interpolated between the logged train steps (validation rows do not log them)."""
    import numpy as np

    known_steps, known_tokens = [0] + [s for s, _ in tokens], [0.0] + [t for _, t in tokens]
    per_step = known_tokens[-1] / known_steps[-1] if known_steps[-1] else 0.0
    return [float(np.interp(s, known_steps, known_tokens)) if s <= known_steps[-1] else s * per_step for s in steps]


def plot(runs: List[Tuple[str, Dict[str, Series]]], out: str, x: str = "step", smooth: float = 0.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, (label, curves) in enumerate(runs):
        color = f"C{i % 10}"

        def xs(series: Series) -> List[float]:
            steps = [s for s, _ in series]
            return to_tokens(steps, curves["tokens"]) if x == "tokens" else steps

        train, valid = curves["loss"], curves["valid_loss"]
        if train:
            values = [v for _, v in train]
            if smooth:
                ax.plot(xs(train), values, color=color, alpha=0.25, linewidth=0.8)
                values = ema(values, smooth)
            ax.plot(xs(train), values, color=color, linewidth=1.5, label=f"{label} train")
        if valid:
            ax.plot(xs(valid), [v for _, v in valid], color=color, linestyle="--", marker="o", markersize=4,
                    linewidth=1.2, label=f"{label} validation")
    ax.set_xlabel("tokens" if x == "tokens" else "step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("train loss" + (f" (EMA {smooth:g})" if smooth else "") + " and validation loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (logging.dir) or metrics.jsonl files")
    p.add_argument("--out", default="curves.png", help="the PNG to write (default: curves.png)")
    p.add_argument("--x", choices=("step", "tokens"), default="step", help="the horizontal axis (default: step)")
    p.add_argument("--smooth", type=float, default=0.0,
                   help="EMA weight in [0, 1) for the train loss, e.g. 0.9; the raw curve stays, faint (default: 0)")
    p.add_argument("--labels", nargs="+", help="a name per run (default: each run's folder name)")
    a = p.parse_args(argv)
    if not 0 <= a.smooth < 1:
        p.error(f"--smooth {a.smooth}: give a weight in [0, 1)")
    if a.labels and len(a.labels) != len(a.runs):
        p.error(f"--labels: {len(a.labels)} names for {len(a.runs)} runs")
    try:
        paths = [metrics_file(run) for run in a.runs]
        runs = [(label, read_curves(path)) for label, path in zip(a.labels or [path.parent.name for path in paths],
                                                                  paths)]
    except MetricsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print('error: matplotlib is not installed: pip install -e ".[scaling]"', file=sys.stderr)
        return 2
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    plot(runs, a.out, a.x, a.smooth)
    said = ", ".join(f"{label} ({len(c['loss'])} train, {len(c['valid_loss'])} validation points)" for label, c in runs)
    print(f"wrote {a.out}: {said}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

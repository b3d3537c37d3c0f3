"""Options and output shared by the fit and compare CLIs."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from .fit import DEFAULT_BOOT_STARTS, DEFAULT_STARTS


def add_fit_options(p) -> None:
    p.add_argument("--n-col", choices=("N_nonembed", "N_total"), default="N_nonembed",
                   help="which parameter count is N (non-embedding: Kaplan; total: Chinchilla)")
    p.add_argument("--loss-col", default="valid_loss", help="valid_loss | train_loss | last_loss")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap replicates (runs resampled)")
    p.add_argument("--starts", default=str(DEFAULT_STARTS),
                   help="approach-3 starts: a number (the grid screened to that many; default %(default)s, the same "
                        "optimum as the full grid, 40x faster) or all (Hoffmann's 4500-point grid)")
    p.add_argument("--boot-starts", default=str(DEFAULT_BOOT_STARTS),
                   help="starts per bootstrap refit besides the estimate: K next-best optima of the fit, or all")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true",
                   help="exit 3 when a diagnostic warns (parameters at bounds, outlier runs, stuck searches, ...)")


def fit_kwargs(a) -> dict:
    as_n = lambda v: v if v == "all" else int(v)  # noqa: E731
    return dict(n_col=a.n_col, loss_col=a.loss_col, n_boot=a.n_boot, starts=as_n(a.starts),
                boot_starts=as_n(a.boot_starts), seed=a.seed)


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    return obj


def write_json(obj, path) -> None:
    """JSON with nan/inf as null (strict JSON readers choke on NaN)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(obj), indent=1))


def fmt_ci(value, ci) -> str:
    lo, hi = ci
    return f"{value:.4g} [{lo:.4g}, {hi:.4g}]"


def finish(warnings, a) -> int:
    """Print the diagnostics (rf_megatron/scaling/diagnostics.py); the exit code under --strict."""
    from .diagnostics import report

    report(warnings)
    if warnings and a.strict:
        print(f"error: --strict: {len(warnings)} warning(s)", file=sys.stderr)
        return 3
    return 0


def write_outputs(report, a, df, fits, prefix: str) -> None:
    """--out (JSON report) and --plots (figures, named `<prefix>isoflop.png` etc.) of the fit and compare CLIs."""
    if a.out:
        write_json(report, a.out)
    if a.plots:
        from .plots import all_plots

        for path in all_plots(df, fits, a.plots, a.loss_col, prefix):
            print(f"wrote {path}")

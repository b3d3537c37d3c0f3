"""How many runs resolve a 10-20% parameter saving at my noise level? Simulated from a law.

For each design (sizes per IsoFLOP budget) and planted saving s, `sims` two-family tables are drawn from the
law (synthetic.two_family_runs: family a needs s fewer parameters for b's loss) with the given noise, and each
is fitted jointly as scaling_compare does (joint_fit.fit_joint, without its bootstrap). The spread of the
estimates is the standard error the study would get; a design resolves s when the 95% interval excludes 0,
so its power is the share of simulated studies with estimate - 1.96 SE > 0.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from .fit import LawFit
from .joint_fit import fit_joint
from .synthetic import two_family_runs

Z95 = 1.959964


def simulated_estimates(law: LawFit, saving: float, noise: float, budgets: Sequence[float], sizes_per_budget: int,
                        sims: int, seed: int = 0, starts: int = 8, design: Optional[dict] = None) -> np.ndarray:
    """The joint fit's parameter saving on `sims` tables drawn with `saving` planted (at `design`'s sizes when
    given: the fitted runs' own N, D and budgets)."""
    out = []
    for i in range(sims):
        runs = two_family_runs(law, saving, noise, seed=[seed, sizes_per_budget, i], budgets=budgets,
                               sizes_per_budget=sizes_per_budget, design=design)
        point, _ = fit_joint(runs, ["a", "b"], n_col="N_total", starts=starts, n_boot=0)
        out.append(point.param_saving("a", "b"))
    return np.array(out)


def power_table(law: LawFit, savings: Sequence[float], noise: float, budgets: Sequence[float],
                sizes_options: Sequence[int], sims: int = 20, seed: int = 0, log=None,
                design: Optional[dict] = None) -> List[Dict[str, float]]:
    """One row per (design, saving): runs per family, mean estimate, SE, 95% half-width and power. With `design`
    (the fitted runs' sizes) its rows come first, marked `"design": "your runs"`; the others are IsoFLOP designs
    of k sizes per budget, log-spaced +-1 decade around each budget's optimum."""
    rows = []
    options = ([("your runs", len(design["N"]), design)] if design else []) + \
        [(f"{k} sizes/budget", k * len(budgets), None) for k in sizes_options]
    for label, runs, plan in options:
        sizes = 0 if plan else runs // len(budgets)
        for saving in savings:
            est = simulated_estimates(law, saving, noise, budgets, sizes, sims, seed, design=plan)
            est = est[np.isfinite(est)]
            se = float(np.std(est, ddof=1)) if len(est) > 1 else float("nan")
            rows.append({"design": label, "sizes_per_budget": int(sizes), "runs_per_family": int(runs),
                         "saving": float(saving), "mean_estimate": float(np.mean(est)) if len(est) else float("nan"),
                         "se": se, "ci_half_width": Z95 * se, "power": float(np.mean(est - Z95 * se > 0)),
                         "sims": int(len(est))})
            if log:
                r = rows[-1]
                log(f"  {r['runs_per_family']:4d} runs/family ({label}), saving {100 * saving:4.1f}%: estimate "
                    f"{100 * r['mean_estimate']:5.1f}% +- {100 * r['ci_half_width']:4.1f} (95%), power {r['power']:.2f}")
    return rows


def runs_needed(rows: List[Dict[str, float]], power: float = 0.8) -> Dict[float, Optional[int]]:
    """Per saving: the fewest runs per family whose power reaches `power` (None: no design tried does)."""
    out = {}
    for saving in sorted({r["saving"] for r in rows}):
        ok = [r["runs_per_family"] for r in rows if r["saving"] == saving and r["power"] >= power
              and r.get("design", "") != "your runs"]
        out[saving] = min(ok) if ok else None
    return out

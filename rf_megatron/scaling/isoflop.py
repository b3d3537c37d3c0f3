"""Chinchilla approach 2: per IsoFLOP budget, a parabola of loss in log N; its minimum is the
compute-optimal size N_opt(C); then power laws N_opt = k_N C^a and D_opt = k_D C^b.

D_opt(C) = C / F(N_opt) with F the training FLOPs per token, interpolated in log-log from the
budget's own runs (quadratic in log N), i.e. the exact-FLOPs analogue of Chinchilla's
D = C / (6 N). A minimum outside the sampled sizes is an extrapolation and flagged
(`interior = False`); budgets with fewer than 3 distinct sizes or a parabola that opens
downwards give no minimum. Confidence intervals: bootstrap, resampling runs within each budget.
A fit that is no result (2 minima, a zero-width interval, an exponent <= 0) lists why under `degenerate`.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from .fit import Bootstrap


def _flops_interp(log_n, log_f):
    deg = min(2, len(np.unique(log_n)) - 1)
    coeffs = np.polyfit(log_n, log_f, deg)
    return lambda x: float(np.exp(np.polyval(coeffs, x)))


def budget_minimum(N, L, F, budget: float) -> Optional[Dict[str, float]]:
    """The parabola minimum of one IsoFLOP curve, or None."""
    x, y = np.log(np.asarray(N, float)), np.asarray(L, float)
    if len(np.unique(x)) < 3:
        return None
    p2, p1, p0 = np.polyfit(x, y, 2)
    if p2 <= 0:
        return None
    x_opt = -p1 / (2 * p2)
    f = _flops_interp(x, np.log(np.asarray(F, float)))(x_opt)
    return {"budget": float(budget), "N_opt": float(np.exp(x_opt)), "D_opt": float(budget / f),
            "L_opt": float(np.polyval([p2, p1, p0], x_opt)), "curvature": float(p2),
            "interior": bool(x.min() <= x_opt <= x.max()), "n_points": int(len(x))}


def why_no_minimum(N, L) -> str:
    """Why a budget's runs give no parabola minimum (budget_minimum returned None)."""
    x, y = np.log(np.asarray(N, float)), np.asarray(L, float)
    if len(np.unique(x)) < 3:
        return f"{len(np.unique(x))} distinct sizes (a parabola needs 3)"
    best = int(np.argmin(y))
    where = "smallest" if x[best] == x.min() else "largest" if x[best] == x.max() else "inside, yet it bends down"
    return (f"the loss does not turn up over the sampled sizes (lowest at the {where}, N={np.exp(x[best]):.4g}): "
            "they do not bracket the optimum")


def minima(df, n_col: str = "N_nonembed", loss_col: str = "valid_loss", missing: Optional[List] = None
           ) -> List[Dict[str, float]]:
    """Each budget's minimum; `missing` collects {"budget", "why"} for each budget that has none."""
    out = []
    for budget, group in df.groupby("budget"):
        found = budget_minimum(group[n_col], group[loss_col], group["flops_per_token"], budget)
        if found:
            out.append(found)
        elif missing is not None:
            missing.append({"budget": float(budget), "why": why_no_minimum(group[n_col], group[loss_col])})
    return out


def power_law(C, Y) -> Dict[str, float]:
    """Y = k C^exponent by least squares in log-log."""
    exponent, log_k = np.polyfit(np.log(C), np.log(Y), 1)
    return {"exponent": float(exponent), "coefficient": float(np.exp(log_k))}


def degenerate_reasons(result: Dict[str, object]) -> List[str]:
    """Why approach 2's power laws are not a result, if they are not: a line through 2 budget minima always fits
    exactly, a bootstrap interval of zero width means the replicates never varied (too few distinct sizes to
    resample), and N_opt and D_opt must both grow with C (positive exponents)."""
    if "N_opt" not in result:
        return []
    reasons = []
    minima = result.get("minima", [])
    if len(minima) < 3:
        reasons.append(f"only {len(minima)} budget minima (a power law through 2 points fits them exactly)")
    outside = sum(not m["interior"] for m in minima)
    if outside:
        reasons.append(f"{outside} of {len(minima)} minima lie outside the sampled sizes")
    for key in ("N", "D"):
        exponent = result[f"{key}_opt"]["exponent"]
        lo, hi = result.get("ci", {}).get(f"{key}_exponent", (np.nan, np.nan))
        if not exponent > 0:
            reasons.append(f"{key}_opt exponent {exponent:.3g} <= 0 ({key}_opt must grow with C)")
        if result.get("n_boot") and (not (np.isfinite(lo) and np.isfinite(hi))
                                     or hi - lo <= 1e-9 * max(1.0, abs(exponent))):
            reasons.append(f"{key}_opt exponent interval [{lo:.4g}, {hi:.4g}] has no width (the bootstrap "
                           "replicates never varied)")
    return reasons


def approach2(df, n_col: str = "N_nonembed", loss_col: str = "valid_loss", n_boot: int = 200,
              seed: int = 0, level: float = 0.95) -> Dict[str, object]:
    """Minima per budget, N_opt / D_opt power laws (when >= 2 budgets have a minimum), CIs."""
    df = df[np.isfinite(df[loss_col])]
    missing: List[Dict] = []
    found = minima(df, n_col, loss_col, missing)
    result: Dict[str, object] = {"minima": found, "no_minimum": missing, "n_col": n_col}
    if len(found) < 2:
        return result
    C = [m["budget"] for m in found]
    result["N_opt"] = power_law(C, [m["N_opt"] for m in found])
    result["D_opt"] = power_law(C, [m["D_opt"] for m in found])
    rng = np.random.default_rng(seed)
    groups = [g for _, g in df.groupby("budget")]
    rows = []
    for _ in range(n_boot):
        sample = [g.iloc[rng.integers(0, len(g), len(g))] for g in groups]
        ms = [m for g in sample if (m := budget_minimum(g[n_col], g[loss_col], g["flops_per_token"],
                                                        g["budget"].iloc[0]))]
        if len(ms) < 2:
            rows.append([np.nan] * 4)
            continue
        c = [m["budget"] for m in ms]
        n, d = power_law(c, [m["N_opt"] for m in ms]), power_law(c, [m["D_opt"] for m in ms])
        rows.append([n["exponent"], n["coefficient"], d["exponent"], d["coefficient"]])
    boot = Bootstrap(["N_exponent", "N_coefficient", "D_exponent", "D_coefficient"], np.array(rows, float).reshape(-1, 4))
    result["ci"] = boot.ci(level)
    result["bootstrap_failed"] = int(np.isnan(boot.samples[:, 0]).sum())
    result["n_boot"] = int(n_boot)
    result["degenerate"] = degenerate_reasons(result)
    return result

"""How much family a saves over family b at equal loss (the paper's headline: ResFormer matches
vanilla's loss with 16.11% fewer parameters and 20.3% less data).

Definitions, with L_a, L_b the approach-3 laws of the two families and a reference (N, D) of b:

- parameter saving = 1 - N'/N, where L_a(N', D) = L_b(N, D)   (same data, fewer parameters)
- data saving      = 1 - D'/D, where L_a(N, D') = L_b(N, D)   (same model, fewer tokens)
- compute saving   = 1 - C'/C, where L*_a(C') = L*_b(C), L*(C) = min_N L(N, C / F(N)) the
  compute-optimal frontier (F: each family's own FLOPs per token, SVFormer's are lower)

A saving is nan when the target loss is out of a's reach (e.g. below E_a + B_a/D^beta_a for the
parameter saving). The reference defaults to b's best run at b's largest budget; the savings are
also reported at b's compute-optimal point of that budget. CIs pair the i-th bootstrap law of a
with the i-th of b (the runs of each family resampled independently).
"""
from __future__ import annotations

from typing import Dict

import numpy as np
from scipy.optimize import brentq

from .family_fits import FamilyFit, usable
from .fit import Bootstrap, LawFit

DEFINITIONS = {
    "param_saving": "1 - N'/N with L_a(N', D) = L_b(N, D) at the reference (N, D)",
    "data_saving": "1 - D'/D with L_a(N, D') = L_b(N, D) at the reference (N, D)",
    "compute_saving": "1 - C'/C with L*_a(C') = L*_b(C), L*(C) = min_N L(N, C/F(N))",
    "loss_gap_at_C": "L*_a(C) - L*_b(C)",
}


def default_reference(df, family_b: str, n_col: str, loss_col: str = "valid_loss") -> Dict[str, float]:
    rows = usable(df[df["family"] == family_b], loss_col)
    top = rows[rows["budget"] == rows["budget"].max()]
    best = top.loc[top[loss_col].idxmin()]
    return {"N": float(best[n_col]), "D": float(best["D"]), "C": float(best["budget"]), "run": str(best["name"])}


def _savings(law_a: LawFit, law_b: LawFit, fa: FamilyFit, fb: FamilyFit, N: float, D: float, C: float):
    target = float(law_b.predict(N, D))
    n_prime = float(law_a.param_for_loss(target, D))
    d_prime = float(law_a.data_for_loss(target, N))
    opt_b = fb.frontier(C, law_b)
    opt_a = fa.frontier(C, law_a)
    target_c = opt_b["L_opt"]

    def gap(log_c):
        return fa.frontier(np.exp(log_c), law_a)["L_opt"] - target_c

    lo, hi = np.log(C) - 5 * np.log(10), np.log(C) + 5 * np.log(10)
    try:
        c_prime = float(np.exp(brentq(gap, lo, hi, xtol=1e-8))) if gap(lo) > 0 > gap(hi) else np.nan
    except ValueError:
        c_prime = np.nan
    t_opt = float(law_b.predict(opt_b["N_opt"], opt_b["D_opt"]))
    return {
        "param_saving": 1 - n_prime / N, "data_saving": 1 - d_prime / D, "compute_saving": 1 - c_prime / C,
        "loss_gap_at_C": opt_a["L_opt"] - opt_b["L_opt"],
        "param_saving_at_b_opt": 1 - float(law_a.param_for_loss(t_opt, opt_b["D_opt"])) / opt_b["N_opt"],
        "data_saving_at_b_opt": 1 - float(law_a.data_for_loss(t_opt, opt_b["N_opt"])) / opt_b["D_opt"],
        "N_opt_a": opt_a["N_opt"], "D_opt_a": opt_a["D_opt"], "L_opt_a": opt_a["L_opt"],
        "N_opt_b": opt_b["N_opt"], "D_opt_b": opt_b["D_opt"], "L_opt_b": opt_b["L_opt"],
    }


def compare(fa: FamilyFit, fb: FamilyFit, reference: Dict[str, float], level: float = 0.95) -> Dict[str, object]:
    if fa.n_col != fb.n_col:
        raise ValueError("both families must be fitted with the same parameter count (n_col)")
    N, D, C = reference["N"], reference["D"], reference["C"]
    point = _savings(fa.law, fb.law, fa, fb, N, D, C)
    names = list(point)
    rows = [list(_savings(la, lb, fa, fb, N, D, C).values()) for la, lb in zip(fa.boot_laws, fb.boot_laws)]
    boot = Bootstrap(names, np.array(rows, float).reshape(len(rows), len(names)))
    ci = boot.ci(level) if rows else {}
    nan = {k: float(np.isnan(boot.column(k)).mean()) for k in names} if rows else {}
    return {"a": fa.family, "b": fb.family, "n_col": fa.n_col, "reference": reference, "definitions": DEFINITIONS,
            "estimate": point, "ci": ci, "ci_level": level, "n_boot": len(rows), "nan_fraction": nan,
            "law_a": fa.law.as_dict(), "law_b": fb.law.as_dict()}


def frontier_curves(fits: Dict[str, FamilyFit], C_grid) -> Dict[str, Dict[str, list]]:
    out = {}
    for name, fit in fits.items():
        pts = [fit.frontier(c) for c in C_grid]
        out[name] = {k: [p[k] for p in pts] for k in ("C", "N_opt", "D_opt", "L_opt")}
    return out


def savings_along_frontier(fa: FamilyFit, fb: FamilyFit, C_grid, level: float = 0.95) -> Dict[str, list]:
    """Parameter and data saving of a at b's compute-optimal (N, D) of each budget C, each with its bootstrap
    CI (paired replicates, as `compare`): how the saving moves with scale (constant for the joint model's
    parameter saving, by construction)."""
    keys = ("param_saving_at_b_opt", "data_saving_at_b_opt")

    def at(law_a: LawFit, law_b: LawFit, C: float):
        opt = fb.frontier(C, law_b)
        target = float(law_b.predict(opt["N_opt"], opt["D_opt"]))
        return (1 - float(law_a.param_for_loss(target, opt["D_opt"])) / opt["N_opt"],
                1 - float(law_a.data_for_loss(target, opt["N_opt"])) / opt["D_opt"])

    lo_q, hi_q = 50 * (1 - level), 50 * (1 + level)
    out: Dict[str, list] = {"C": [float(c) for c in C_grid], **{k: [] for k in keys}, **{f"{k}_ci": [] for k in keys}}
    for C in C_grid:
        point = at(fa.law, fb.law, C)
        reps = np.array([at(la, lb, C) for la, lb in zip(fa.boot_laws, fb.boot_laws)], float).reshape(-1, 2)
        for i, k in enumerate(keys):
            out[k].append(point[i])
            col = reps[:, i][np.isfinite(reps[:, i])]
            out[f"{k}_ci"].append(tuple(float(x) for x in np.percentile(col, [lo_q, hi_q])) if len(col)
                                  else (np.nan, np.nan))
    return out


def leave_one_budget_out(df, fa: FamilyFit, fb: FamilyFit, reference: Dict[str, float], refit) -> list:
    """The savings at the reference refitted without each budget in turn (point estimates; `refit(df)` returns
    the two laws (a, b)): a saving that moves a lot when one budget goes is carried by that budget."""
    rows = []
    budgets = sorted(usable(df[df["family"].isin([fa.family, fb.family])])["budget"].unique())
    if len(budgets) < 3:  # dropping one would leave a single budget: no law to fit
        return rows
    for budget in budgets:
        law_a, law_b = refit(df[df["budget"] != budget])
        s = _savings(law_a, law_b, fa, fb, reference["N"], reference["D"], reference["C"])
        rows.append({"without_budget": float(budget), "param_saving": s["param_saving"],
                     "data_saving": s["data_saving"]})
    return rows


def savings_table(result: Dict[str, object], path) -> None:
    """The estimates with their CIs as CSV (path ending .csv) or a LaTeX booktabs table (.tex)."""
    from pathlib import Path

    path = Path(path)
    keys = [k for k in ("param_saving", "data_saving", "compute_saving", "param_saving_at_b_opt",
                        "data_saving_at_b_opt", "loss_gap_at_C") if k in result["estimate"]]
    est, ci, nan = result["estimate"], result["ci"], result.get("nan_fraction", {})
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        lines = ["quantity,estimate,ci_low,ci_high,ci_level,undefined_replicates"]
        lines += [f"{k},{est[k]:.6g},{ci[k][0]:.6g},{ci[k][1]:.6g},{result['ci_level']},{nan.get(k, 0.0):.3g}"
                  for k in keys]
    else:
        pct = lambda k, x: f"{x:.4f}" if k == "loss_gap_at_C" else f"{100 * x:.1f}\\%"  # noqa: E731
        lines = [r"\begin{tabular}{lr}", r"\toprule",
                 f"{result['a']} vs {result['b']} & estimate [{int(100 * result['ci_level'])}\\% CI] \\\\",
                 r"\midrule"]
        lines += [f"{k.replace('_', ' ')} & {pct(k, est[k])} [{pct(k, ci[k][0])}, {pct(k, ci[k][1])}] \\\\"
                  for k in keys]
        lines += [r"\bottomrule", r"\end{tabular}"]
    path.write_text("\n".join(lines) + "\n")

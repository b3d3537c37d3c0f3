"""Fit every family of a collected table: approach 3 (with bootstrap), approach 2, and the
compute-optimal frontier L*(C) = min_N L(N, C / F(N)).

F(N), the training FLOPs per token of the family member with N parameters, is interpolated
in log-log (quadratic) from the family's runs, so the frontier uses the same exact FLOPs as the
plan; with `n_col="N_total"` and F = 6N it reduces to Chinchilla's frontier.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
from scipy.optimize import minimize_scalar

from .fit import DEFAULT_BOOT_STARTS, DEFAULT_STARTS, Bootstrap, LawFit, bootstrap_law
from .isoflop import approach2

N_COLUMNS = ("N_nonembed", "N_total")


def usable(df, loss_col: str = "valid_loss"):
    """Finished runs with a finite loss."""
    return df[df["finished"].astype(bool) & np.isfinite(df[loss_col])]


@dataclass
class FamilyFit:
    family: str
    n_col: str
    law: LawFit
    boot: Bootstrap
    boot_laws: List[LawFit]
    flops_of_n: Callable[[float], float]
    n_range: tuple
    approach2: Dict[str, object]

    def frontier(self, C, law: Optional[LawFit] = None) -> Dict[str, float]:
        """The compute-optimal point at budget C under `law` (default: the point estimate)."""
        law = law or self.law
        lo, hi = np.log(self.n_range[0]) - 3 * np.log(10), np.log(self.n_range[1]) + 3 * np.log(10)

        def loss(x):
            n = np.exp(x)
            return float(law.predict(n, C / self.flops_of_n(n)))

        res = minimize_scalar(loss, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
        n = float(np.exp(res.x))
        return {"C": float(C), "N_opt": n, "D_opt": float(C / self.flops_of_n(n)), "L_opt": float(res.fun),
                "at_bound": bool(min(res.x - lo, hi - res.x) < 1e-3)}

    def summary(self, level: float = 0.95) -> Dict[str, object]:
        return {"family": self.family, "n_col": self.n_col, "approach3": self.law.as_dict(),
                "approach3_ci": self.boot.ci(level), "n_boot": len(self.boot_laws),
                "n_range": list(self.n_range), "approach2": self.approach2}


def flops_interpolation(N, F) -> Callable[[float], float]:
    log_n, log_f = np.log(np.asarray(N, float)), np.log(np.asarray(F, float))
    deg = min(2, len(np.unique(log_n)) - 1)
    coeffs = np.polyfit(log_n, log_f, max(deg, 0))
    return lambda n: float(np.exp(np.polyval(coeffs, np.log(n))))


def fit_family(df, family: str, n_col: str = "N_nonembed", loss_col: str = "valid_loss", n_boot: int = 200,
               starts=DEFAULT_STARTS, boot_starts=DEFAULT_BOOT_STARTS, seed: int = 0) -> FamilyFit:
    from .fit import fit_law

    if n_col not in N_COLUMNS:
        raise ValueError(f"n_col={n_col!r}: choose one of {', '.join(N_COLUMNS)}")
    rows = usable(df[df["family"] == family], loss_col)
    if len(rows) < 2:
        raise ValueError(f"family {family!r}: {len(rows)} finished runs, need at least 2 (5+ to fit 5 parameters)")
    N, D, L = rows[n_col].to_numpy(float), rows["D"].to_numpy(float), rows[loss_col].to_numpy(float)
    law = fit_law(N, D, L, starts=starts)
    # each family's resampling stream of its own (scaling_compare pairs replicates but resamples independently)
    seed = [seed, zlib.crc32(family.encode())]
    law, boot, boot_laws = bootstrap_law(N, D, L, n_boot=n_boot, seed=seed, fit=law, boot_starts=boot_starts)
    return FamilyFit(family=family, n_col=n_col, law=law, boot=boot, boot_laws=boot_laws,
                     flops_of_n=flops_interpolation(rows[n_col], rows["flops_per_token"]),
                     n_range=(float(N.min()), float(N.max())),
                     approach2=approach2(rows, n_col, loss_col, n_boot=n_boot, seed=seed))


MIN_RUNS = 5  # five parameters


def clean_table(df, loss_col: str = "valid_loss", echo=print):
    """The table with every run once, saying what the fits leave out: a run listed twice (a re-collected or re-run
    sweep) counts once (its last row; duplicates would narrow the CI falsely), and every unfinished run or run
    without a finite loss (the fits drop them) is named instead of vanishing silently."""
    if "name" in df:
        dup = df["name"].duplicated(keep="last")
        for name in sorted(set(df.loc[dup, "name"])):
            echo(f"note: run {name} is listed {int((df['name'] == name).sum())} times: its last row counts")
        df = df[~dup]
    kept = usable(df, loss_col)
    for _, row in df.drop(kept.index).iterrows():
        why = "unfinished" if not bool(row.get("finished", True)) else f"{loss_col}={row[loss_col]}"
        echo(f"note: dropping run {row.get('name', '?')} ({row['family']}): {why}")
    return df


def check_enough_runs(df, family: str, loss_col: str = "valid_loss") -> None:
    """A five-parameter law from fewer than MIN_RUNS runs, or from one budget (N and D then move together), gives
    confident wrong answers (zero-width or absurd CIs): refuse, saying what is missing."""
    if family not in set(df["family"]):
        raise ValueError(f"no family {family!r} in the table (it has: {', '.join(sorted(set(df['family'])))})")
    rows = usable(df[df["family"] == family], loss_col)
    budgets = rows["budget"].nunique() if "budget" in rows else 0
    if len(rows) < MIN_RUNS or budgets < 2:
        raise ValueError(f"family {family!r}: {len(rows)} finished run(s) over {budgets} budget(s); a 5-parameter law "
                         f"needs at least {MIN_RUNS} runs over at least 2 budgets (an IsoFLOP plan: 3+ sizes at each "
                         "of 2+ budgets, tools/scaling_plan.py)")


def fit_families(df, families=None, echo=print, **kw) -> Dict[str, FamilyFit]:
    """Fit the named families (an error if one has too few runs or budgets), or every family with at least
    MIN_RUNS finished runs (the others are reported and skipped)."""
    loss_col = kw.get("loss_col", "valid_loss")
    if families:
        for family in families:
            check_enough_runs(df, family, loss_col)
    else:
        families = []
        for family in sorted(usable(df, loss_col)["family"].unique()):
            try:
                check_enough_runs(df, family, loss_col)
                families.append(family)
            except ValueError as exc:
                echo(f"skipping {exc}")
        if not families:
            raise ValueError(f"no family has {MIN_RUNS} finished runs over 2+ budgets")
    return {f: fit_family(df, f, **kw) for f in families}

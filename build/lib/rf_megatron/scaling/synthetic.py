"""Runs drawn from a chosen law: the tests' ground truth and the power analysis's simulations.

A design is IsoFLOP curves (C = 6 N D) around each budget's compute-optimal N; losses get log-normal noise
(`noise` is the standard deviation of log L, so 0.02 is about 2%).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .fit import LawFit


def isoflop_design(law: LawFit, budgets: Sequence[float], sizes_per_budget: int = 9, span_decades: float = 1.0,
                   noise: float = 0.0, seed=0):
    """(N, D, L): `sizes_per_budget` sizes per budget, log-spaced over +-span_decades around its optimum."""
    rng = np.random.default_rng(seed)
    g, a = law.derived()["G"], law.derived()["a"]
    N, D = [], []
    for c in budgets:
        n_opt = g * (c / 6) ** a
        for n in n_opt * np.logspace(-span_decades, span_decades, sizes_per_budget):
            N.append(n)
            D.append(c / (6 * n))
    N, D = np.array(N), np.array(D)
    return N, D, law.predict(N, D) * np.exp(rng.normal(0, noise, len(N)))


def with_param_saving(law_b: LawFit, saving: float, alpha: Optional[float] = None) -> LawFit:
    """The law of a family that reaches law_b's loss with `saving` fewer parameters: A_a = A_b (1 - s)^alpha."""
    alpha = law_b.alpha if alpha is None else alpha
    return LawFit(E=law_b.E, A=law_b.A * (1 - saving) ** alpha, B=law_b.B, alpha=alpha, beta=law_b.beta)


def two_family_runs(law_b: LawFit, saving: float, noise: float, seed, alpha_a: Optional[float] = None,
                    budgets: Sequence[float] = (1e18, 3e18, 1e19, 3e19, 1e20), sizes_per_budget: int = 7,
                    span_decades: float = 1.0, design: Optional[dict] = None):
    """A runs table (scaling_collect's columns) of family b (law_b) and family a (`saving` fewer parameters at
    equal loss), both on b's IsoFLOP design (or on `design`, {"N", "D", "budget"} lists: real runs' sizes),
    independent noise per family."""
    import pandas as pd

    law_a = with_param_saving(law_b, saving, alpha_a)
    if design:
        N, D = np.asarray(design["N"], float), np.asarray(design["D"], float)
        budget = np.asarray(design["budget"], float)
    else:
        N, D, _ = isoflop_design(law_b, budgets, sizes_per_budget, span_decades)
        budget = np.round(6 * N * D, -8)
    frames = []
    for i, (family, law) in enumerate((("a", law_a), ("b", law_b))):
        L = law.predict(N, D) * np.exp(np.random.default_rng([*np.atleast_1d(seed), i]).normal(0, noise, len(N)))
        frames.append(pd.DataFrame({"family": family, "N_total": N, "D": D, "valid_loss": L, "flops_per_token": 6 * N,
                                    "budget": budget, "C": 6 * N * D, "finished": True}))
    return pd.concat(frames, ignore_index=True)

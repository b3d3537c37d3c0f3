"""Approach-3 fits with bootstrap: the default (screened starts, warm-started replicates) vs Hoffmann et al.'s
full 4500-point grid, side by side on the same tables.

    python bench/scaling_fit_speed.py                       # 2 families x 50 runs, noise 0.5% and 2%
    python bench/scaling_fit_speed.py --runs 100 --noise 0.05

Each table holds two families drawn from a random Chinchilla-form law (one with 15% fewer parameters needed) on
IsoFLOP curves at 5 budgets; both settings fit every family with `--n-boot` replicates (`fit_families`, what
tools/scaling_fit.py runs). Printed per table: wall time of each setting and their ratio, the largest relative
difference of the point estimates (E, A, B, alpha, beta) and of the CI endpoints.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from rf_megatron.scaling.family_fits import fit_families  # noqa: E402
from rf_megatron.scaling.fit import LawFit  # noqa: E402

PARAMS = ("E", "A", "B", "alpha", "beta")


def table(runs_per_family: int, noise: float, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    law_b = LawFit(E=rng.uniform(1.5, 2.5), A=rng.uniform(200, 600), B=rng.uniform(300, 2000),
                   alpha=rng.uniform(0.25, 0.45), beta=rng.uniform(0.25, 0.45))
    law_a = LawFit(E=law_b.E, A=law_b.A * 0.85 ** law_b.alpha, B=law_b.B, alpha=law_b.alpha, beta=law_b.beta)
    g, a = law_b.derived()["G"], law_b.derived()["a"]
    budgets = [1e18, 3e18, 1e19, 3e19, 1e20]
    sizes = runs_per_family // len(budgets)
    frames = []
    for family, law in (("a", law_a), ("b", law_b)):
        C = np.repeat(budgets, sizes)
        N = np.concatenate([g * (c / 6) ** a * np.logspace(-1, 1, sizes) for c in budgets])
        D = C / (6 * N)
        L = law.predict(N, D) * np.exp(rng.normal(0, noise, len(N)))
        frames.append(pd.DataFrame({"name": [f"{family}{i}" for i in range(len(N))], "family": family,
                                    "N_total": N, "D": D, "valid_loss": L, "flops_per_token": 6 * N, "budget": C,
                                    "finished": True}))
    return pd.concat(frames, ignore_index=True)


def timed(df, **kw):
    begin = time.perf_counter()
    fits = fit_families(df, ["a", "b"], n_col="N_total", **kw)
    return time.perf_counter() - begin, fits


def rel(x, y) -> float:
    return abs(x - y) / max(abs(y), 1e-12)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=100, help="runs per table (half per family)")
    p.add_argument("--noise", type=float, nargs="+", default=[0.005, 0.02], help="log-normal loss noise")
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(f"{'noise':>6} {'default s':>10} {'full grid s':>12} {'speed-up':>9} {'max rel diff estimate':>22} "
          f"{'max rel diff CI end':>20}")
    for i, noise in enumerate(a.noise):
        df = table(a.runs // 2, noise, a.seed + i)
        t_new, new = timed(df, n_boot=a.n_boot)
        t_old, old = timed(df, n_boot=a.n_boot, starts="all", boot_starts=8)
        est = max(rel(getattr(new[f].law, k), getattr(old[f].law, k)) for f in new for k in PARAMS)
        ci = max(rel(x, y) for f in new for k in PARAMS
                 for x, y in zip(new[f].boot.ci()[k], old[f].boot.ci()[k]))
        print(f"{noise:>6.3f} {t_new:>10.1f} {t_old:>12.1f} {t_old / t_new:>8.1f}x {est:>22.2e} {ci:>20.2e}")


if __name__ == "__main__":
    main()

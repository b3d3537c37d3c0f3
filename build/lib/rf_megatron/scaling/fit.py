"""Chinchilla approach 3: fit L(N, D) = E + A / N^alpha + B / D^beta to final losses.

As in Hoffmann et al. (2022, appendix D.2): with a = log A, b = log B, e = log E,

    min over (a, b, e, alpha, beta) of  sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i )

with delta = 1e-3, L-BFGS-B (scipy) started from every point of the grid alpha, beta in
{0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25} (4500 starts), keeping the
best, within generous box bounds (`BOUNDS`). The objective is divided by delta (same minimiser, better-scaled gradients) and the
gradient is analytic; tolerances are tight because Besiroglu et al. (2024) traced Chinchilla's
too-narrow intervals to an optimiser that stopped early.

Speed: one start costs ~10 ms (50 points), the full grid ~50 s per family. The default,
`starts=DEFAULT_STARTS` (128), screens the grid instead: for every (alpha, beta) of the grid the (e, a, b)
with the lowest starting objective, then the next-lowest starts overall; measured on 100-run tables
(bench/scaling_fit_speed.py) it finds the same optimum as the full grid (parameters equal to 1e-6)
in 1/40 of the time. `starts="all"` is Hoffmann et al.'s full grid.

Confidence intervals: bootstrap over runs (resample the points with replacement, refit,
percentile interval). Each refit starts from the estimate and the `boot_starts` (default 2) next-best
distinct optima of the fit instead of all 4500 grid points: with resampled data the optimum
moves, but not to another basin (8 optima gave the same CIs to 4 digits at 3x the time);
pass boot_starts="all" to refit from the grid.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
from scipy.optimize import minimize

DELTA = 1e-3
DEFAULT_STARTS = 128  # screened starts of the approach-3 fit (the docstring's "Speed")
DEFAULT_BOOT_STARTS = 2  # optima of the fit, beside the estimate, each bootstrap refit starts from
PARAMS = ("E", "A", "B", "alpha", "beta")


def init_grid() -> np.ndarray:
    """Hoffmann et al.'s initialisation grid, rows (a, b, e, alpha, beta)."""
    exps = np.arange(0.0, 2.01, 0.5)
    es = np.arange(-1.0, 1.01, 0.5)
    abs_ = np.arange(0.0, 25.1, 5.0)
    return np.array([(a, b, e, al, be) for al, be, e, a, b in itertools.product(exps, exps, es, abs_, abs_)])


def _objective(theta, log_n, log_d, log_l, delta):
    """(sum Huber(LSE - log L) / delta, gradient) for theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    t1, t2 = a - alpha * log_n, b - beta * log_d
    top = np.maximum(np.maximum(t1, t2), e)
    w1, w2, w3 = np.exp(t1 - top), np.exp(t2 - top), np.exp(e - top)
    total = w1 + w2 + w3
    r = top + np.log(total) - log_l
    abs_r = np.abs(r)
    small = abs_r <= delta
    value = np.where(small, 0.5 * r * r, delta * (abs_r - 0.5 * delta)).sum() / delta
    dr = np.where(small, r / delta, np.sign(r)) / total  # d value / d LSE, over the softmax denominator
    g1, g2 = dr * w1, dr * w2
    return value, np.array([g1.sum(), g2.sum(), dr @ w3, -(g1 @ log_n), -(g2 @ log_d)])


# (a, b, e, alpha, beta): far outside any sensible law; they only stop degenerate data (a few
# runs, a flat loss) from sending the optimiser off to infinity for thousands of iterations
BOUNDS = [(-20.0, 60.0), (-20.0, 60.0), (-10.0, 5.0), (0.0, 5.0), (0.0, 5.0)]


@contextlib.contextmanager
def single_threaded_blas():
    """scipy's L-BFGS-B calls BLAS on 5x20 matrices; OpenBLAS threads then only spin (measured:
    20-40x slower on a loaded 2-core machine). threadpoolctl, when installed, pins them to one."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _minimise(start, args):
    res = minimize(_objective, start, args=args, jac=True, method="L-BFGS-B", bounds=BOUNDS,
                   options={"maxiter": 2000, "ftol": 1e-14, "gtol": 1e-10, "maxcor": 20})
    return res.fun, res.x


@dataclass
class LawFit:
    """A fitted L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = float("nan")
    n_points: int = 0
    optima: List[np.ndarray] = field(default_factory=list, repr=False)  # best distinct optima (theta)

    @classmethod
    def from_theta(cls, theta, **kw):
        a, b, e, alpha, beta = theta
        return cls(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha),
                   beta=float(beta), **kw)

    @property
    def theta(self) -> np.ndarray:
        return np.array([np.log(self.A), np.log(self.B), np.log(self.E), self.alpha, self.beta])

    def predict(self, N, D):
        N, D = np.asarray(N, float), np.asarray(D, float)
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    def params(self) -> Dict[str, float]:
        return {k: getattr(self, k) for k in PARAMS}

    def derived(self) -> Dict[str, float]:
        """Compute-optimal allocation under C = 6 N D (Hoffmann et al. eq. 4): N_opt = G (C/6)^a,
        D_opt = (C/6)^b / G with a = beta/(alpha+beta), b = alpha/(alpha+beta)."""
        s = self.alpha + self.beta
        if not (self.alpha > 0 and self.beta > 0):  # an exponent at its 0 bound (a bootstrap replicate can be)
            return {"a": self.beta / s if s > 0 else float("nan"), "b": self.alpha / s if s > 0 else float("nan"),
                    "G": float("nan")}
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s) if self.B > 0 else float("nan")
        return {"a": self.beta / s, "b": self.alpha / s, "G": g}

    def param_for_loss(self, loss, D):
        """N with L(N, D) = loss (nan when loss is out of reach at this D)."""
        gap = np.asarray(loss, float) - self.E - self.B / np.asarray(D, float) ** self.beta
        if not self.alpha > 0:  # the loss does not depend on N: no N reaches another loss
            return np.full(np.shape(gap), np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(gap > 0, (self.A / gap) ** (1.0 / self.alpha), np.nan)

    def data_for_loss(self, loss, N):
        """D with L(N, D) = loss (nan when loss is out of reach at this N)."""
        gap = np.asarray(loss, float) - self.E - self.A / np.asarray(N, float) ** self.alpha
        if not self.beta > 0:  # the loss does not depend on D
            return np.full(np.shape(gap), np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(gap > 0, (self.B / gap) ** (1.0 / self.beta), np.nan)

    def at_bounds(self) -> List[str]:
        """Parameters stuck at a box bound: the data do not pin them (too few or too similar runs)."""
        names = ("A", "B", "E", "alpha", "beta")  # theta order
        return [n for n, t, (lo, hi) in zip(names, self.theta, BOUNDS) if min(t - lo, hi - t) < 1e-6]

    def as_dict(self) -> Dict[str, float]:
        return {**self.params(), **self.derived(), "objective": self.objective, "n_points": self.n_points,
                "at_bounds": self.at_bounds()}


def _prepare(N, D, L):
    N, D, L = (np.asarray(x, float) for x in (N, D, L))
    ok = np.isfinite(N) & np.isfinite(D) & np.isfinite(L) & (N > 0) & (D > 0) & (L > 0)
    if ok.sum() < 2:
        raise ValueError(f"need finite positive points to fit, got {int(ok.sum())}")
    return np.log(N[ok]), np.log(D[ok]), np.log(L[ok])


def _screen(grid, args, k):
    """Indices of k starts: the best (e, a, b) per (alpha, beta), then the best of the rest."""
    first = np.array([_objective(t, *args)[0] for t in grid])
    order = np.argsort(first, kind="stable")
    chosen, seen = [], set()
    for i in order:
        cell = (grid[i, 3], grid[i, 4])
        if cell not in seen:
            seen.add(cell)
            chosen.append(i)
    taken = set(chosen)
    rest = [i for i in order if i not in taken]
    return np.array((chosen + rest)[:k] if k >= len(chosen) else sorted(chosen, key=lambda i: first[i])[:k])


def fit_law(N, D, L, delta: float = DELTA, starts: Union[str, int, np.ndarray] = "all",
            keep_optima: int = 8) -> LawFit:
    """Approach 3 on points (N_i, D_i, L_i). `starts`: "all" (the grid), an int k (the k grid points
    with the lowest starting objective) or an array of starting thetas."""
    args = (*_prepare(N, D, L), delta)
    if isinstance(starts, np.ndarray):
        grid = np.atleast_2d(starts)
    else:
        grid = init_grid()
        if starts != "all":
            grid = grid[_screen(grid, args, int(starts))]
    with single_threaded_blas():
        results = sorted((_minimise(t, args) for t in grid), key=lambda r: r[0])
    optima: List[np.ndarray] = []
    for _, theta in results:
        if len(optima) >= keep_optima:
            break
        if all(np.abs(theta - o).max() > 1e-3 for o in optima):
            optima.append(theta)
    best_value, best = results[0]
    return LawFit.from_theta(best, objective=float(best_value), n_points=len(args[0]), optima=optima)


@dataclass
class Bootstrap:
    """Bootstrap replicates (rows) of named quantities."""

    names: Sequence[str]
    samples: np.ndarray  # [n_boot, len(names)]

    def ci(self, level: float = 0.95) -> Dict[str, tuple]:
        lo, hi = 50 * (1 - level), 50 * (1 + level)
        out = {}
        for i, name in enumerate(self.names):
            col = self.samples[:, i]
            col = col[np.isfinite(col)]
            out[name] = (float(np.percentile(col, lo)), float(np.percentile(col, hi))) if len(col) else (np.nan, np.nan)
        return out

    def column(self, name) -> np.ndarray:
        return self.samples[:, list(self.names).index(name)]


def bootstrap_law(N, D, L, n_boot: int = 200, seed: int = 0, fit: Optional[LawFit] = None,
                  boot_starts: Union[str, int] = DEFAULT_BOOT_STARTS, delta: float = DELTA):
    """(fit, Bootstrap of E, A, B, alpha, beta, a, b, G, and the replicate LawFits)."""
    N, D, L = (np.asarray(x, float) for x in (N, D, L))
    fit = fit or fit_law(N, D, L, delta, starts=DEFAULT_STARTS)
    if boot_starts == "all":
        starts = "all"
    else:
        others = [o for o in fit.optima if np.abs(o - fit.theta).max() > 1e-3][:int(boot_starts)]
        starts = np.array([fit.theta] + others)
    rng = np.random.default_rng(seed)
    names = list(PARAMS) + ["a", "b", "G"]
    rows, fits = [], []
    for _ in range(n_boot):  # fit_law pins BLAS to one thread
        idx = rng.integers(0, len(N), len(N))
        f = fit_law(N[idx], D[idx], L[idx], delta, starts=starts, keep_optima=1)
        fits.append(f)
        rows.append([*f.params().values(), *f.derived().values()])
    return fit, Bootstrap(names, np.array(rows)), fits

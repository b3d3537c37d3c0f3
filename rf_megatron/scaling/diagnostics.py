"""What a fit cannot tell, said out loud: the checks behind the `warning:` lines of scaling_fit / scaling_compare,
their JSON `warnings` list, and `--strict` (exit 3 when there is any).

- a law parameter at its box bound (point estimate, or in more than `BOOT_AT_BOUND` of the bootstrap fits): the
  runs do not determine it, and what is derived from it (exponents, savings) is an artefact of the bound;
- an IsoFLOP minimum outside the budget's sampled sizes (an extrapolation);
- a run whose loss is far from its family's law (robust z of the log residual above `OUTLIER_Z`: median and MAD,
  so the outlier cannot hide itself by inflating the spread): a diverged or mislabelled run that moves every
  saving (a finite loss of 7.5 among 2.x moved one from 10.3% to 16.6%);
- a compute-optimal search stuck at its bracket (N_opt of a few dozen parameters is the bracket, not an answer);
- a saving whose estimate is undefined while its replicates are not, or undefined in many replicates: its CI
  describes the replicates that had one.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

OUTLIER_Z = 5.0
BOOT_AT_BOUND = 0.05
NAN_REPLICATES = 0.2


def law_warnings(family: str, fit) -> List[str]:
    """Parameters at their bounds (the fit and its bootstrap) and extrapolated IsoFLOP minima of one FamilyFit."""
    out = []
    stuck = fit.law.at_bounds()
    if stuck:
        out.append(f"{family}: {', '.join(stuck)} at the fit's box bounds: the runs do not determine them")
    if fit.boot_laws:
        counts: Dict[str, int] = {}
        for law in fit.boot_laws:
            for name in law.at_bounds():
                counts[name] = counts.get(name, 0) + 1
        for name, count in sorted(counts.items()):
            share = count / len(fit.boot_laws)
            if share > BOOT_AT_BOUND and name not in stuck:
                out.append(f"{family}: {name} at its bound in {100 * share:.0f}% of the bootstrap fits: "
                           "the CIs of what depends on it are unreliable")
    for m in (fit.approach2 or {}).get("no_minimum", []):
        out.append(f"{family}: budget {m['budget']:.3g} gives approach 2 no minimum: {m['why']}")
    for m in (fit.approach2 or {}).get("minima", []):
        if not m["interior"]:
            out.append(f"{family}: the IsoFLOP minimum of budget {m['budget']:.3g} (N={m['N_opt']:.4g}) lies outside "
                       "its sampled sizes: approach 2 extrapolates there")
    degenerate = (fit.approach2 or {}).get("degenerate")
    if degenerate:
        out.append(f"{family}: approach 2's power laws are degenerate, not a result: {'; '.join(degenerate)}")
    return out


def robust_sd(residuals) -> float:
    """1.4826 MAD: the standard deviation of normal residuals, which outliers cannot inflate."""
    r = np.asarray(residuals, float)
    return float(1.4826 * np.median(np.abs(r - np.median(r))))


def robust_z(residuals) -> np.ndarray:
    """(r - median) / robust_sd: a standard score that outliers cannot inflate."""
    r = np.asarray(residuals, float)
    sd = robust_sd(r)
    scale = sd if sd > 0 else max(float(np.std(r)), 1e-12)
    return (r - np.median(r)) / scale


def _family_runs(df, family: str, fit, n_col: str, loss_col: str):
    """(rows, loss, law's prediction) of a family's usable runs."""
    from .family_fits import usable

    rows = usable(df[df["family"] == family], loss_col)
    return rows, rows[loss_col].to_numpy(float), fit.law.predict(rows[n_col].to_numpy(float), rows["D"].to_numpy(float))


LAW_PARAMETERS = 5


def noise_sd(df, fit, loss_col: str) -> float:
    """The robust standard deviation of a family's log residuals, scaled by sqrt(n / (n - 5)) for the five
    parameters the law fitted to the same runs (residuals of 6 runs under a 5-parameter fit are nearly zero
    whatever the noise): its runs' noise level, what tools/scaling_power.py simulates with. nan for n <= 5."""
    _, loss, predicted = _family_runs(df, fit.family, fit, fit.n_col, loss_col)
    n = len(loss)
    if n <= LAW_PARAMETERS:
        return float("nan")
    return robust_sd(np.log(loss) - np.log(predicted)) * float(np.sqrt(n / (n - LAW_PARAMETERS)))


def run_design(df, fit, loss_col: str) -> dict:
    """The (N, D, budget) of a family's usable runs: tools/scaling_power.py simulates studies at these sizes, so
    its interval describes the design scaling_compare was given, not a wider textbook one."""
    rows, _, _ = _family_runs(df, fit.family, fit, fit.n_col, loss_col)
    return {"N": rows[fit.n_col].astype(float).tolist(), "D": rows["D"].astype(float).tolist(),
            "budget": rows["budget"].astype(float).tolist()}


def outlier_warnings(df, fits, n_col: str, loss_col: str, z_max: float = OUTLIER_Z) -> List[str]:
    """Runs whose log loss is more than z_max robust standard deviations from their family's law."""
    out = []
    for family, fit in fits.items():
        rows, loss, predicted = _family_runs(df, family, fit, n_col, loss_col)
        if len(rows) < 5:
            continue
        z = robust_z(np.log(loss) - np.log(predicted))
        names = rows["name"].astype(str).to_numpy() if "name" in rows else np.array([f"#{i}" for i in rows.index])
        for i in np.flatnonzero(np.abs(z) > z_max):
            out.append(f"run {names[i]} ({family}): {loss_col}={loss[i]:.4g}, the law predicts {predicted[i]:.4g} "
                       f"(robust z = {z[i]:+.1f}): diverged or mislabelled? check it or leave it out of the table")
    return out


def compare_warnings(result: dict, fits) -> List[str]:
    """Frontier searches at their bracket and undefined savings of a scaling_compare result."""
    out = []
    for side in ("a", "b"):
        family = result[side]
        if fits[family].frontier(result["reference"]["C"])["at_bound"]:
            out.append(f"{family}: the compute-optimal search at C={result['reference']['C']:.4g} ended at its bracket "
                       f"(N_opt={result['estimate'][f'N_opt_{side}']:.4g}): the law has no optimum in reach there; "
                       "the compute saving and the *_at_b_opt savings are not meaningful")
    for key, share in result.get("nan_fraction", {}).items():
        estimate = result["estimate"].get(key, np.nan)
        if not np.isfinite(estimate) and share < 1:
            out.append(f"{key}: undefined for the fit itself but defined in {100 * (1 - share):.0f}% of the "
                       "replicates: the CI describes those replicates, not this fit")
        elif np.isfinite(estimate) and share > NAN_REPLICATES:
            out.append(f"{key}: undefined in {100 * share:.0f}% of the replicates: its CI covers only the rest")
    return out


def report(warnings: List[str], echo=print) -> None:
    for line in warnings:
        echo(f"warning: {line}")

#!/usr/bin/env python
"""How many runs per family resolve a 10-20% parameter saving at your noise level (simulated from a law).

    python tools/scaling_power.py --fit fit.json --family vanilla [--savings 0.1 0.2] [--sizes 3 5 7 9]
    python tools/scaling_power.py --law 1.69 406.4 410.7 0.34 0.28 --noise 0.02 --budgets 1e18 3e18 1e19 3e19

The law, its noise (robust sd of log residuals) and the IsoFLOP budgets come from a scaling_fit.py JSON, or are
given. For each number of sizes per budget and each planted saving, --sims two-family studies are simulated and
fitted jointly, as scaling_compare.py does; the table gives the 95% half-width and the power (the share of
studies whose 95% interval excludes 0), and the fewest runs per family reaching --power. With --fit, the first rows
simulate the fitted runs' own sizes ("your runs"): the interval scaling_compare can give on those runs, while the
other rows are designs spanning +-1 decade of sizes per budget, which resolve far more. Exit 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rf_megatron.scaling.cli_common import write_json  # noqa: E402
from rf_megatron.scaling.fit import LawFit  # noqa: E402


FEW_DOF = 10  # below this many residual degrees of freedom the fit's noise estimate is unreliable


def law_noise_budgets(a):
    """(LawFit, noise, budgets, design) from --fit/--family or --law/--noise/--budgets (explicit flags win); design:
    the fitted runs' sizes (None without --fit, or when --budgets replaces the fit's)."""
    law, noise, budgets, design = None, a.noise, a.budgets, None
    if a.fit:
        report = json.loads(Path(a.fit).read_text())
        families = [k for k, v in report.items() if isinstance(v, dict) and "approach3" in v]
        family = a.family or (families[0] if len(families) == 1 else None)
        if family not in families:
            raise ValueError(f"--family: choose one of {', '.join(families)} in {a.fit}")
        entry = report[family]
        law = LawFit(**{k: entry["approach3"][k] for k in ("E", "A", "B", "alpha", "beta")})
        if noise is None and 0 < entry.get("noise_dof", 99) < FEW_DOF:
            print(f"warning: the fit's noise ({100 * entry['noise_log_sd']:.2f}%) rests on {entry['noise_dof']} residual "
                  "degree(s) of freedom (runs - 5 law parameters): the law absorbs most of the noise, so it can be "
                  "several times too low and these intervals too narrow; give --noise from repeated runs",
                  file=sys.stderr)
        noise = entry.get("noise_log_sd") if noise is None else noise
        design = None if budgets else entry.get("design")
        budgets = budgets or entry.get("budgets")
    if a.law:
        law = LawFit(**dict(zip(("E", "A", "B", "alpha", "beta"), a.law)))
    if law is None:
        raise ValueError("give --fit FIT.json (from scaling_fit.py) or --law E A B ALPHA BETA")
    if noise is None or not noise > 0:
        raise ValueError("give --noise (the sd of log loss between runs, e.g. 0.02 for ~2%; a fit of 5 runs leaves "
                         "none to estimate it)")
    if not budgets or len(budgets) < 2:
        raise ValueError("give --budgets (two or more FLOP budgets; the fit JSON had none)")
    return law, float(noise), sorted(float(b) for b in budgets), design


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fit", help="scaling_fit.py --out JSON: the law, noise and budgets of a family")
    p.add_argument("--family", help="which family of --fit (needed when it has several)")
    p.add_argument("--law", type=float, nargs=5, metavar=("E", "A", "B", "ALPHA", "BETA"))
    p.add_argument("--noise", type=float, help="sd of log loss (0.02 ~ 2%%); default: the fit's")
    p.add_argument("--budgets", type=float, nargs="+", help="IsoFLOP budgets C; default: the fit's")
    p.add_argument("--sizes", type=int, nargs="+", default=[3, 5, 7, 9], help="sizes per budget to try")
    p.add_argument("--savings", type=float, nargs="+", default=[0.1, 0.2], help="parameter savings to resolve")
    p.add_argument("--sims", type=int, default=20, help="simulated studies per design and saving")
    p.add_argument("--power", type=float, default=0.8, help="target power")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the table as JSON")
    a = p.parse_args(argv)
    from rf_megatron.scaling.power import power_table, runs_needed

    try:
        law, noise, budgets, design = law_noise_budgets(a)
        if a.sims < 3 or min(a.sizes) < 3 or not all(0 < s < 1 for s in a.savings):
            raise ValueError("need --sims >= 3, --sizes >= 3 (a parabola per budget) and 0 < --savings < 1")
    except (ValueError, OSError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"law E={law.E:.4g} A={law.A:.4g} B={law.B:.4g} alpha={law.alpha:.3g} beta={law.beta:.3g}, noise "
          f"{100 * noise:.2f}%, {len(budgets)} budgets, {a.sims} simulated studies per row (joint fit)")
    print("+- is 1.96 sd of the joint fit's saving over studies simulated at this law and noise; scaling_compare's "
          "CI on real runs is a bootstrap over those runs, wider when a family has few (compare the 'your runs' row)"
          if design else "+- is 1.96 sd of the joint fit's saving over studies simulated at this law and noise")
    rows = power_table(law, a.savings, noise, budgets, sorted(set(a.sizes)), a.sims, a.seed, log=print, design=design)
    needed = runs_needed(rows, a.power)
    for saving, runs in needed.items():
        print(f"{100 * saving:.0f}% saving: " + (
            f"{runs} runs per family reach power {a.power} as an IsoFLOP design of {runs // len(budgets)} sizes x "
            f"{len(budgets)} budgets (log-spaced +-1 decade around each budget's optimum)"
            if runs else f"no design tried reaches power {a.power}: add sizes or budgets"))
    if a.out:
        write_json({"law": law.as_dict(), "noise": noise, "budgets": budgets, "rows": rows,
                    "runs_needed": {str(k): v for k, v in needed.items()}, "power": a.power}, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

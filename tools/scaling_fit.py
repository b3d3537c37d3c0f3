#!/usr/bin/env python
"""Fit scaling laws per family of a collected table (tools/scaling_collect.py).

    python tools/scaling_fit.py table.csv --out fit.json --plots plots/ [--families vanilla resformer]

Approach 3 (Hoffmann et al.): L(N, D) = E + A/N^alpha + B/D^beta, Huber (delta 1e-3) on log
residuals, L-BFGS-B from a grid of starts, bootstrap CIs over runs. Approach 2: a parabola in
log N per IsoFLOP budget, N_opt ~ C^a and D_opt ~ C^b with bootstrap CIs (said to be degenerate, not printed as a
result, when 2 budgets, a zero-width interval or a non-positive exponent make it so). Plots: fit_isoflop.png (runs,
law and parabolas per budget, their minima), fit_frontier.png (the extrapolation beyond the runs dashed),
fit_residuals.png. The JSON also gives each family's noise level
(noise_log_sd), which tools/scaling_power.py turns into the number of runs a saving needs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rf_megatron.scaling.cli_common import add_fit_options, finish, fit_kwargs, fmt_ci, write_outputs  # noqa: E402
from rf_megatron.scaling.collect import read_table  # noqa: E402
from rf_megatron.scaling.diagnostics import law_warnings, noise_sd, outlier_warnings, run_design  # noqa: E402
from rf_megatron.scaling.family_fits import clean_table, fit_families  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", help="CSV or Parquet from tools/scaling_collect.py")
    p.add_argument("--families", nargs="*", help="default: every family in the table")
    p.add_argument("--out", help="write the fits as JSON")
    p.add_argument("--plots", help="directory for fit_isoflop.png, fit_frontier.png, fit_residuals.png")
    add_fit_options(p)
    a = p.parse_args(argv)
    try:
        df = clean_table(read_table(a.table), a.loss_col)
        fits = fit_families(df, a.families, **fit_kwargs(a))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = {name: {**f.summary(a.level), "noise_log_sd": noise_sd(df, f, a.loss_col),
                     "design": run_design(df, f, a.loss_col), "noise_dof": f.law.n_points - 5,
                     "budgets": sorted(float(b) for b in df.loc[df["family"] == name, "budget"].unique())}
              for name, f in fits.items()}
    for name, f in fits.items():
        ci = f.boot.ci(a.level)
        print(f"{name} ({f.law.n_points} runs, N = {f.n_col}, {int(100 * a.level)}% bootstrap CI over "
              f"{len(f.boot_laws)} replicates)")
        for k in ("E", "A", "B", "alpha", "beta"):
            print(f"  {k:>5} = {fmt_ci(getattr(f.law, k), ci[k])}")
        print(f"  noise: {100 * report[name]['noise_log_sd']:.2f}% (robust sd of log residuals, x sqrt(n/(n-5)) for the "
              "5 fitted parameters; tools/scaling_power.py: how many runs resolve a saving at this noise)")
        d = f.law.derived()
        print(f"  N_opt ~ C^{fmt_ci(d['a'], ci['a'])}, D_opt ~ C^{fmt_ci(d['b'], ci['b'])} (approach 3, C = 6ND)")
        a2 = f.approach2
        if a2.get("degenerate"):
            print(f"  approach 2: degenerate, no result ({len(a2['minima'])} budget minima; see the warning below)")
        elif "N_opt" in a2:
            print(f"  approach 2: N_opt ~ C^{fmt_ci(a2['N_opt']['exponent'], a2['ci']['N_exponent'])}, "
                  f"D_opt ~ C^{fmt_ci(a2['D_opt']['exponent'], a2['ci']['D_exponent'])} "
                  f"({len(a2['minima'])} budgets)")
        else:
            print(f"  approach 2: {len(a2['minima'])} budget minima (need 2 for a power law)")
    warnings = [w for name, f in fits.items() for w in law_warnings(name, f)]
    warnings += outlier_warnings(df, fits, a.n_col, a.loss_col)
    report["warnings"] = warnings
    write_outputs(report, a, df, fits, "fit_")
    return finish(warnings, a)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Compare two families at equal loss: parameter, data and compute savings of --a over --b.

    python tools/scaling_compare.py table.csv --a resformer --b vanilla --out compare.json --plots plots/

At a reference (N, D) of family b (default: b's best run at its largest budget; or --ref-n/--ref-d
/--budget): parameter saving 1 - N'/N with L_a(N', D) = L_b(N, D); data saving 1 - D'/D with
L_a(N, D') = L_b(N, D); compute saving 1 - C'/C with L*_a(C') = L*_b(C) on the compute-optimal
frontiers. Bootstrap CIs pair the replicate fits of the two families.

--method joint (default): one fit of both families with E, B, alpha, beta shared and A per family
(rf_megatron/scaling/joint_fit.py): the parameter saving is then the same at every scale and its CI several times
narrower; the report says whether an alpha per family fits better (the shared exponent violated). --method
independent: a five-parameter law per family, as scaling_fit.py.

Also reported: the savings refitted without each budget in turn (leave one budget out: is the answer carried by
one budget?), the savings at b's compute-optimal point along C with their bootstrap band (--plots:
compare_savings_vs_scale.png), --tables DIR: savings.csv and savings.tex (booktabs) for a paper, and the diagnostics'
warnings (--strict: exit 3 when there is any).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rf_megatron.scaling.cli_common import add_fit_options, finish, fit_kwargs, fmt_ci, write_outputs  # noqa: E402
from rf_megatron.scaling.collect import read_table  # noqa: E402
from rf_megatron.scaling.compare import (compare, default_reference, frontier_curves, leave_one_budget_out,  # noqa: E402
                                         savings_along_frontier, savings_table)
from rf_megatron.scaling.diagnostics import compare_warnings, law_warnings, outlier_warnings  # noqa: E402
from rf_megatron.scaling.family_fits import clean_table, fit_families, usable  # noqa: E402
from rf_megatron.scaling.fit import fit_law  # noqa: E402
from rf_megatron.scaling.joint_fit import fit_joint, joint_family_fits  # noqa: E402
from rf_megatron.scaling.plots import savings_vs_scale  # noqa: E402


def refit_laws(a):
    """df -> (law of a, law of b), point estimates by the chosen method (leave-one-budget-out refits)."""
    def joint(df):
        point, _ = fit_joint(df, [a.a, a.b], n_col=a.n_col, loss_col=a.loss_col, n_boot=0,
                             starts=10 ** 9 if a.starts == "all" else int(a.starts))
        return point.law(a.a), point.law(a.b)

    def independent(df):
        kw = fit_kwargs(a)
        return tuple(fit_law(*(usable(df[df["family"] == f], a.loss_col)[c].to_numpy(float)
                               for c in (a.n_col, "D", a.loss_col)), starts=kw["starts"]) for f in (a.a, a.b))

    return joint if a.method == "joint" else independent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table")
    p.add_argument("--a", required=True, help="family expected to save (e.g. resformer)")
    p.add_argument("--b", required=True, help="baseline family (e.g. vanilla)")
    p.add_argument("--ref-n", type=float, help="reference N of family b")
    p.add_argument("--ref-d", type=float, help="reference D of family b")
    p.add_argument("--budget", type=float, help="compute budget for the frontier comparison")
    p.add_argument("--out", help="JSON report")
    p.add_argument("--plots", help="directory for compare_isoflop.png, compare_frontier.png, compare_residuals.png "
                                          "(the joint laws) and compare_savings_vs_scale.png")
    p.add_argument("--method", choices=("joint", "independent"), default="joint",
                   help="joint: shared E, B, alpha, beta and A per family (default); independent: a law per family")
    p.add_argument("--tables", help="directory for savings.csv and savings.tex (the estimates with their CIs)")
    add_fit_options(p)
    a = p.parse_args(argv)
    joint = None
    try:
        df = clean_table(read_table(a.table), a.loss_col)
        if a.method == "joint":
            fits, joint = joint_family_fits(df, a.a, a.b, a.n_col, a.loss_col, a.n_boot, a.seed, level=a.level,
                                            starts=10 ** 9 if a.starts == "all" else int(a.starts))
        else:
            fits = fit_families(df, [a.a, a.b], **fit_kwargs(a))
        ref = default_reference(df, a.b, a.n_col, a.loss_col)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.ref_n or a.ref_d:
        ref = {"N": a.ref_n or ref["N"], "D": a.ref_d or ref["D"], "C": ref["C"], "run": None}
    if a.budget:
        ref["C"] = a.budget
    result = compare(fits[a.a], fits[a.b], ref, a.level)
    result["method"] = a.method
    est, ci = result["estimate"], result["ci"]
    if joint:
        result["joint"] = joint
        check = joint["exponent_check"]
        print(f"joint fit ({joint['model']}): parameter saving {fmt_ci(joint['param_saving'], joint['param_saving_ci'])}"
              f" at every scale; alpha_{a.a} - alpha_{a.b} = {fmt_ci(check['alpha_a_minus_alpha_b'], check['ci'])}"
              + (" -> the shared exponent does NOT hold: use --method independent" if check["shared_exponent_violated"]
                 else " (shared exponent consistent)"))
    print(f"{a.a} vs {a.b} (N = {a.n_col}); reference N={ref['N']:.4g}, D={ref['D']:.4g}, C={ref['C']:.4g}"
          + (f" (run {ref['run']})" if ref.get("run") else ""))
    for key in ("param_saving", "data_saving", "compute_saving", "param_saving_at_b_opt", "data_saving_at_b_opt",
                "loss_gap_at_C"):
        lo_hi = ci.get(key, (np.nan, np.nan))
        nan = result["nan_fraction"].get(key, 0.0)
        print(f"  {key:<22} {fmt_ci(est[key], lo_hi)}" + (f"  ({100 * nan:.0f}% of replicates undefined)" if nan else ""))
    print(f"  compute-optimal at C: {a.a} N={est['N_opt_a']:.4g} D={est['D_opt_a']:.4g} L={est['L_opt_a']:.4f}; "
          f"{a.b} N={est['N_opt_b']:.4g} D={est['D_opt_b']:.4g} L={est['L_opt_b']:.4f}")
    budgets = sorted(df["budget"].unique())
    grid = np.geomspace(budgets[0] / 3, budgets[-1] * 10, 30)
    result["frontier"] = frontier_curves(fits, grid)
    result["leave_one_budget_out"] = leave_one_budget_out(df, fits[a.a], fits[a.b], ref, refit_laws(a))
    if result["leave_one_budget_out"]:
        moved = [r["param_saving"] for r in result["leave_one_budget_out"]]
        print(f"  leave one budget out: param_saving from {np.nanmin(moved):.4g} to {np.nanmax(moved):.4g} "
              f"({len(moved)} refits, each without one budget)")
    along = np.geomspace(budgets[0], budgets[-1] * 100, 12)
    result["savings_vs_scale"] = savings_along_frontier(fits[a.a], fits[a.b], along, a.level)
    if a.tables:
        for name in ("savings.csv", "savings.tex"):
            savings_table(result, Path(a.tables) / name)
            print(f"wrote {Path(a.tables) / name}")
    warnings = [w for name, f in fits.items() for w in law_warnings(name, f)]
    warnings += outlier_warnings(df, fits, a.n_col, a.loss_col) + compare_warnings(result, fits)
    if joint and joint["exponent_check"]["shared_exponent_violated"]:
        warnings.append(f"alpha_{a.a} - alpha_{a.b}: its CI excludes 0, the joint model's shared exponent does not "
                        "hold: use --method independent")
    result["warnings"] = warnings
    write_outputs(result, a, df, fits, "compare_")
    if a.plots:
        print(f"wrote {savings_vs_scale(result['savings_vs_scale'], a.a, a.b, Path(a.plots) / 'compare_savings_vs_scale.png')}")
    return finish(warnings, a)


if __name__ == "__main__":
    sys.exit(main())

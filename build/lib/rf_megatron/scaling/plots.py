"""Scaling figures (PNG, matplotlib Agg): the IsoFLOP curves with the law and their minima, the compute-optimal
frontier and the residuals of each family; for a comparison, the savings along the frontier with their band."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np

from .family_fits import FamilyFit, usable

MARKERS = "osD^v<>"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _budget_colors(budgets):
    plt = _plt()
    cmap = plt.get_cmap("viridis")
    budgets = sorted(budgets)
    return {b: cmap(i / max(1, len(budgets) - 1)) for i, b in enumerate(budgets)}


def _log_ticks(ax, axis: str = "x") -> None:
    """Log-axis labels that never collide: 1-2-5 per decade (1 alone past 3 decades, every other decade past 8),
    written short (2e5), and no labels on the minor ticks (matplotlib labels those when a range spans under one
    decade, and they overlap)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = (ax.get_xlim() if axis == "x" else ax.get_ylim())
    decades = np.log10(max(hi, lo * 1.0001) / lo) if lo > 0 else 1.0
    subs = (1.0, 2.0, 5.0) if decades <= 3 else (1.0,)
    target = getattr(ax, f"{axis}axis")
    target.set_major_locator(LogLocator(base=100.0 if decades > 8 else 10.0, subs=subs))
    target.set_major_formatter(FuncFormatter(_short))
    target.set_minor_formatter(NullFormatter())


def _short(value, _pos=None) -> str:
    """2e5 for 200000, 1.5e9 for 1.5e9: tick labels a few characters long."""
    if value <= 0:
        return ""
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def _budget_legend(ax, colors) -> None:
    """Which colour is which budget (a legend of patches, beside the families' marker legend)."""
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=f"C={b:.2g}") for b, c in colors.items()]
    ax.add_artist(ax.legend(handles=handles, fontsize=7, loc="upper right", title="budget", title_fontsize=7))


def residuals(df, fits: Dict[str, FamilyFit], out, loss_col="valid_loss") -> Path:
    """Per family: 100 x log(loss / law) per run vs N (colour: budget). Structure here (a trend with N or with
    the budget) says the functional form misses something; a lone far point is an outlier (diagnostics.py)."""
    plt = _plt()
    rows = usable(df, loss_col)
    colors = _budget_colors(rows["budget"].unique())
    fig, axes = plt.subplots(1, max(1, len(fits)), figsize=(5.5 * max(1, len(fits)), 4), squeeze=False, sharey=True)
    for ax, (name, fit) in zip(axes[0], fits.items()):
        fam = rows[rows["family"] == name]
        r = 100 * np.log(fam[loss_col].to_numpy(float) / fit.law.predict(fam[fit.n_col], fam["D"]))
        ax.scatter(fam[fit.n_col], r, c=[colors[b] for b in fam["budget"]], zorder=3)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        _log_ticks(ax)
        ax.set_xlabel(f"parameters ({fit.n_col})")
        ax.set_title(f"{name}: residuals of the approach-3 law", fontsize=10)
        _budget_legend(ax, colors)
    axes[0][0].set_ylabel("100 x log(loss / law)  (~ % off)")
    return _save(fig, out)


def savings_vs_scale(curves: Dict[str, Dict[str, list]], a: str, b: str, out, level: float = 0.95) -> Path:
    """The savings of a over b at b's compute-optimal point of each budget C, with the bootstrap band
    (`compare.savings_along_frontier`): does the saving grow, hold or shrink with scale?"""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    C = np.asarray(curves["C"])
    for key, label in (("param_saving_at_b_opt", "parameter saving"), ("data_saving_at_b_opt", "data saving")):
        line, = ax.plot(C, 100 * np.asarray(curves[key], float), label=label)
        lo, hi = (100 * np.asarray(x, float) for x in zip(*curves[f"{key}_ci"]))
        ax.fill_between(C, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(f"training FLOPs C (at {b}'s compute-optimal point)")
    ax.set_ylabel(f"saving of {a} over {b} (%)")
    ax.set_title(f"savings vs scale ({int(100 * level)}% bootstrap band)")
    ax.legend(fontsize=8)
    return _save(fig, out)


def isoflop_curves(df, fits: Dict[str, FamilyFit], out, loss_col="valid_loss") -> Path:
    """Per family, loss vs N on each IsoFLOP budget (colour): the runs, the approach-3 law along the budget
    L(N, C / F(N)) (solid) with its minimum (diamond), the approach-2 parabola in log N (dashed) and its minimum
    (star; hollow when it lies outside the sampled sizes). Every budget gets a minimum marker: the law's always
    exists, the parabola's only with 3 sizes and upward curvature."""
    plt = _plt()
    rows = usable(df, loss_col)
    colors = _budget_colors(rows["budget"].unique())
    fig, axes = plt.subplots(1, max(1, len(fits)), figsize=(5.5 * max(1, len(fits)), 4.5), squeeze=False,
                             sharey=True)
    for ax, (name, fit) in zip(axes[0], fits.items()):
        fam = rows[rows["family"] == name]
        for budget, g in fam.groupby("budget"):
            x = np.log(g[fit.n_col].to_numpy(float))
            ax.scatter(np.exp(x), g[loss_col], color=colors[budget], zorder=3)
            n = np.geomspace(np.exp(x.min()) / 1.5, np.exp(x.max()) * 1.5, 60)
            ax.plot(n, fit.law.predict(n, budget / np.array([fit.flops_of_n(v) for v in n])), "-",
                    color=colors[budget], lw=1)
            law_min = fit.frontier(budget)
            ax.scatter([law_min["N_opt"]], [law_min["L_opt"]], marker="D", s=45, zorder=4, facecolors="none",
                       edgecolors=[colors[budget]], linewidths=1.5)
            if len(np.unique(x)) >= 3:
                coeffs = np.polyfit(x, g[loss_col].to_numpy(float), 2)
                xs = np.linspace(x.min() - 0.2, x.max() + 0.2, 60)
                ax.plot(np.exp(xs), np.polyval(coeffs, xs), "--", color=colors[budget], lw=0.8)
        for m in fit.approach2.get("minima", []):
            c = colors.get(m["budget"], "k")
            # explicit face and edge colours: `color="none"` with an edgecolor drew nothing at all
            ax.scatter([m["N_opt"]], [m["L_opt"]], marker="*", s=180, zorder=5, linewidths=1.2,
                       facecolors=[c] if m["interior"] else "none", edgecolors="k" if m["interior"] else [c])
        ax.set_xscale("log")
        _log_ticks(ax)
        ax.set_title(f"{name}: IsoFLOP curves (solid: approach-3 law, diamond: its\nminimum; dashed: parabola, "
                     "star: its minimum, hollow outside the runs)", fontsize=9)
        ax.set_xlabel(f"parameters ({fit.n_col})")
        _budget_legend(ax, colors)
    axes[0][0].set_ylabel(loss_col)
    return _save(fig, out)


def frontier(df, fits: Dict[str, FamilyFit], out, loss_col="valid_loss") -> Path:
    """N_opt(C) and L*(C): approach-2 minima (points) and the approach-3 frontier (lines: solid over the budgets
    the runs cover, dashed and shaded where it extrapolates)."""
    plt = _plt()
    rows = usable(df, loss_col)
    budgets = sorted(rows["budget"].unique())
    grid = np.geomspace(budgets[0] / 3, budgets[-1] * 10, 40) if budgets else np.array([])
    inside = (grid >= budgets[0] * (1 - 1e-9)) & (grid <= budgets[-1] * (1 + 1e-9)) if budgets else grid > 0
    fig, (ax_n, ax_l) = plt.subplots(1, 2, figsize=(11, 4.5))
    for k, (name, fit) in enumerate(fits.items()):
        pts = [fit.frontier(c) for c in grid]
        n_opt, l_opt = np.array([p["N_opt"] for p in pts]), np.array([p["L_opt"] for p in pts])
        line, = ax_n.plot(grid[inside], n_opt[inside], label=f"{name} (approach 3)")
        ax_n.plot(grid, np.where(inside, np.nan, n_opt), "--", color=line.get_color(), lw=1)
        minima = fit.approach2.get("minima", [])
        if minima:
            ax_n.scatter([m["budget"] for m in minima], [m["N_opt"] for m in minima], color=line.get_color(),
                         marker=MARKERS[k % len(MARKERS)], label=f"{name} (approach 2)")
        ax_l.plot(grid[inside], l_opt[inside], color=line.get_color(), label=f"{name} L*(C)")
        ax_l.plot(grid, np.where(inside, np.nan, l_opt), "--", color=line.get_color(), lw=1)
        fam = rows[rows["family"] == name]
        ax_l.scatter(fam["C"], fam[loss_col], color=line.get_color(), s=12, alpha=0.6,
                     marker=MARKERS[k % len(MARKERS)])
    for ax in (ax_n, ax_l):
        ax.set_xscale("log")
        if budgets:  # where the runs end: beyond, the law extrapolates
            for lo, hi in ((grid[0], budgets[0]), (budgets[-1], grid[-1])):
                ax.axvspan(lo, hi, color="0.85", alpha=0.5, lw=0, zorder=0)
            ax.axvline(budgets[-1], color="0.4", ls=":", lw=1, label="largest budget run (dashed: extrapolated)")
        _log_ticks(ax)
        ax.set_xlabel("training FLOPs C")
        ax.legend(fontsize=8)
    ax_n.set_yscale("log")
    _log_ticks(ax_n, "y")
    ax_n.set_ylabel("compute-optimal N")
    ax_l.set_ylabel(f"{loss_col} (points: runs)")
    ax_n.set_title("compute-optimal model size")
    ax_l.set_title("compute-optimal loss frontier")
    return _save(fig, out)


def all_plots(df, fits: Dict[str, FamilyFit], out_dir, loss_col="valid_loss", prefix: str = "") -> List[Path]:
    """The three figures of a set of fits; `prefix` ("fit_", "compare_") keeps the fit's and the comparison's
    figures apart in a shared folder (their laws differ: independent vs joint)."""
    out_dir = Path(out_dir)
    return [isoflop_curves(df, fits, out_dir / f"{prefix}isoflop.png", loss_col),
            frontier(df, fits, out_dir / f"{prefix}frontier.png", loss_col),
            residuals(df, fits, out_dir / f"{prefix}residuals.png", loss_col)]


def _save(fig, out) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    _plt().close(fig)
    return out

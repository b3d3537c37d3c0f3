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
    L(N, C / F(N)) (solid), the approach-2 parabola in log N (dashed) and its minimum (star; hollow when it lies
    outside the sampled sizes). One figure for what used to be loss_vs_n.png and isoflop.png."""
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
            if len(np.unique(x)) >= 3:
                coeffs = np.polyfit(x, g[loss_col].to_numpy(float), 2)
                xs = np.linspace(x.min() - 0.2, x.max() + 0.2, 60)
                ax.plot(np.exp(xs), np.polyval(coeffs, xs), "--", color=colors[budget], lw=0.8)
        for m in fit.approach2.get("minima", []):
            c = colors.get(m["budget"], "k")
            ax.scatter([m["N_opt"]], [m["L_opt"]], marker="*", s=160, zorder=4, edgecolor=c if not m["interior"] else "k",
                       color=c if m["interior"] else "none")
        ax.set_xscale("log")
        ax.set_title(f"{name}: IsoFLOP curves (solid: approach-3 law,\ndashed: parabola, star: its minimum)",
                     fontsize=10)
        ax.set_xlabel(f"parameters ({fit.n_col})")
        _budget_legend(ax, colors)
    axes[0][0].set_ylabel(loss_col)
    return _save(fig, out)


def frontier(df, fits: Dict[str, FamilyFit], out, loss_col="valid_loss") -> Path:
    """N_opt(C) and L*(C): approach-2 minima (points) and the approach-3 frontier (lines)."""
    plt = _plt()
    rows = usable(df, loss_col)
    budgets = sorted(rows["budget"].unique())
    grid = np.geomspace(budgets[0] / 3, budgets[-1] * 10, 40) if budgets else np.array([])
    fig, (ax_n, ax_l) = plt.subplots(1, 2, figsize=(11, 4.5))
    for k, (name, fit) in enumerate(fits.items()):
        pts = [fit.frontier(c) for c in grid]
        line, = ax_n.plot(grid, [p["N_opt"] for p in pts], label=f"{name} (approach 3)")
        minima = fit.approach2.get("minima", [])
        if minima:
            ax_n.scatter([m["budget"] for m in minima], [m["N_opt"] for m in minima], color=line.get_color(),
                         marker=MARKERS[k % len(MARKERS)], label=f"{name} (approach 2)")
        ax_l.plot(grid, [p["L_opt"] for p in pts], color=line.get_color(), label=f"{name} L*(C)")
        fam = rows[rows["family"] == name]
        ax_l.scatter(fam["C"], fam[loss_col], color=line.get_color(), s=12, alpha=0.6,
                     marker=MARKERS[k % len(MARKERS)])
    for ax in (ax_n, ax_l):
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs C")
        ax.legend(fontsize=8)
    ax_n.set_yscale("log")
    ax_n.set_ylabel("compute-optimal N")
    ax_l.set_ylabel(f"{loss_col} (points: runs)")
    ax_n.set_title("compute-optimal model size")
    ax_l.set_title("compute-optimal loss frontier")
    return _save(fig, out)


def all_plots(df, fits: Dict[str, FamilyFit], out_dir, loss_col="valid_loss") -> List[Path]:
    out_dir = Path(out_dir)
    return [isoflop_curves(df, fits, out_dir / "isoflop.png", loss_col),
            frontier(df, fits, out_dir / "frontier.png", loss_col),
            residuals(df, fits, out_dir / "residuals.png", loss_col)]


def _save(fig, out) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    _plt().close(fig)
    return out

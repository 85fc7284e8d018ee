"""Plots of the report (seaborn on matplotlib's Agg backend), one PNG and one SVG file each.

- ``accuracy_under_attack``: accuracy vs L_attack, one line per defense configuration, one facet
  per dataset (rows) and norm (columns) - the paper's Figs. 3 and 4. Where a run faced several
  attacks of one norm, the line is their per-sample worst case.
- ``certified_accuracy``: certified accuracy vs threshold T, one line per configuration, one facet
  per dataset and norm - Fig. 2.
- ``robust_precision_recall``: robust precision and recall vs L_attack at each T (line style),
  one line per configuration and T, one facet row per dataset and attack - Fig. 5.
- ``cost``: training and evaluation seconds per configuration, one facet per dataset.

Shaded bands are 95% Clopper-Pearson intervals. Lines differ in colour, marker and dash so the
figures stay readable when printed in black and white.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from bench.metrics import PRECISION_THRESHOLDS, WORST_CASE  # noqa: E402
from bench.types import CLEAN  # noqa: E402
from bench.reports.labels import FLAG, NORM_NAMES, config_order  # noqa: E402

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
DASHES = ["-", "--", "-.", ":"]
FACET_WIDTH, FACET_HEIGHT = 4.2, 3.2


@dataclass
class Plot:
    """One written figure: ``name`` (file stem), a title, a caption and its two files."""

    name: str
    title: str
    caption: str
    png: Path
    svg: Path
    dpi: int = 150


def median_perturbation(table: pd.DataFrame, styles: dict[str, dict]) -> Figure | None:
    """Median minimal perturbation per configuration and attack, one facet per dataset and norm
    (only attacks that broke at least half of the points have a finite median)."""
    if table.empty or "median_perturbation" not in table:
        return None
    medians = table[table.attack != WORST_CASE].drop_duplicates(["run_id", "attack", "norm"])
    medians = medians[np.isfinite(medians.median_perturbation.astype(float))]
    if medians.empty:
        return None
    datasets, norms = sorted(medians.dataset.unique()), sorted(medians.norm.unique())
    figure, axes = _grid(datasets, norms)
    for (dataset, norm), ax in axes.items():
        facet = medians[(medians.dataset == dataset) & (medians.norm == norm)]
        if facet.empty:
            figure.delaxes(ax)
            continue
        labels = [f"{config}\n{attack}" for config, attack in zip(facet.config, facet.attack)]
        ax.barh(labels, facet.median_perturbation.astype(float), color=[styles[c]["color"] for c in facet.config])
        ax.invert_yaxis()
        ax.set_title(f"{dataset}, {NORM_NAMES.get(norm, norm)}", fontsize="medium")
        ax.set_xlabel(f"median minimal perturbation ({NORM_NAMES.get(norm, norm)}, pixel units)")
    return figure


def _theme() -> None:
    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.25,
                  rc={"lines.linewidth": 1.8, "lines.markersize": 6, "svg.hashsalt": "bench-report"})


def _styles(names: Sequence[str]) -> dict[str, dict]:
    """A fixed colour, marker and dash per configuration, the same in every figure."""
    palette = sns.color_palette("colorblind", max(len(names), 1))
    return {name: {"color": palette[i % len(palette)], "marker": MARKERS[i % len(MARKERS)],
                   "linestyle": DASHES[(i // len(palette)) % len(DASHES)] if len(names) > len(palette) else "-"}
            for i, name in enumerate(names)}


def _grid(rows: list[str], columns: list[str]) -> tuple[Figure, dict[tuple[str, str], plt.Axes]]:
    figure, axes = plt.subplots(len(rows), len(columns), figsize=(FACET_WIDTH * len(columns), FACET_HEIGHT * len(rows)),
                                squeeze=False)
    return figure, {(r, c): axes[i][j] for i, r in enumerate(rows) for j, c in enumerate(columns)}


def _legend(figure: Figure, handles: list[Line2D], title: str) -> None:
    longest = max((len(h.get_label()) for h in handles), default=10)
    per_column = 0.6 + 0.085 * longest  # inches one legend entry needs at this font size
    columns = max(1, min(len(handles), int(figure.get_figwidth() // per_column)))
    legend = figure.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=columns, title=title,
                           frameon=False)
    for text in legend.get_texts():
        if FLAG in text.get_text():
            text.set_color("#c00000")
            text.set_fontweight("bold")


def _line(ax: plt.Axes, data: pd.DataFrame, x: str, y: str, low: str | None, high: str | None, style: dict,
          linestyle: str | None = None) -> None:
    data = data.sort_values(x)
    sns.lineplot(data=data, x=x, y=y, ax=ax, color=style["color"], marker=style["marker"],
                 linestyle=linestyle or style["linestyle"], errorbar=None, legend=False)
    if low and high and data[low].notna().any():
        ax.fill_between(data[x], data[low].astype(float), data[high].astype(float), color=style["color"], alpha=0.12,
                        linewidth=0)


def _handle(label: str, style: dict, linestyle: str | None = None) -> Line2D:
    return Line2D([], [], color=style["color"], marker=style["marker"], linestyle=linestyle or style["linestyle"], label=label)


def _proportion_axis(ax: plt.Axes, ylabel: str) -> None:
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel(ylabel)


def accuracy_under_attack(table: pd.DataFrame, styles: dict[str, dict]) -> Figure | None:
    """Accuracy vs L_attack per dataset and norm (worst case over attacks where a run has several)."""
    if table.empty:
        return None
    per_norm = table.groupby(["run_id", "norm"]).attack.transform(lambda a: (a == WORST_CASE).any())
    lines = table[(table.attack == WORST_CASE) | ~per_norm]
    datasets, norms = sorted(lines.dataset.unique()), sorted(lines.norm.unique())
    figure, axes = _grid(datasets, norms)
    for (dataset, norm), ax in axes.items():
        facet = lines[(lines.dataset == dataset) & (lines.norm == norm)]
        if facet.empty:
            figure.delaxes(ax)
            continue
        for config, data in facet.groupby("config", sort=False):
            _line(ax, data, "epsilon", "accuracy", "ci_low", "ci_high", styles[config])
        attacks = sorted(set(table[(table.dataset == dataset) & (table.norm == norm)].attack) - {WORST_CASE})
        ax.set_title(f"{dataset}, {NORM_NAMES.get(norm, norm)}: {', '.join(attacks)}", fontsize="medium")
        ax.set_xlabel(f"L_attack ({NORM_NAMES.get(norm, norm)}, pixel units)")
        _proportion_axis(ax, "accuracy")
    present = [c for c in styles if c in set(lines.config)]
    _legend(figure, [_handle(c, styles[c]) for c in present], "configuration")
    return figure


def certified_accuracy(table: pd.DataFrame, styles: dict[str, dict]) -> Figure | None:
    """Certified accuracy vs threshold T on clean inputs, per dataset and norm."""
    clean = table[table.attack == CLEAN] if not table.empty else table
    if clean.empty:
        return None
    # stop two grid steps after the last threshold that any configuration certifies
    grid = sorted(set(clean.threshold))
    positive = [t for t in grid if (clean[clean.threshold == t].certified_accuracy > 0).any()]
    last = grid.index(positive[-1]) if positive else 0
    clean = clean[clean.threshold <= grid[min(last + 2, len(grid) - 1)]]
    facets = sorted(set(zip(clean.dataset, clean.norm)))
    figure, axes = _grid(["all"], [f"{d}\x1f{n}" for d, n in facets])
    for (_, key), ax in axes.items():
        dataset, norm = key.split("\x1f")
        facet = clean[(clean.dataset == dataset) & (clean.norm == norm)]
        for config, data in facet.groupby("config", sort=False):
            _line(ax, data, "threshold", "certified_accuracy", "certified_accuracy_ci_low", "certified_accuracy_ci_high",
                  styles[config])
        ax.set_title(f"{dataset}, {NORM_NAMES.get(norm, norm)} certificates", fontsize="medium")
        ax.set_xlabel("threshold T")
        _proportion_axis(ax, "certified accuracy")
    present = [c for c in styles if c in set(clean.config)]
    _legend(figure, [_handle(c, styles[c]) for c in present], "configuration")
    return figure


def robust_precision_recall(table: pd.DataFrame, styles: dict[str, dict],
                            thresholds: Sequence[float] = PRECISION_THRESHOLDS) -> Figure | None:
    """Robust precision and recall vs L_attack at each T, per dataset and attack."""
    if table.empty or not (table.attack != CLEAN).any():
        return None
    chosen = [t for t in sorted(set(table.threshold)) if any(math.isclose(t, w, abs_tol=1e-9) for w in thresholds)]
    rows = table[(table.attack != CLEAN) & table.threshold.isin(chosen)]
    if rows.empty:
        return None
    facets = sorted(set(zip(rows.dataset, rows.attack)))
    metrics = {"robust_precision": "robust precision", "robust_recall": "robust recall"}
    figure, axes = _grid([f"{d}\x1f{a}" for d, a in facets], list(metrics))
    dashes = {t: DASHES[i % len(DASHES)] for i, t in enumerate(chosen)}
    for (key, metric), ax in axes.items():
        dataset, attack = key.split("\x1f")
        facet = rows[(rows.dataset == dataset) & (rows.attack == attack)]
        drawn = False
        for (config, threshold), data in facet.groupby(["config", "threshold"], sort=False):
            data = data[data[metric].notna()]
            if not data.empty:
                _line(ax, data, "epsilon", metric, f"{metric}_ci_low", f"{metric}_ci_high", styles[config],
                      dashes[threshold])
                drawn = True
        if not drawn:  # precision is undefined where nothing is certified
            ax.text(0.5, 0.5, "no input certified at " + ", ".join(f"T={t:g}" for t in chosen), transform=ax.transAxes,
                    ha="center", va="center", color="0.35")
        norm = facet.attack_norm.iloc[0] if len(facet) else ""
        ax.set_title(f"{dataset}, {attack}: {metrics[metric]}", fontsize="medium")
        ax.set_xlabel(f"L_attack ({NORM_NAMES.get(norm, norm)}, pixel units)")
        _proportion_axis(ax, metrics[metric])
    handles = [_handle(f"{c}, T={t:g}", styles[c], dashes[t])
               for c in styles if c in set(rows.config) for t in chosen]
    _legend(figure, handles, "configuration, threshold")
    return figure


def cost(table: pd.DataFrame, styles: dict[str, dict]) -> Figure | None:
    """Training and evaluation seconds per configuration (log scale when they span 100x)."""
    if table.empty:
        return None
    columns = [c for c in ("train_seconds", "eval_seconds") if c in table]
    if not columns:
        return None
    # A configuration evaluated by several runs (e.g. one per norm) trained once: training is the
    # time its model took to train (also when every run loaded it from a checkpoint), evaluation
    # the sum over its runs.
    if "model_train_seconds" in table:  # unknown when the run that trained the model is not in the stores
        table = table.assign(train_seconds=table.model_train_seconds)
    trained = table.assign(_reused=table.reused_checkpoint.map(lambda v: v is True))
    trained = trained.sort_values("_reused", kind="stable").groupby(["dataset", "config"], sort=False)
    summary = trained.first()[[c for c in columns if c != "eval_seconds"]]
    if "eval_seconds" in columns:
        summary["eval_seconds"] = trained.eval_seconds.sum(min_count=1)
    long = summary.reset_index().melt(id_vars=["dataset", "config"], value_vars=columns, var_name="phase",
                                      value_name="seconds")
    long["phase"] = long.phase.map({"train_seconds": "training", "eval_seconds": "evaluation (attacks, predict, certify)"})
    long = long.dropna(subset=["seconds"])
    if long.empty:
        return None
    datasets = sorted(long.dataset.unique())
    height = max(2.2, 0.55 * long.groupby("dataset").config.nunique().max() + 1.2)
    figure, axes = plt.subplots(1, len(datasets), figsize=(FACET_WIDTH * 1.3 * len(datasets), height), squeeze=False)
    phases = sorted(long.phase.unique(), reverse=True)
    colors = ["#4c72b0", "#dd8452"][: len(phases)]
    positive = long.seconds[long.seconds > 0]
    logarithmic = len(positive) > 1 and positive.max() / positive.min() > 100
    for ax, dataset in zip(axes[0], datasets):
        data = long[long.dataset == dataset]
        sns.barplot(data=data, y="config", x="seconds", hue="phase", ax=ax, orient="h", palette=colors,
                    hue_order=phases, order=[c for c in styles if c in set(data.config)], errorbar=None)
        for container, hatch in zip(ax.containers, ["", "//"]):
            for bar in container:
                bar.set_hatch(hatch)
        if logarithmic:
            ax.set_xscale("log")
        ax.set_title(dataset, fontsize="medium")
        ax.set_ylabel("")
        ax.set_xlabel("seconds" + (" (log scale)" if logarithmic else ""))
        legend = ax.get_legend()
        if legend is not None:
            legend.remove()
    handles = [Patch(facecolor=color, hatch=hatch, edgecolor="white", label=phase)
               for phase, color, hatch in zip(phases, colors, ["", "//"])]
    figure.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, frameon=False)
    return figure


FIGURES: list[tuple[str, str, str, str, Callable]] = [
    ("accuracy_under_attack", "accuracy_under_attack", "Accuracy under attack",
     "Accuracy vs attack size L_attack, one line per defense configuration (paper Figs. 3, 4); where a run faced "
     "several attacks of one norm, the per-sample worst case. Bands: 95% Clopper-Pearson intervals.",
     accuracy_under_attack),
    ("median_perturbation", "accuracy_under_attack", "Median minimal perturbation",
     "Median over the test points of the smallest perturbation that broke each point, per configuration and attack "
     "(minimisation attacks such as CW and FMN give it exactly; fixed-budget attacks only to their epsilon grid); "
     "attacks that broke fewer than half of the points are left out.", median_perturbation),
    ("certified_accuracy", "certified", "Certified accuracy",
     "Certified accuracy on clean inputs vs threshold T, one line per configuration (paper Fig. 2). "
     "Bands: 95% Clopper-Pearson intervals.", certified_accuracy),
    ("robust_precision_recall", "certified", "Robust precision and recall",
     "Robust precision (correct among inputs certified at T) and robust recall (certified at T among all) "
     "vs L_attack (paper Fig. 5). Bands: 95% Clopper-Pearson intervals.", robust_precision_recall),
    ("cost", "cost", "Cost", "Training and evaluation wall-clock seconds per configuration, from each run's info: "
     "training of the model (from the run that trained it, where a run reused a checkpoint), evaluation summed "
     "over the configuration's runs.", cost),
]


def make_plots(tables: dict[str, pd.DataFrame], directory: Path, dpi: int = 150) -> list[Plot]:
    """Write every figure that has data as ``directory/NAME.png`` and ``.svg``; returns them in order."""
    directory.mkdir(parents=True, exist_ok=True)
    configs = config_order(tables)
    styles = _styles(configs)
    plots = []
    with sns.axes_style("whitegrid"), plt.rc_context():
        _theme()
        for name, source, title, caption, draw in FIGURES:
            figure = draw(tables.get(source, pd.DataFrame()), styles)
            if figure is None:
                continue
            figure.tight_layout()
            png, svg = directory / f"{name}.png", directory / f"{name}.svg"
            figure.savefig(png, dpi=dpi, bbox_inches="tight", metadata={"Software": None})
            figure.savefig(svg, bbox_inches="tight", metadata={"Date": None, "Creator": None})
            plt.close(figure)
            plots.append(Plot(name, title, caption, png, svg, dpi))
    return plots

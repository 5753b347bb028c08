"""The plots of `granular-po compare`: bars and curves with 95% error bars (none where there is no interval)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from granular_po.apps.report import save_figure


def error_bar(mean: float, low: float | None, high: float | None) -> tuple[float, float]:
    """Matplotlib's (below, above) for a mean and its interval; NaN without an interval (one seed), which
    draws no bar, where 0 would draw a cap that looks like a tight interval."""
    return (mean - low if low is not None else math.nan, high - mean if high is not None else math.nan)


def plot_bars(groups: Mapping[str, Mapping[str, tuple[float | None, float | None, float | None]]],
              path: str | os.PathLike, title: str = "", ylabel: str = "", baseline: float | None = None,
              baseline_label: str = "") -> Path:
    """Grouped bars with 95% error bars: group label -> {bar label: (mean, low, high)}; an optional
    horizontal baseline. A bar without a mean is left out; one without an interval has no error bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bar_labels = list(dict.fromkeys(label for bars in groups.values() for label in bars))
    fig = Figure(figsize=(max(5.0, 1.6 * len(groups) + 2), 4.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / max(1, len(bar_labels))
    for j, label in enumerate(bar_labels):
        xs, ys, errs = [], [], [[], []]
        for i, bars in enumerate(groups.values()):
            mean, low, high = bars.get(label, (None, None, None))
            if mean is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(mean)
            below, above = error_bar(mean, low, high)
            errs[0].append(below)
            errs[1].append(above)
        ax.bar(xs, ys, width, yerr=errs, capsize=4, label=label, alpha=0.85)
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", linewidth=1, label=baseline_label or None)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    if bar_labels or baseline_label:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_curves(curves: Mapping[str, Mapping[int, tuple[float | None, float | None, float | None]]],
                path: str | os.PathLike, title: str = "", xlabel: str = "", ylabel: str = "",
                baseline: float | None = None, baseline_label: str = "") -> Path:
    """Lines with 95% error bars on a log2 x axis: label -> {x: (mean, low, high)}; points without a
    mean are left out, points without an interval have no error bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 4.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label, points in curves.items():
        xs = [x for x in sorted(points) if points[x][0] is not None]
        means = [points[x][0] for x in xs]
        bars = [error_bar(*points[x]) for x in xs]
        ax.errorbar(xs, means, yerr=[[b[0] for b in bars], [b[1] for b in bars]], capsize=4, marker="o", label=label)
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", linewidth=1, label=baseline_label or None)
    ax.set_xscale("log", base=2)
    xticks = sorted({x for points in curves.values() for x in points})
    ax.set_xticks(xticks, [str(x) for x in xticks])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)

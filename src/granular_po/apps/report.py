"""Reports a person reads: metrics of a run directory, PNG plots (matplotlib, Agg) and markdown tables.

    from granular_po.apps.report import read_metrics, curve, plot_curves, markdown_table
    records = read_metrics(".cache/runs/tdpo")                  # one record per (step, split)
    steps, acc = curve(records, "rewards_eval/accuracies")
    plot_curves({"eval": (steps, acc)}, "acc.png", title="reward accuracy", ylabel="accuracy")
    print(markdown_table([{"model": "base", "accuracy": 0.4}]))

No pyplot: figures are built on `matplotlib.figure.Figure` and saved through the Agg canvas, so
nothing depends on a display or on pyplot's global state.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SPLITS = ("train", "eval", "summary")
Curve = tuple[Sequence[float], Sequence[float]]


def record_split(record: Mapping[str, Any]) -> str:
    """'summary' (the Trainer's end-of-training line), 'eval' or 'train' for one metrics.jsonl record."""
    if "train_runtime" in record:
        return "summary"
    if any(key.startswith("eval_") or "eval" in key.split("/")[0] or key.endswith("/eval") for key in record):
        return "eval"
    return "train"


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of `run_dir/metrics.jsonl` (or of that file itself), one per (step, split), by step.

    A resumed run logs some steps twice: the last record of a (step, split) wins. Each record gets a
    `split` key ('train', 'eval' or 'summary'). A line torn by a kill is skipped; no file: [].
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        return []
    latest: dict[tuple[int, str], dict] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue
        split = record_split(record)
        latest.pop((step, split), None)  # re-insert: dict order then follows the last occurrence
        latest[(step, split)] = {**record, "split": split}
    order = {name: i for i, name in enumerate(SPLITS)}
    return sorted(latest.values(), key=lambda r: (r["step"], order[r["split"]]))


def curve(records: Sequence[Mapping[str, Any]], key: str, split: str | None = None) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the records that have it (optionally of one split), non-finite dropped."""
    steps, values = [], []
    for record in records:
        if split is not None and record.get("split", record_split(record)) != split:
            continue
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(int(record["step"]))
            values.append(float(value))
    return steps, values


def last_value(records: Sequence[Mapping[str, Any]], key: str, split: str | None = None) -> float | None:
    """The value of `key` at the last step that logged it, or None."""
    _, values = curve(records, key, split)
    return values[-1] if values else None


def first_value(records: Sequence[Mapping[str, Any]], key: str, split: str | None = None) -> float | None:
    """The value of `key` at the first step that logged it, or None."""
    _, values = curve(records, key, split)
    return values[0] if values else None


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over at most `window` values (same length as `values`)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


_MARKERS = ("o", "s", "^", "D", "v", "P")
_DASHES = ("-", "--", "-.", ":")


def _draw(ax, curves: Mapping[str, Curve], smooth_above: int) -> bool:
    """Draw each curve on `ax`; long noisy ones faint, with a trailing moving average on top."""
    drawn = False
    for i, (label, (xs, ys)) in enumerate(curves.items()):
        if not len(xs):
            continue
        drawn = True
        if len(xs) > smooth_above:
            line, = ax.plot(xs, ys, alpha=0.3, linewidth=0.8)
            window = max(2, len(xs) // 15)
            ax.plot(xs, _moving_average(ys, window), color=line.get_color(),
                    label=f"{label} (mean of last {window})", linewidth=1.8)
        else:  # marker and dash differ per curve, so curves lying on top of each other stay visible
            ax.plot(xs, ys, marker=_MARKERS[i % len(_MARKERS)], markersize=7 - 1.2 * (i % 4), label=label,
                    linestyle=_DASHES[i % len(_DASHES)], linewidth=1.5, alpha=0.85)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.grid(True, alpha=0.3)
    return drawn


def plot_panels(
    panels: Mapping[str, Mapping[str, Curve]],
    path: str | os.PathLike,
    ylabel: str = "",
    xlabel: str = "step",
    title: str = "",
    smooth_above: int = 40,
) -> Path:
    """One PNG with a panel (side by side) per entry of `panels`: title -> {label: (xs, ys)}.

    Curves with more than `smooth_above` points are drawn faint with a moving average over them;
    shorter ones (evaluations) with markers. An empty panel says "no data". Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(1, len(panels))
    fig = Figure(figsize=(5.2 * n, 3.8), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (panel_title, curves) in zip(axes, panels.items() or [("", {})]):
        _draw(ax, curves, smooth_above)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Lay out and write `fig` as a PNG through a temporary file, so a stopped run never leaves half a plot."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def plot_curves(
    curves: Mapping[str, Curve],
    path: str | os.PathLike,
    title: str = "",
    ylabel: str = "",
    xlabel: str = "step",
    smooth_above: int = 40,
) -> Path:
    """One PNG, one axes: label -> (xs, ys) for each curve (see `plot_panels`). Returns the path."""
    return plot_panels({title: curves}, path, ylabel=ylabel, xlabel=xlabel, smooth_above=smooth_above)


def binomial_se(p: float | None, n: int) -> float | None:
    """Standard error of an accuracy `p` measured on `n` questions, sqrt(p (1 - p) / n)."""
    if p is None or n <= 0 or not math.isfinite(p):
        return None
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def format_cell(value: Any, float_format: str = ".3f") -> str:
    """A table cell: floats formatted, None / NaN as 'n/a', booleans yes/no, '|' escaped."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format(value, float_format)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                   float_format: str = ".3f") -> str:
    """A GitHub markdown table of `rows` (dicts); columns: given, else every key in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    if not columns:
        return ""
    lines = ["| " + " | ".join(format_cell(c) for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format_cell(row.get(c), float_format) for c in columns) + " |")
    return "\n".join(lines) + "\n"

"""The statistics and the report of `granular-po compare`: intervals over seeds, paired differences, plots.

    mean_ci([0.41, 0.45, 0.43])          # (mean, low, high): Student-t 95% interval over seeds
    paired_seeds({0: 0.45, 1: 0.40}, {0: 0.41, 1: 0.42})   # the granular - response-level difference
    paired_questions(rows_a, rows_b)     # the same difference, paired question by question

Seeds are the unit of the main interval (a run's training is the random thing being repeated); the
question-level interval treats the test questions as the sample and so leaves training noise out.

(Slightly over 350 lines: the report's tables and plots are one document.)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import NormalDist

from granular_po.apps.report import save_figure

# two-sided 95% Student-t quantiles t_{0.975, df} (3 decimals, as the usual tables) where the expansion
# below is off by more than 1e-4 (scipy is not a dependency)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447}


def t975(df: int) -> float:
    """t_{0.975, df}: tabulated to df 6, above it the Cornish-Fisher expansion in 1/df around the normal
    quantile (Abramowitz & Stegun 26.7.5; within 5e-5 of the exact quantile from df 7, 1e-6 from df 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, not {df}")
    if df in _T975:
        return _T975[df]
    z = NormalDist().inv_cdf(0.975)
    g = ((z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96, (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
         (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160)
    return z + sum(gk / df ** (k + 1) for k, gk in enumerate(g))


def mean_ci(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high) of a 95% Student-t interval; one value: (value, None, None); none: all None."""
    n = len(values)
    if n == 0:
        return None, None, None
    mean = sum(values) / n
    if n == 1:
        return mean, None, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_seeds(a: Mapping[int, float], b: Mapping[int, float]) -> dict:
    """a - b over the seeds both have: per-seed differences, their mean and 95% t-interval."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    mean, low, high = mean_ci(diffs)
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "low": low, "high": high}


def paired_questions(a_rows: Mapping[int, Sequence[Mapping]], b_rows: Mapping[int, Sequence[Mapping]]) -> dict:
    """a - b question by question over the seeds both have (rows: `task_accuracy`'s per-question dicts).

    Each question's correctness is averaged over those seeds first; the interval is the normal one over
    questions. Also the discordant counts summed over seeds: a right and b wrong, and the reverse.
    """
    seeds = sorted(set(a_rows) & set(b_rows))
    if not seeds:
        return {"seeds": [], "n": 0, "mean": None, "low": None, "high": None, "a_only": 0, "b_only": 0}
    prompts = [r["prompt"] for r in a_rows[seeds[0]]]
    for s in seeds:
        for rows in (a_rows[s], b_rows[s]):
            if [r["prompt"] for r in rows] != prompts:
                raise ValueError(f"seed {s}: the two cells were scored on different questions")
    diffs, a_only, b_only = [], 0, 0
    for i in range(len(prompts)):
        a = [bool(a_rows[s][i]["correct"]) for s in seeds]
        b = [bool(b_rows[s][i]["correct"]) for s in seeds]
        diffs.append((sum(a) - sum(b)) / len(seeds))
        a_only += sum(x and not y for x, y in zip(a, b))
        b_only += sum(y and not x for x, y in zip(a, b))
    n = len(diffs)
    mean = sum(diffs) / n if n else None
    if n < 2:
        return {"seeds": seeds, "n": n, "mean": mean, "low": None, "high": None, "a_only": a_only, "b_only": b_only}
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = 1.96 * sd / math.sqrt(n)
    return {"seeds": seeds, "n": n, "mean": mean, "low": mean - half, "high": mean + half,
            "a_only": a_only, "b_only": b_only}


def format_ci(mean: float | None, low: float | None, high: float | None, fmt: str = ".3f") -> str:
    """'0.432 [0.401, 0.463]'; 'n/a' without a mean; the mean alone without an interval."""
    if mean is None:
        return "n/a"
    if low is None or high is None:
        return f"{mean:{fmt}} (one seed: no interval)"
    return f"{mean:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


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


# ---------------------------------------------------------------- compare.md


def _versions() -> str:
    import platform
    import subprocess

    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, text=True,
                                capture_output=True, timeout=10).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else \
        platform.processor()
    return f"{cpu}; transformers {transformers.__version__}, granular-po commit {commit}"


def _chosen_results(grid) -> dict[tuple, dict[int, dict]]:
    """cell -> seed -> result of the validation-chosen run, for every (seed, cell) scored on test."""
    table: dict[tuple, dict[int, dict]] = {}
    for (seed, cell) in grid._groups():
        run = grid.chosen((seed, cell))
        result = grid.result(run) if run is not None else None
        table.setdefault(cell, {})
        if result is not None and result["test"] is not None:
            table[cell][seed] = result
    return table


def _test_seconds(out: Path, result: dict, name: str) -> float | None:
    """Seconds the test scoring of a run took: recorded in its result, else in its eval cache."""
    if result["test"].get("seconds"):
        return result["test"]["seconds"]
    cache = out / "eval" / "test" / f"{name}.json"
    return json.loads(cache.read_text()).get("seconds") if cache.is_file() else None


def _number(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _count(path: Path) -> int:
    from granular_po.apps.eval import read_pairs

    return len(read_pairs(path))


def _setting(value) -> str:
    if isinstance(value, tuple):
        return ", ".join(_setting(v) for v in value) or "(none)"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def sample_efficiency(grid, sft_test_accuracy: float) -> tuple[list[str], dict]:
    """The '## Sample efficiency' section, sample_efficiency.png and the test accuracies per cell, pair
    count and seed, for `--pairs`; nothing without it."""
    from dataclasses import replace

    from granular_po.apps.report import markdown_table

    s, out = grid.s, grid.out
    if not s.pairs:
        return [], {}
    head = ["## Sample efficiency", ""]
    best = grid.best_cells()
    if best is None:
        return [*head, "Waits for the grid: the best cells are chosen once every seed and cell has its choice.", ""], {}
    grid_pairs = s.steps * s.batch_size
    counts = sorted({grid_pairs, *s.pairs})

    def accuracies(cell: tuple, n: int) -> dict[int, dict]:
        """seed -> test result of `cell` trained on n pairs (the grid's own run at the grid's size)."""
        found = {}
        for seed in range(s.seeds):
            run = grid.chosen((seed, cell))
            result = grid.result(run if n == grid_pairs else replace(run, pairs=n))
            if result is not None and result["test"] is not None:
                found[seed] = result["test"]
        return found

    first = "cell (the best of its granularity on validation)"
    rows, curves, by_arm, summary, done = [], {}, {}, {}, {}
    for granular in (g for g in (True, False) if g in best):
        cell = best[granular]
        row = {first: grid.label(cell)}
        curves[grid.label(cell)] = {}
        by_arm[granular] = {}
        for n in counts:
            tests = accuracies(cell, n)
            by_arm[granular][n] = tests
            stats = mean_ci([tests[k]["accuracy"] for k in sorted(tests)])
            row[f"{n} pairs"] = format_ci(*stats) + f" ({len(tests)})"
            curves[grid.label(cell)][n] = stats
            done[(granular, n)] = len(tests) == s.seeds
            summary.setdefault(grid.label(cell), {})[n] = {str(k): v["accuracy"] for k, v in tests.items()}
        rows.append(row)
    paired = {first: "granular - response-level: over seeds / over questions"}
    for n in counts if set(by_arm) == {True, False} else ():
        a, b = by_arm[True][n], by_arm[False][n]
        seeds = paired_seeds({k: v["accuracy"] for k, v in a.items()}, {k: v["accuracy"] for k, v in b.items()})
        questions = paired_questions({k: v["rows"] for k, v in a.items()}, {k: v["rows"] for k, v in b.items()})
        paired[f"{n} pairs"] = (format_ci(seeds["mean"], seeds["low"], seeds["high"], "+.3f") + " / " +
                                format_ci(questions["mean"], questions["low"], questions["high"], "+.3f"))
    plot_curves(curves, out / "sample_efficiency.png", title=f"{s.task}: test accuracy by training pairs\n"
                "(mean and 95% CI over seeds)", xlabel="training pairs (one pass)", ylabel="test accuracy",
                baseline=sft_test_accuracy, baseline_label="SFT")
    return [
        *head,
        "The best granular and the best response-level cell (highest mean validation accuracy of their "
        "validation-chosen runs; test results play no part), trained again on fewer or more pairs: one pass "
        f"over the first n pairs of the seed's data order (n / {s.batch_size} steps), each seed at the learning "
        f"rate chosen for it at {grid_pairs} pairs, scored on the same test questions. The {grid_pairs}-pair "
        "column is the grid's own runs. Seeds in brackets"
        + (f"; **PARTIAL**: {sum(done.values())} of {len(done)} points (cell x pair count) have all {s.seeds} seeds." if
           not all(done.values()) else "."),
        "",
        markdown_table([*rows, paired]),
        "![sample efficiency](sample_efficiency.png)",
        "",
    ], summary


def write_report(grid, baseline: dict, invocation: str, seconds: float, sft_seconds: float) -> Path:
    """<out>/compare.md, test_accuracy.png and val_sweep.png from every result on disk (partial grids too)."""
    from datetime import datetime, timezone

    from granular_po.apps.compare import builtin_grid, paired_arms
    from granular_po.apps.demo import _machine
    from granular_po.apps.report import markdown_table, plot_panels

    s, out = grid.s, grid.out
    base = s.base_lr
    chosen = _chosen_results(grid)
    n_done = sum(grid.result(r) is not None for r in grid.runs)
    complete_seeds = sorted({seed for cell in chosen.values() for seed in cell})
    sft_test, sft_val = baseline["test"], baseline["val"]

    rows = [{"cell": "SFT (the start of every run)", "seeds": "-", "test accuracy, mean [95% CI]":
             _number(sft_test["accuracy"]), "per seed": f"{sft_test['correct']}/{sft_test['n']}",
             "validation accuracy": sft_val["accuracy"]}]
    bars: dict[str, dict[str, tuple]] = {}
    for cell, by_seed in chosen.items():
        arm, optimizer = cell
        accs = [by_seed[k]["test"]["accuracy"] for k in sorted(by_seed) if by_seed[k]["test"]["accuracy"] is not None]
        stats = mean_ci(accs)
        rows.append({
            "cell": grid.label(cell), "seeds": len(accs),
            "lr chosen (x 5e-6), per seed" if base == 5e-6 else f"lr chosen (x {base:g}), per seed":
                ", ".join(f"{by_seed[k]['run']['multiplier']:g}" for k in sorted(by_seed)) or "n/a",
            "test accuracy, mean [95% CI]": format_ci(*stats),
            "per seed": ", ".join(f"{a:.3f}" for a in accs) or "n/a",
            "validation accuracy": _mean([by_seed[k]["val_accuracy"] for k in by_seed]),
            "eval reward accuracy": _mean([by_seed[k]["eval_reward_accuracy"] for k in by_seed]),
            "eval margin": _mean([by_seed[k]["eval_margin"] for k in by_seed]),
        })
        bars.setdefault(optimizer, {})[grid.label(arm)] = stats

    paired_rows = []
    optimizers = dict.fromkeys(r.optimizer for r in grid.runs)
    for (arm, reference), optimizer in ((p, o) for p in paired_arms(list(grid.arms.values())) for o in optimizers):
        cell, other = (arm, optimizer), (reference, optimizer)
        if cell not in chosen or other not in chosen:
            continue
        a, b = chosen[cell], chosen[other]
        by_seed = paired_seeds({k: a[k]["test"]["accuracy"] for k in a}, {k: b[k]["test"]["accuracy"] for k in b})
        by_question = paired_questions({k: a[k]["test"]["rows"] for k in a}, {k: b[k]["test"]["rows"] for k in b})
        paired_rows.append({
            "arm - reference, optimizer": f"{grid.label(arm)} - {grid.label(reference)}, {optimizer}",
            "seeds": len(by_seed["seeds"]),
            "difference per seed": ", ".join(f"{d:+.3f}" for d in by_seed["diffs"]) or "n/a",
            "mean [95% CI over seeds]": format_ci(by_seed["mean"], by_seed["low"], by_seed["high"], "+.3f"),
            "mean [95% CI over questions]": format_ci(by_question["mean"], by_question["low"], by_question["high"],
                                                      "+.3f"),
            "questions right only with the arm / only the reference (summed over seeds)":
                f"{by_question['a_only']} / {by_question['b_only']}",
        })

    sweep_rows, sweep_panels = [], {}
    for cell in dict.fromkeys(r.cell for r in grid.runs):
        row = {"cell": grid.label(cell)}
        xs, ys = [], []
        for m in dict.fromkeys(r.multiplier for r in grid.runs if r.cell == cell):
            vals = [grid.result(r)["val_accuracy"] for r in grid.runs
                    if r.cell == cell and r.multiplier == m and grid.result(r) is not None
                    and grid.result(r)["val_accuracy"] is not None]
            row[f"x{m:g}"] = f"{_mean(vals):.3f} ({len(vals)})" if vals else "n/a"
            if vals:
                xs.append(math.log10(m))
                ys.append(_mean(vals))
        sweep_rows.append(row)
        sweep_panels.setdefault(cell[1], {})[grid.label(cell[0])] = (xs, ys)

    any_interval = any(low is not None for group in bars.values() for _, low, _ in group.values())
    subtitle = "mean and 95% CI over seeds" if any_interval else "one seed: no interval"
    plot_bars(bars, out / "test_accuracy.png", title=f"{s.task}: test accuracy\n({subtitle})", ylabel="accuracy",
              baseline=sft_test["accuracy"], baseline_label="SFT")
    plot_panels(sweep_panels, out / "val_sweep.png", ylabel="validation accuracy (mean over seeds)",
                xlabel=f"log10(lr / {base:g})", title="validation accuracy by learning rate")

    efficiency_lines, efficiency = sample_efficiency(grid, sft_test["accuracy"])
    metric_lines, metric_summary = metric_sections(grid, chosen, baseline)
    rates = sorted({r.multiplier for r in grid.runs})
    one_rate = all(len(group) == 1 for group in grid._groups().values())
    train_seconds = [grid.result(r)["train_seconds"] for r in grid.runs
                     if grid.result(r) is not None and grid.result(r)["train_seconds"]]
    test_seconds = [_test_seconds(out, grid.result(r), r.name) for r in grid.runs
                    if grid.result(r) is not None and grid.result(r)["test"] is not None]
    test_seconds = [t for t in test_seconds if t]
    total = len(grid.runs)
    status = ("complete" if n_done == total and all(len(v) == s.seeds for v in chosen.values()) else
              f"**PARTIAL**: {n_done} of {total} runs trained and scored; test results for seeds "
              f"{complete_seeds or 'none'}; the intervals cover the seeds present only")
    commands = (out / "commands.txt").read_text().splitlines() if (out / "commands.txt").is_file() else []
    sft_command = (out / "sft_command.txt").read_text().strip() if (out / "sft_command.txt").is_file() else \
        f"# --sft given: {grid.sft}"
    task_line = (f"your data: {grid.data['train']} ({_count(grid.data['train'])} training pairs), validation "
                 f"{grid.data['val']}, test {grid.data['test']} ({_count(grid.data['test'])} pairs; task accuracy on "
                 "the records that carry an `answer`)" if s.task == "data" else "the demo's minimal-edit arithmetic pairs (the control: the two responses differ only in the "
                 "wrong digits, which are highlighted)" if s.task == "arithmetic" else
                 f"styled arithmetic pairs (each side's phrasing, length and extra sentences drawn on their own; "
                 f"with probability {s.confound:g} the correct response is in the worked style and the wrong one "
                 "terse; only the results are highlighted)")
    lines = [
        f"# granular-po compare, task `{s.task}`: " + ", ".join(a.shown for a in grid.arms.values()),
        "",
        f"Status: {status}. Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        f"Task: {task_line}. {_count(grid.data['train'])} training pairs, {len(grid.val_questions)} validation questions (the "
        f"learning rate of each seed and cell is chosen on them), {len(grid.test_questions)} test questions "
        "(scored once per chosen run; nothing is chosen on them); the three question sets are disjoint. "
        "Task accuracy: greedy generation, exact match of the stated result.",
        "",
        "## Test accuracy",
        "",
        markdown_table(rows),
        "95% CI: Student-t over seeds (the training seed: preference data order; data and SFT model shared). "
        "Eval reward accuracy and margin: the trainer's last evaluation on "
        f"{s.n_eval_pairs} validation pairs under the run's own token weights (granular: highlighted tokens and "
        "end-of-response token; response-level: every response token), so they compare within a granularity, "
        "not across it.",
        "",
        "![test accuracy](test_accuracy.png)",
        "",
        "## Arms vs their reference, paired",
        "",
        ("Each granular arm against the response-level arm of its loss" if builtin_grid(list(grid.arms.values())) else
         f"Each arm against the first, {grid.label(next(iter(grid.arms)))}")
        + ": same questions, same seeds, same optimizer, each at " + (
            "the one learning rate given (nothing to choose)." if one_rate else
            "its own validation-chosen learning rate."),
        "",
        markdown_table(paired_rows) if paired_rows else "No pair of cells has test results yet.\n",
        "Over seeds: Student-t on the per-seed differences (training noise included). Over questions: each "
        "question's correctness averaged over the seeds, normal interval over questions (question sampling "
        "only).",
        "",
        *metric_lines,
        "## Validation accuracy by learning rate",
        "",
        *([f"One learning rate per cell ({', '.join(f'{m:g}' for m in rates)} x {base:g}): nothing is chosen, so "
           "the validation questions were not scored.", ""] if one_rate else [
            f"Mean over the seeds scored (count in brackets); columns are multiples of {base:g}.", "",
            markdown_table(sweep_rows), "![validation sweep](val_sweep.png)", ""]),
        *efficiency_lines,
        "## How it ran",
        "",
        f"```bash\n{invocation}\n```",
        "",
        markdown_table([{"setting": k, "value": _setting(v)} for k, v in asdict_settings(s).items()]),
        "Arms (overrides on top of each run's base config; the full command of each run in `commands.txt`):",
        "",
        markdown_table([{"arm": a.name, "shown as": a.shown, "overrides": " ".join(a.overrides)}
                        for a in grid.arms.values()]),
        f"SFT (shared by every run; {sft_seconds:.0f} s this invocation):",
        "",
        f"```bash\n{sft_command}\n```",
        "",
        f"{len(commands)} preference runs recorded in `commands.txt`; the first:",
        "",
        f"```bash\n{commands[0] if commands else '# none yet'}\n```",
        "",
        "Measured when each ran (this machine, whatever its load then): "
        + (f"training {_mean(train_seconds):.0f} s per run (mean of {len(train_seconds)}: model loading, "
           f"{s.steps} steps x {s.batch_size} pairs, the trainer's evaluation, saving)" if train_seconds else
           "no training time recorded")
        + (f", test scoring {_mean(test_seconds):.0f} s per chosen run ({len(grid.test_questions)} questions, "
           f"greedy, batches of {s.eval_batch_size})." if test_seconds else "."),
        "",
        f"Machine: {_machine()}; {_versions()}. Time this invocation: {seconds / 60:.1f} min"
        + (f"; {_mean(grid.seconds['run']):.0f} s per run (training + validation scoring), "
           if grid.seconds["run"] else "; ")
        + (f"{_mean(grid.seconds['test']):.0f} s per test scoring." if grid.seconds["test"] else "no test scoring."),
        "",
    ]
    path = out / "compare.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    (out / "compare.json").write_text(json.dumps({
        "status": status, "settings": asdict_settings(s), "data": {k: str(v) for k, v in grid.data.items()},
        "sft": {"val": sft_val["accuracy"], "test": sft_test["accuracy"]},
        "arms": {a.name: list(a.overrides) for a in grid.arms.values()},
        "cells": {grid.label(c): {str(k): {key: v[key] for key in v if key != "test"} | {
            "test_accuracy": v["test"]["accuracy"], "test_metrics": v["test"].get("metrics")} for k, v in by_seed.items()} for c, by_seed in chosen.items()},
        "paired": paired_rows, "metrics": metric_summary, "sample_efficiency": efficiency}, indent=1))
    return path


LOSS_NAMES = {"dpo": "DPO", "tdpo": "TDPO2"}


def asdict_settings(s) -> dict:
    from dataclasses import asdict

    return asdict(s)


# ---------------------------------------------------------------- test metrics per arm, paired

METRICS = {  # key in a run's test items -> shown name; in this order
    "accuracy": "greedy accuracy",
    "forced_margin": "forced margin (nats)",
    "forced_accuracy": "forced-margin accuracy",
    "worked_step": "keeps the worked step",
    "preference_accuracy": "preference accuracy",
    "sequence_margin": "sequence log-ratio margin",
    "highlight_logratio": "highlighted log-ratio (rejected)",
    "rouge_l": "ROUGE-L",
}
BOOTSTRAP_REPLICATES = 2000


def bootstrap_paired(a: Mapping[int, Sequence], b: Mapping[int, Sequence], replicates: int = BOOTSTRAP_REPLICATES,
                     seed: int = 0) -> dict:
    """a - b resampled over seeds and items at once (seeds with replacement, then items with replacement,
    the same draw for both arms: paired), percentile 95% interval; items where either side has no value
    (None) are left out. a, b: seed -> per-item values, aligned. Fixed `seed`: the same report twice."""
    import numpy as np

    seeds = sorted(set(a) & set(b))
    if not seeds:
        return {"seeds": [], "mean": None, "low": None, "high": None}
    diff = np.array([[np.nan if x is None or y is None else float(x) - float(y) for x, y in zip(a[s], b[s])]
                     for s in seeds])  # (seeds, items)
    if not np.isfinite(diff).any():
        return {"seeds": seeds, "mean": None, "low": None, "high": None}
    rng = np.random.default_rng(seed)
    n_s, n_i = diff.shape
    stats = []
    for _ in range(replicates):
        sub = diff[rng.integers(0, n_s, n_s)][:, rng.integers(0, n_i, n_i)]
        if np.isfinite(sub).any():
            stats.append(np.nanmean(sub))
    low, high = np.percentile(stats, [2.5, 97.5])
    return {"seeds": seeds, "mean": float(np.nanmean(diff)), "low": float(low), "high": float(high)}


def _metrics_of(result: dict) -> dict:
    return (result.get("test") or {}).get("metrics") or {}


def metric_sections(grid, chosen: dict, baseline: dict) -> tuple[list[str], dict]:
    """'## Test metrics per arm' and '## Paired differences on every metric', and their JSON."""
    from granular_po.apps.compare import paired_arms
    from granular_po.apps.report import markdown_table

    shown = [k for k in METRICS if any(k in _metrics_of(r) for by_seed in chosen.values() for r in by_seed.values())]
    if not shown:
        return [], {}
    sft = baseline["test"].get("metrics", {})
    rows = [{"cell": "SFT (the start of every run)", "seeds": "-",
             **{METRICS[k]: "n/a" if sft.get(k) is None else f"{sft[k]:.3f}" for k in shown}}]
    per_seed: dict[str, dict] = {}
    for cell, by_seed in chosen.items():
        row = {"cell": grid.label(cell), "seeds": len(by_seed)}
        for k in shown:
            values = [_metrics_of(by_seed[s]).get(k) for s in sorted(by_seed)]
            row[METRICS[k]] = format_ci(*mean_ci([v for v in values if v is not None]))
        rows.append(row)
        per_seed[grid.label(cell)] = {str(s): _metrics_of(r) for s, r in by_seed.items()}
    paired = []
    optimizers = dict.fromkeys(r.optimizer for r in grid.runs)
    for (arm, reference), optimizer in ((p, o) for p in paired_arms(list(grid.arms.values())) for o in optimizers):
        a, b = chosen.get((arm, optimizer), {}), chosen.get((reference, optimizer), {})
        for k in shown:
            a_items = {s: r["test"]["items"][k] for s, r in a.items() if k in (r["test"].get("items") or {})}
            b_items = {s: r["test"]["items"][k] for s, r in b.items() if k in (r["test"].get("items") or {})}
            if not (set(a_items) & set(b_items)):
                continue
            by_seed = paired_seeds({s: _metrics_of(a[s])[k] for s in a_items}, {s: _metrics_of(b[s])[k] for s in b_items})
            boot = bootstrap_paired(a_items, b_items)
            paired.append({"arm - reference, optimizer": f"{grid.label(arm)} - {grid.label(reference)}, {optimizer}",
                           "metric": METRICS[k], "seeds": len(by_seed["seeds"]),
                           "difference per seed": ", ".join(f"{d:+.3f}" for d in by_seed["diffs"]),
                           "mean [95% t over seeds]": format_ci(by_seed["mean"], by_seed["low"], by_seed["high"], "+.3f"),
                           "[95% bootstrap, seeds x items]": format_ci(boot["mean"], boot["low"], boot["high"], "+.3f"),
                           "_t": by_seed, "_bootstrap": boot, "_key": k})
    lines = [
        "## Test metrics per arm", "",
        "Mean [95% Student-t over seeds] of each run's mean over the test items. Greedy accuracy: exact match of "
        "the stated answer. Forced margin: log p(right result) - log p(the generator's wrong result), both "
        "teacher-forced after the prompt and the correct response's text up to its first stated result (with the "
        "character after it); forced-margin accuracy: the share of questions where it is > 0. Keeps the worked "
        "step: the greedy answer restates the operation and states \"answer is\" after it (every worked template "
        "of the styled task does, no terse one). Preference accuracy: the share of test pairs whose sequence-level "
        "log-ratio margin against the SFT model (every response token, the same for every arm) is > 0. "
        "Highlighted log-ratio: mean log pi - log ref over the rejected response's highlighted tokens.", "",
        markdown_table(rows), "",
        "## Paired differences on every metric", "",
        f"Arm - reference on the same test items and seeds. t: over the per-seed differences. Bootstrap: "
        f"{BOOTSTRAP_REPLICATES} replicates resampling seeds and items together (percentile interval, generator "
        "seed 0).", "",
        markdown_table([{k: v for k, v in r.items() if not k.startswith("_")} for r in paired]) if paired else
        "No pair of arms has test results yet.\n", "",
    ]
    summary = {"per_seed": per_seed, "sft": sft, "paired": [
        {"arms": r["arm - reference, optimizer"], "metric": r["_key"], "t_over_seeds": r["_t"],
         "bootstrap": r["_bootstrap"]} for r in paired]}
    return lines, summary

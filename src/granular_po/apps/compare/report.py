"""<out>/compare.md and compare.json of `granular-po compare`, from every result on disk (partial grids too).

(Slightly over 350 lines: the report's tables and plots are one document.)"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

from granular_po.apps.compare.plots import plot_bars, plot_curves
from granular_po.apps.compare.settings import builtin_grid, paired_arms
from granular_po.apps.compare.statistics import (
    BOOTSTRAP_REPLICATES,
    bootstrap_paired,
    format_ci,
    mean_ci,
    paired_questions,
    paired_seeds,
)


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
        f"The best granular and the best response-level cell (highest mean {grid.val_metric} of their "
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


def _metrics_of(result: dict) -> dict:
    return (result.get("test") or {}).get("metrics") or {}


def metric_sections(grid, chosen: dict, baseline: dict) -> tuple[list[str], dict]:
    """'## Test metrics per arm' and '## Paired differences on every metric', and their JSON."""
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


def write_report(grid, baseline: dict, invocation: str, seconds: float, sft_seconds: float) -> Path:
    """<out>/compare.md, test_accuracy.png and val_sweep.png from every result on disk (partial grids too)."""
    from datetime import datetime, timezone

    from granular_po.apps.demo import _machine
    from granular_po.apps.report import markdown_table, plot_panels

    s, out = grid.s, grid.out
    base = s.base_lr
    chosen = _chosen_results(grid)
    n_done = sum(grid.result(r) is not None for r in grid.runs)
    complete_seeds = sorted({seed for cell in chosen.values() for seed in cell})
    sft_test, sft_val = baseline["test"], baseline["val"]
    # own data: what the test file holds are pairs; task accuracy only where a record carries an `answer`
    own, graded = s.task == "data", bool(grid.test_questions)
    n_test = _count(grid.data["test"]) if own else len(grid.test_questions)
    tested = f"{n_test} test pairs" if own else f"{n_test} test questions"

    rows = [{"cell": "SFT (the start of every run)", "seeds": "-", "test accuracy, mean [95% CI]":
             _number(sft_test["accuracy"]), "per seed": f"{sft_test['correct']}/{sft_test['n']}",
             grid.val_metric: "-" if grid.choose_on == "preference" else sft_val["accuracy"]}]
    bars: dict[str, dict[str, tuple]] = {}
    for cell, by_seed in chosen.items():
        arm, optimizer = cell
        accs = [by_seed[k]["test"]["accuracy"] for k in sorted(by_seed) if by_seed[k]["test"]["accuracy"] is not None]
        stats = mean_ci(accs)
        rows.append({
            "cell": grid.label(cell), "seeds": len(accs) if graded else len(by_seed),
            "lr chosen (x 5e-6), per seed" if base == 5e-6 else f"lr chosen (x {base:g}), per seed":
                ", ".join(f"{by_seed[k]['run']['multiplier']:g}" for k in sorted(by_seed)) or "n/a",
            "test accuracy, mean [95% CI]": format_ci(*stats),
            "per seed": ", ".join(f"{a:.3f}" for a in accs) or "n/a",
            grid.val_metric: _mean([by_seed[k]["val_accuracy"] for k in by_seed]),
            "eval reward accuracy": _mean([by_seed[k]["eval_reward_accuracy"] for k in by_seed]),
            "eval margin": _mean([by_seed[k]["eval_margin"] for k in by_seed]),
        })
        bars.setdefault(optimizer, {})[grid.label(arm)] = stats
    if not graded:  # no answers on test: the chosen runs' rates and validation scores, no accuracy columns
        rows = [{k: v for k, v in r.items() if k not in ("test accuracy, mean [95% CI]", "per seed")} for r in rows]

    paired_rows = []  # task accuracy, paired: only where test records carry answers (the pair metrics: below)
    optimizers = dict.fromkeys(r.optimizer for r in grid.runs) if graded else {}
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
    if graded:
        plot_bars(bars, out / "test_accuracy.png", title=f"{s.task}: test accuracy\n({subtitle})", ylabel="accuracy",
                  baseline=sft_test["accuracy"], baseline_label="SFT")
    plot_panels(sweep_panels, out / "val_sweep.png", ylabel=f"{grid.val_metric} (mean over seeds)",
                xlabel=f"log10(lr / {base:g})", title=f"{grid.val_metric} by learning rate")

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
    basis = (f"{_count(grid.data['val'])} validation pairs (one learning rate per cell: nothing is chosen on them)"
             if own and one_rate else grid.choice_basis())
    eval_note = (f"Eval reward accuracy and margin: the trainer's last evaluation on {s.n_eval_pairs} validation "
                 "pairs under the run's own token weights (granular: highlighted tokens and end-of-response token; "
                 "response-level: every response token), so they compare within a granularity, not across it.")
    accuracy_lines = [
        "## Test accuracy",
        "",
        markdown_table(rows),
        "95% CI: Student-t over seeds (the training seed: preference data order; data and SFT model shared). "
        + eval_note,
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
    ]
    lines = [
        f"# granular-po compare, task `{s.task}`: " + ", ".join(a.shown for a in grid.arms.values()),
        "",
        f"Status: {status}. Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        f"Task: {task_line}. {_count(grid.data['train'])} training pairs, {basis}, {tested} "
        + (f"({len(grid.test_questions)} with an `answer`, " if own and graded else "(")
        + "scored once per chosen run; nothing is chosen on them)"
        + ("." if own else "; the three question sets are disjoint.")
        + (" Task accuracy: greedy generation, exact match of the stated result." if graded else ""),
        "",
        *(accuracy_lines if graded else [
            f"Task accuracy needs an `answer` field on the test records; none of the {n_test} test pairs carries "
            "one, so this report gives the pair metrics only.", "", *metric_lines, "## Chosen runs", "",
            markdown_table(rows), eval_note, ""]),
        *(metric_lines if graded else []),
        f"## {grid.val_metric.capitalize()} by learning rate",
        "",
        *([f"One learning rate per cell ({', '.join(f'{m:g}' for m in rates)} x {base:g}): nothing is chosen, so "
           f"the validation {'pairs' if own else 'questions'} were not scored.", ""] if one_rate else [
            f"{grid.val_metric.capitalize()} on {grid.val_set()}: mean over the seeds scored "
            f"(count in brackets); columns are multiples of {base:g}.", "",
            markdown_table(sweep_rows), "![validation sweep](val_sweep.png)", ""]),
        *efficiency_lines,
        "## How it ran",
        "",
        f"```bash\n{invocation}\n```",
        "",
        markdown_table([{"setting": k, "value": _setting(v)}
                        for k, v in shown_settings(s, own, builtin_grid(list(grid.arms.values()))).items()]),
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
        + (f", test scoring {_mean(test_seconds):.0f} s per chosen run ({tested}, "
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


SYNTHETIC_ONLY = ("confound", "highlight", "n_train", "n_val", "n_test")  # the task generator's; own data: the files


def shown_settings(s, own_data: bool, builtin_arms: bool) -> dict:
    """The settings that shaped these runs, for the report's table: with your own data the synthetic task's
    sizes and style knobs played no part, and with arms given `losses` did not either (compare.json keeps all)."""
    skip = (SYNTHETIC_ONLY if own_data else ()) + (() if builtin_arms else ("losses",))
    return {k: v for k, v in asdict_settings(s).items() if k not in skip}


def asdict_settings(s) -> dict:

    return asdict(s)

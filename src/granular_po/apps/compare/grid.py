"""The grid: trains, scores on validation, chooses a rate per seed and cell, scores the choice on test,
prunes weights; every result a JSON file beside its run, so a stopped grid resumes.

(Slightly over 350 lines: the order, resumption and pruning of the grid are one procedure.)"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

from granular_po.apps.compare.metrics import TestScorer, mean_of
from granular_po.apps.compare.runs import drop_optimizer_state, drop_weights, run_overrides, train_in_process
from granular_po.apps.compare.settings import (
    VAL_METRICS,
    Arm,
    CompareSettings,
    Run,
    cell_label,
    default_arms,
    grid_runs,
)
from granular_po.apps.stages import checkpoint_key, data_fingerprint, evaluate_model, finished, shown_command
from granular_po.training import checkpoints


def questions(pairs: list[dict], synthetic: bool) -> list[tuple[str, object]]:
    """Gradable questions: a synthetic task's answers are read from the correct responses (as `eval` does);
    on your data only records that carry an `answer` are graded."""
    from granular_po.apps.eval import questions_from_pairs

    return questions_from_pairs(pairs if synthetic else [p for p in pairs if isinstance(p, dict) and "answer" in p])


def data_test_result(items: dict[str, list], scorer: TestScorer) -> dict:
    """A run's test result on your data: accuracy over the records with an answer (None without any)."""
    graded = [(scorer.records[i].prompt, bool(c)) for i, c in enumerate(items.get("accuracy", [])) if c is not None]
    return {"accuracy": mean_of([c for _, c in graded]), "n": len(graded), "correct": sum(c for _, c in graded),
            "rows": [{"prompt": p, "correct": c} for p, c in graded], **test_metrics(items)}


def test_metrics(items: dict[str, list], correct: list[bool] | None = None) -> dict:
    """A run's test metrics: `items` (per test item, aligned across runs; the greedy completions left out)
    and `metrics` (their means, None where no item has a value)."""
    items = {k: v for k, v in items.items() if k != "completions"}
    if correct is not None:
        items["accuracy"] = [float(c) for c in correct]
    return {"items": items, "metrics": {k: mean_of(v) for k, v in items.items()}}


def pick(scored: list[tuple[Run, dict]]) -> Run:
    """The run with the best validation score (`val_accuracy`: task or preference accuracy, as the grid
    chooses on); ties go to the lower learning rate (the safer one).

    A cell trained at one rate only is not scored on validation (accuracy None): that run is the choice."""
    if len(scored) == 1:
        return scored[0][0]
    return max(scored, key=lambda rr: (rr[1]["val_accuracy"], -rr[0].multiplier))[0]


class Grid:
    """Trains, scores and selects; every result is a JSON file beside its run, so nothing is done twice."""

    def __init__(self, s: CompareSettings, out: Path, model: str, data: dict[str, Path], sft: Path,
                 keep_weights: bool, arms: list[Arm] | None = None):
        from granular_po.apps.eval import read_pairs

        self.s, self.out, self.model, self.data, self.sft, self.keep_weights = s, out, model, data, sft, keep_weights
        self.runs_dir = out / "runs"
        self.fingerprint = f"{data_fingerprint(data['train'], data['val'])}|{checkpoint_key(sft)}"
        self.synthetic = s.task != "data"
        self.val_questions, self.test_questions = (questions(read_pairs(data[k]), self.synthetic) for k in ("val", "test"))
        self.choose_on = s.choose_on if s.choose_on != "auto" else "accuracy" if self.val_questions else "preference"
        if self.choose_on == "accuracy" and not self.val_questions and (len(s.adamw) > 1 or len(s.sgd) > 1 or s.pairs):
            raise SystemExit(f"--val {data['val']}: no record carries an `answer`, so there is no validation accuracy "
                             "to choose a learning rate or a cell on: give --choose-on preference (held-out preference "
                             "accuracy of the validation pairs), or one rate per optimizer (e.g. --adamw 2 --sgd '')")
        s = self.s = replace(s, choose_on=self.choose_on)  # the report's settings say what was chosen on
        self.val_metric = VAL_METRICS[self.choose_on]
        self.scorer = TestScorer(data["test"], sft, out / "eval" / "reference_logps.json", s.max_length,
                                 s.max_prompt_length, synthetic=self.synthetic, rouge=s.rouge, max_new_tokens=s.max_new_tokens,
                                 batch_size=s.eval_batch_size)
        # the validation pairs, scored apart from the test pairs (their own SFT cache): only for the choice
        self.val_scorer = TestScorer(data["val"], sft, out / "eval" / "val_reference_logps.json", s.max_length,
                                     s.max_prompt_length, synthetic=False, rouge=False, max_new_tokens=s.max_new_tokens,
                                     batch_size=s.eval_batch_size) if self.choose_on == "preference" else None
        self.arms = {a.name: a for a in (default_arms(s.losses) if arms is None else arms)}
        self.runs = grid_runs(s, list(self.arms.values()))
        self.seconds: dict[str, list[float]] = {"run": [], "test": []}
        self.test_seconds_hint: float | None = None  # seconds the SFT model's test scoring took
        self.started = time.monotonic()
        self._check_scored_on()

    def _check_scored_on(self) -> None:
        """Runs of an earlier invocation scored on the other validation metric cannot be compared with new ones."""
        for run in self.runs:
            found = self.result(run)
            if found is not None and found["val_accuracy"] is not None and \
                    found.get("val_metric", "accuracy") != self.choose_on:
                raise SystemExit(f"{self.out}: {run.name} was scored on validation by {found.get('val_metric', 'accuracy')}"
                                 f", this invocation chooses on {self.choose_on}: give --choose-on "
                                 f"{found.get('val_metric', 'accuracy')}, or --fresh, or another --out")

    def val_set(self) -> str:
        """'4 validation pairs' (--choose-on preference) or '4 validation questions': what is scored."""
        if self.choose_on == "preference":
            return f"{len(self.val_scorer.records)} validation pairs"
        return f"{len(self.val_questions)} validation questions"

    def choice_basis(self) -> str:
        """What each seed's and cell's learning rate is chosen on, as the report says it."""
        return (f"{self.val_set()} (the learning rate of each seed and cell is chosen on their "
                + ("held-out preference accuracy: sequence-level log-ratio margin against the SFT model > 0, as on "
                   "test)" if self.choose_on == "preference" else "greedy task accuracy)"))

    def result_path(self, run: Run) -> Path:
        return self.runs_dir / run.name / "compare_result.json"

    def result(self, run: Run) -> dict | None:
        path = self.result_path(run)
        return json.loads(path.read_text()) if path.is_file() else None

    def _write_result(self, run: Run, result: dict) -> None:
        path = self.result_path(run)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, path)

    # ---- progress
    def _eta(self) -> str:
        todo_runs = sum(self.result(r) is None for r in self.runs)
        todo_tests = sum(self.chosen(key) is None or self._chosen_needs_test(key) for key in self._groups())
        if not self.seconds["run"]:
            return "time left: known after the first run"
        per_run = sum(self.seconds["run"]) / len(self.seconds["run"])
        # until a test scoring is measured here: the SFT model's (same questions, same generation settings)
        per_test = (sum(self.seconds["test"]) / len(self.seconds["test"]) if self.seconds["test"] else
                    self.test_seconds_hint or per_run)
        left = todo_runs * per_run + todo_tests * per_test
        return f"about {left / 60:.0f} min left ({per_run:.0f} s per run)"

    def _progress(self, message: str) -> None:
        done = sum(self.result(r) is not None for r in self.runs)
        elapsed = (time.monotonic() - self.started) / 60
        print(f"[compare {done}/{len(self.runs)} runs, {elapsed:.1f} min, {self._eta()}] {message}", flush=True)

    # ---- one run
    def train_and_validate(self, run: Run) -> dict:
        """Train `run` (or reuse it) and score it on the validation questions; returns its result."""
        from granular_po.apps.report import last_value, read_metrics

        if (found := self.result(run)) is not None:
            return found
        start = time.monotonic()
        overrides = run_overrides(run, self.arms[run.arm], self.model, self.data, self.runs_dir, self.sft, self.s)
        run_dir = self.runs_dir / run.name
        self._record_command(overrides)
        train_seconds = train_in_process(overrides, run_dir, run.steps(self.s), self.fingerprint, run.name)
        drop_optimizer_state(run_dir)
        # scored on validation where a rate is chosen among several, or where the sample-efficiency stage
        # will choose the best cell; a sample-efficiency run itself is chosen by nothing
        if not run.pairs and (len(self._groups()[(run.seed, run.cell)]) > 1 or self.s.pairs):
            val = self._validate(run)
        else:  # one rate for this cell: nothing to choose, so the validation questions are not scored
            val = {"accuracy": None, "n": 0}
        records = read_metrics(run_dir)
        result = {"run": asdict(run), "lr": run.multiplier * self.s.base_lr, "val_accuracy": val["accuracy"],
                  "val_metric": self.choose_on, "val_n": val["n"], "train_seconds": train_seconds,
                  "eval_reward_accuracy": last_value(records, "rewards_eval/accuracies", "eval"),
                  "eval_margin": last_value(records, "rewards_eval/margins", "eval"),
                  "eval_kl_margin": last_value(records, "kl_eval/margin", "eval"), "test": None}
        self._write_result(run, result)
        self.seconds["run"].append(time.monotonic() - start)
        return result

    def _validate(self, run: Run) -> dict:
        """{"accuracy", "n"}: the run's validation score, greedy task accuracy on the validation questions or
        (--choose-on preference) the share of validation pairs whose sequence-level margin is > 0."""
        model_dir = self.runs_dir / run.name / checkpoints.LATEST
        if self.choose_on == "preference":
            won = self.val_scorer.preference(model_dir)["preference_accuracy"]
            return {"accuracy": mean_of(won), "n": len(won)}
        return evaluate_model(model_dir, self.val_questions, self.out / "eval" / "val" / f"{run.name}.json",
                              self.s.max_new_tokens, f"{run.name} (validation)", batch_size=self.s.eval_batch_size)

    def _record_command(self, overrides: list[str]) -> None:
        path = self.out / "commands.txt"
        old = path.read_text().splitlines() if path.is_file() else []
        path.write_text("\n".join(dict.fromkeys([*old, shown_command(overrides)])) + "\n")

    def label(self, cell: tuple[str, str] | str) -> str:
        """'DPO, granular, AdamW' for a cell, 'DPO, granular' for an arm's name."""
        return cell_label(self.arms, cell) if isinstance(cell, str) else cell_label(self.arms, *cell)

    # ---- selection
    def _groups(self) -> dict[tuple, list[Run]]:
        groups: dict[tuple, list[Run]] = {}
        for run in self.runs:
            groups.setdefault((run.seed, run.cell), []).append(run)
        return groups

    def chosen(self, key: tuple) -> Run | None:
        """The validation-best run of (seed, cell) once every rate of it is scored."""
        group = self._groups()[key]
        results = [self.result(r) for r in group]
        if any(r is None for r in results):
            return None
        return pick(list(zip(group, results)))

    def _chosen_needs_test(self, key: tuple) -> bool:
        run = self.chosen(key)
        return run is not None and self.result(run)["test"] is None

    def prune(self, key: tuple) -> None:
        """Delete the weights of scored runs of (seed, cell) that cannot be the choice any more."""
        if self.keep_weights:
            return
        group = self._groups()[key]
        scored = [(r, self.result(r)) for r in group if self.result(r) is not None]
        if not scored:
            return
        leader = pick(scored)
        for run, result in scored:
            if run != leader or result["test"] is not None:
                drop_weights(self.runs_dir / run.name)

    def test(self, key: tuple) -> None:
        """Score the chosen run of (seed, cell) on the test questions (retrained if its weights are gone)."""
        run = self.chosen(key)
        if run is None or self.result(run)["test"] is not None:
            return
        run_dir = self.runs_dir / run.name
        if not finished(run_dir, run.steps(self.s)):  # weights deleted by an older invocation: train it again
            print(f"{run.name}: chosen on validation but its weights are gone; training it again", flush=True)
            result = self.result(run)
            self.result_path(run).unlink()
            again = self.train_and_validate(run)
            if again["val_accuracy"] != result["val_accuracy"]:
                print(f"{run.name}: note, {self.val_metric} {again['val_accuracy']:.3f} on retraining, "
                      f"{result['val_accuracy']:.3f} before", flush=True)
        self._score_test(run)
        self.prune(key)

    def _score_test(self, run: Run) -> None:
        if not self.synthetic:
            return self._score_data_test(run)
        start = time.monotonic()
        test = evaluate_model(self.runs_dir / run.name / checkpoints.LATEST, self.test_questions,
                              self.out / "eval" / "test" / f"{run.name}.json", self.s.max_new_tokens,
                              f"{run.name} (test)", batch_size=self.s.eval_batch_size)
        items = self.scorer.score(self.runs_dir / run.name / checkpoints.LATEST,
                                  [r["completion"] for r in test["rows"]])
        result = self.result(run)
        result["test"] = {"accuracy": test["accuracy"], "n": test["n"], "correct": test["correct"],
                          "seconds": time.monotonic() - start,
                          "rows": [{"prompt": r["prompt"], "correct": r["correct"]} for r in test["rows"]],
                          **test_metrics(items, [r["correct"] for r in test["rows"]])}
        self._write_result(run, result)
        self.seconds["test"].append(time.monotonic() - start)

    def _score_data_test(self, run: Run) -> None:
        """Your data: every metric from one model load (greedy answers generated when graded or --rouge)."""
        start = time.monotonic()
        items = self.scorer.score(self.runs_dir / run.name / checkpoints.LATEST)
        result = self.result(run)
        result["test"] = data_test_result(items, self.scorer) | {"seconds": time.monotonic() - start}
        self._write_result(run, result)
        self.seconds["test"].append(time.monotonic() - start)

    # ---- sample efficiency (--pairs)
    def best_cells(self) -> dict[bool, tuple] | None:
        """granular -> the (arm, optimizer) cell of that granularity whose validation-chosen runs have the best
        mean validation score (`val_accuracy`) over seeds (ties: the earlier cell of the grid); None until
        every (seed, cell) has its choice. Test results play no part."""
        groups = self._groups()
        if any(self.chosen(key) is None for key in groups):
            return None
        best: dict[bool, tuple] = {}
        score: dict[bool, float] = {}
        for cell in dict.fromkeys(r.cell for r in self.runs):
            vals = [self.result(self.chosen((seed, cell)))["val_accuracy"] for seed in range(self.s.seeds)]
            if any(v is None for v in vals):
                raise SystemExit(f"--pairs chooses the best cells on validation, but {self.label(cell)} was trained "
                                 "at one rate without --pairs and never scored on validation; give --pairs with a "
                                 "fresh --out (or several rates per optimizer)")
            mean = sum(vals) / len(vals)
            granular = self.arms[cell[0]].granular
            if granular not in score or mean > score[granular]:
                best[granular], score[granular] = cell, mean
        return best

    def sample_runs(self) -> list[Run]:
        """The sample-efficiency runs: per pair count, seed and best cell, that seed's chosen rate."""
        best = self.best_cells()
        if not self.s.pairs or best is None:
            return []
        # seed outermost: a stopped stage leaves whole curves for the seeds it finished
        return [replace(self.chosen((seed, cell)), pairs=n) for seed in range(self.s.seeds) for n in self.s.pairs
                for cell in (best[True], best[False])]

    def _sample_eta(self, left: list[Run]) -> str:
        """Time left from the grid's recorded training times, scaled by steps, and its test scorings."""
        train = [self.result(r)["train_seconds"] for r in self.runs
                 if self.result(r) is not None and self.result(r)["train_seconds"]]
        tests = [self.result(r)["test"].get("seconds") for r in self.runs
                 if self.result(r) is not None and self.result(r)["test"] is not None]
        tests = [t for t in tests if t]
        if not train or not tests:
            return "time left: not known yet"
        per_step = sum(train) / len(train) / self.s.steps  # loading and saving counted as steps: an upper bound
        left_s = sum(r.steps(self.s) for r in left) * per_step + len(left) * sum(tests) / len(tests)
        return f"about {left_s / 60:.0f} min left"

    def run_sample_efficiency(self, on_run_done) -> None:
        """Train and test-score every sample-efficiency run (after the grid: it needs the grid's choices);
        `on_run_done()` after each, so the report follows the stage."""
        todo = self.sample_runs()
        for i, run in enumerate(todo, 1):
            found = self.result(run)
            if found is not None and found["test"] is not None:
                continue
            left = [r for r in todo[i - 1:] if self.result(r) is None or self.result(r)["test"] is None]
            print(f"[compare sample efficiency {i}/{len(todo)}, {(time.monotonic() - self.started) / 60:.1f} min, "
                  f"{self._sample_eta(left)}] {run.name}: {run.pairs} pairs, {run.steps(self.s)} steps", flush=True)
            if found is None or not finished(self.runs_dir / run.name, run.steps(self.s)):
                self.result_path(run).unlink(missing_ok=True)
                self.train_and_validate(run)
            self._score_test(run)
            if not self.keep_weights:
                drop_weights(self.runs_dir / run.name)
            if i < len(todo):  # the caller reports after the last one
                on_run_done()

    # ---- everything
    def run_all(self, on_seed_done) -> None:
        groups = self._groups()
        for seed in range(self.s.seeds):
            for run in (r for r in self.runs if r.seed == seed):
                if self.result(run) is None:
                    self._progress(f"{run.name}: training")
                    result = self.train_and_validate(run)
                    self._progress(f"{run.name}: trained" + (f", {self.val_metric} {result['val_accuracy']:.3f}"
                                                      if result["val_accuracy"] is not None else ""))
                self.prune((seed, run.cell))
            for key in (k for k in groups if k[0] == seed):
                if self._chosen_needs_test(key):
                    self._progress(f"seed {seed}, {self.label(key[1])}: scoring {self.chosen(key).name} on the "
                                   "test questions")
                self.test(key)
            if seed < self.s.seeds - 1 or self.s.pairs:  # the caller reports after the last one
                on_seed_done(seed)
        if self.s.pairs:
            self.run_sample_efficiency(lambda: on_seed_done(None))

"""`granular-po compare`: arms x learning rates x seeds from one SFT model (default arms: {DPO, TDPO2} x {granular, response-level}).

    granular-po compare --task styled --out report/compare-styled      # the default grid (measured: 2.1 h of 2 cores)
    granular-po compare --task styled --highlight digits --adamw 2 --sgd '' --seeds 8 \
        --arm 'response: loss=tdpo granular=false' --arm 'granular: loss=tdpo granular=true'  # fixed rate, two arms
    granular-po compare --train t.jsonl --val v.jsonl --test s.jsonl --adamw 2 --sgd '' --rouge \
        --arm 'response: loss=dpo granular=false' --arm 'granular: loss=dpo granular=true'    # your own data
    granular-po compare --task arithmetic --seeds 2 --adamw 1,10 --sgd 100 --out report/compare-arith
    granular-po compare --quick                                        # the machinery, a few steps

1. data: `data.synthetic.split_questions` train / validation / test pairs on disjoint questions
   (`--task arithmetic`: the demo's minimal edits, the control; `--task styled`: sides that differ in
   style as well as in the error, `--confound` the share of pairs whose style sides with the preference);
2. one SFT run on the training pairs' correct responses (or `--sft`), the start of every preference run;
3. per seed, optimizer and learning rate, every arm (`--arm` / `--arms`: named override lists) trained one after another in this process with
   the same config composition and entry point as `granular-po train` (each run's command in
   <out>/commands.txt); only the loss, `granular`, optimizer, lr and seed differ between runs;
4. each run is scored by greedy task accuracy on the validation questions (or, `--choose-on preference`
   and on your data without answers, by held-out preference accuracy on the validation pairs); per seed,
   cell and optimizer the learning rate with the best validation score (ties: the lower rate) is then
   scored on the test questions. Test questions are used for nothing else: no choice depends on them;
5. <out>/compare.md: test accuracy (mean and 95% interval over seeds), the paired granular -
   response-level differences, eval reward accuracy, the validation sweep, and plots with error bars;
6. with `--pairs 32,128` (sample efficiency): the granular and the response-level cell with the best
   mean validation accuracy are trained again on 32 and 128 pairs (one pass each, per seed at its
   chosen rate) and scored on test: test accuracy against annotated pairs, the cost that matters to users.

Resumable: a run with a recorded result is never retrained (a killed run resumes from its checkpoint),
the report is rewritten after every seed, so a stopped grid leaves a partial table. Weights of runs not
chosen on validation are deleted once scored (`--keep-weights` keeps them): a full grid would fill the
disk otherwise.

"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

from granular_po.apps.compare.grid import Grid, data_test_result, test_metrics
from granular_po.apps.compare.runs import check_arms, sft_model_dir, sft_overrides, train_in_process
from granular_po.apps.compare.settings import (
    CHOOSE_ON,
    LOSSES,
    QUICK,
    Arm,
    CompareSettings,
    default_arms,
    parse_arm,
    read_arms,
)
from granular_po.apps.demo import DEFAULT_MODEL
from granular_po.apps.help import DefaultsFormatter, add_column_option, column_option
from granular_po.apps.stages import data_fingerprint, evaluate_model, passive_openmp, shown_command
from granular_po.training import checkpoints


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    d = CompareSettings()
    p = argparse.ArgumentParser(prog="granular-po compare", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--out", default="report/compare", help="data, runs, eval cache, compare.md and plots")
    p.add_argument("--sft", default=None, help="start every run from this SFT run or model directory "
                   "instead of training one on the task's data")
    p.add_argument("--quick", action="store_true", help="a smoke run: a few steps, two seeds, two rates")
    p.add_argument("--fresh", action="store_true", help="delete this comparison's runs, results and eval cache")
    p.add_argument("--keep-weights", action="store_true", help="keep every run's final weights")
    p.add_argument("--model", default=DEFAULT_MODEL, help=argparse.SUPPRESS)  # tests: a tiny base model dir
    p.add_argument("--arm", action="append", metavar="'NAME: KEY=VALUE ...'",
                   help="an arm: a name and `granular-po train` overrides applied on top of every run's base "
                        "config, e.g. --arm 'kl-all: loss=tdpo granular=true granular.kl_weights=all' "
                        "(repeatable; the first arm is the reference of the paired differences); default the "
                        "built-in {DPO, TDPO2} x {granular, response-level}")
    data = p.add_argument_group("your own data (instead of --task)")
    for name in ("train", "val", "test"):
        data.add_argument(f"--{name}", metavar="FILE", help=f"{name} pairs, in any format train reads (JSON, JSONL, "
                          "parquet, CSV, save_to_disk directory, hub id org/name:split; not JSON: written to "
                          "<out>/data as JSON)"
                          + (" (the learning rate is chosen on it: see --choose-on)" if name == "val"
                             else " (scored once per chosen run)" if name == "test" else ""))
    data.add_argument("--data", metavar="FILE", help="one file (any format train reads, or - for stdin) split here "
                      "by --split and --split-seed")
    add_column_option(data)
    data.add_argument("--split", default="0.8,0.1,0.1", help="train, val, test fractions of --data")
    data.add_argument("--split-seed", type=int, default=0, help="the shuffle before --data is split")
    p.add_argument("--arms", metavar="FILE.yaml", help="arms from a YAML file: name -> list of overrides "
                   "(after any --arm)")
    for f in fields(CompareSettings):
        value = getattr(d, f.name)
        flag = f"--{f.name.replace('_', '-')}"
        quick = f" ({QUICK[f.name]} with --quick)" if f.name in QUICK else ""
        if f.name == "task":
            p.add_argument(flag, choices=("arithmetic", "styled"), default=None, help=f"default {value}")
        elif f.name == "choose_on":
            p.add_argument(flag, choices=CHOOSE_ON, default=None, help=(
                "what each seed's and arm's learning rate is chosen on among several: accuracy (greedy task "
                "accuracy on the validation questions: a synthetic task's, or your records that carry an "
                "`answer`), preference (held-out preference accuracy of the validation pairs: sequence-level "
                "log-ratio margin against the SFT model > 0, as reported on test; any data), or auto: accuracy "
                f"where there are validation questions, else preference (default {value})"))
        elif f.name == "highlight":
            p.add_argument(flag, choices=("number", "digits"), default=None, help=(
                f"styled task: what is highlighted in the wrong response, the whole wrong number ({value}, the "
                "default grid's setting) or only its digits that differ from the right result (digits, as the "
                "arithmetic task does)"))
        elif isinstance(value, bool):
            p.add_argument(flag, action="store_const", const=True, default=None,
                           help="ROUGE-L F1 (rouge-score) of each test greedy answer against the correct response")
        elif isinstance(value, tuple):
            kind = {"losses": _names, "pairs": _ints}.get(f.name, _floats)
            shown = ','.join(f'{v:g}' if isinstance(v, float) else str(v) for v in value) or "none"
            extra = (": sample efficiency, the best granular and response-level cells trained on these many "
                     "pairs (one pass) after the grid" if f.name == "pairs" else "")
            p.add_argument(flag, type=kind, default=None, help=f"comma-separated, default {shown}{quick}{extra}")
        else:
            p.add_argument(flag, type=type(value), default=None, help=f"default {value}{quick}")
    return p


def settings_from_args(args: argparse.Namespace) -> CompareSettings:
    s = CompareSettings()
    if args.quick:
        s = replace(s, **QUICK)
    given = {f.name: getattr(args, f.name) for f in fields(s) if getattr(args, f.name, None) is not None}
    s = replace(s, **given)
    unknown = [loss for loss in s.losses if loss not in LOSSES]
    if unknown:
        raise SystemExit(f"--losses: unknown {unknown}; expected some of {list(LOSSES)}")
    if s.seeds < 1 or not (s.adamw or s.sgd):
        raise SystemExit("compare needs at least one seed and one learning rate (--adamw / --sgd)")
    if args.highlight is not None and s.task != "styled":
        raise SystemExit("--highlight applies to --task styled (the arithmetic task highlights the differing digits)")
    if not 0.0 <= s.confound <= 1.0:
        raise SystemExit(f"--confound must be in [0, 1], not {s.confound}")
    grid_pairs = s.steps * s.batch_size
    bad = [n for n in s.pairs if n <= 0 or n % s.batch_size or n > s.n_train or n == grid_pairs]
    if bad:
        raise SystemExit(f"--pairs {','.join(map(str, bad))}: each count must be a multiple of the batch size "
                         f"({s.batch_size}), at most --n-train ({s.n_train}), and not the grid's own "
                         f"{grid_pairs} (steps x batch size: those runs are the grid's)")
    return s


def arms_from_args(args: argparse.Namespace, s: CompareSettings) -> list[Arm]:
    """--arm / --arms in the order given, else the built-in 2x2 (over --losses)."""
    arms = [parse_arm(a) for a in args.arm or []] + (read_arms(args.arms) if args.arms else [])
    if not arms:
        return default_arms(s.losses)
    if args.losses is not None:
        raise SystemExit("--losses chooses the built-in arms; with --arm / --arms give loss= in each arm")
    names = [a.name for a in arms]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SystemExit(f"arm names must differ: {', '.join(twice)} given twice")
    return arms


def file_data(out: Path, args: argparse.Namespace) -> dict[str, Path] | None:
    """The user's data: --train/--val/--test, or --data split by --split with --split-seed into
    <out>/data/{train,val,test}.json; None for a synthetic task. Each is read as training reads it
    (`formats.load_data`, any format: an invalid record fails here, naming file, record and field, before
    any training; `--column` renames fields as train's `columns.*`). A JSON or JSONL file is used as it is;
    one in another format, a stream (stdin, a pipe) or one read through `--column` is read once and written
    as <out>/data/<split>.json (its rows as `eval.read_pairs` gives them, under our names, `answer` kept),
    which every run, score and fingerprint then reads."""
    from granular_po.data.formats import load_data
    from granular_po.data.schema import DataError

    given = {name: getattr(args, name) for name in ("train", "val", "test") if getattr(args, name)}
    if args.data is None and not given:
        return None
    if args.data is not None and given:
        raise SystemExit("give --data (split here) or --train, --val and --test, not both")
    if args.task is not None or args.highlight is not None:
        raise SystemExit("--task / --highlight choose a synthetic task; with your own data leave them out")
    if given and len(given) < 3:
        raise SystemExit(f"--train, --val and --test go together; missing {sorted({'train', 'val', 'test'} - set(given))}")
    try:
        columns = column_option(args.column)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    try:
        for path in list(given.values()) or [args.data]:  # errors name the user's own file
            load_data(path, columns=columns)
        paths = {k: _as_json(out, k, v, columns) for k, v in given.items()} or split_file(out, args, columns)
        for path in paths.values():
            load_data(path)
    except DataError as error:
        raise SystemExit(f"invalid data: {error}") from None
    return paths


def _as_json(out: Path, name: str, given: str, columns: dict[str, str]) -> Path:
    """`given` itself when it is a JSON list or JSONL file read under our names, else its rows written as
    <out>/data/<name>.json: a file in another format, one with renamed `columns`, or a stream such as stdin
    or a pipe (the runs could not read it again)."""
    from granular_po.apps.eval import read_pairs
    from granular_po.data.formats import locate
    from granular_po.data.streams import is_stream

    if locate(given).kind == "json" and not is_stream(given) and not columns:
        return Path(given).expanduser().resolve()
    return _write_rows(out / "data" / f"{name}.json", read_pairs(given, columns))


def _write_rows(path: Path, rows: list[dict]) -> Path:
    """`rows` as a JSON list at `path`, rewritten only when they change (a value JSON has no type for, such
    as a parquet timestamp in a field we do not read, is written as its text)."""
    from granular_po.data.synthetic import write_json

    rows = json.loads(json.dumps(rows, default=str))
    if not path.is_file() or json.loads(path.read_text()) != rows:
        write_json(path, rows)
    return path


def split_file(out: Path, args: argparse.Namespace, columns: dict[str, str] | None = None) -> dict[str, Path]:
    """--data's records (fields renamed by `columns`) shuffled with --split-seed and cut by the --split
    fractions (in order)."""
    import random

    from granular_po.apps.eval import read_pairs

    fractions = _floats(args.split)
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise SystemExit(f"--split {args.split}: three positive fractions (train, val, test) that sum to 1")
    records = read_pairs(args.data, columns)
    order = list(range(len(records)))
    random.Random(args.split_seed).shuffle(order)
    n_train = round(fractions[0] * len(order))
    n_val = round(fractions[1] * len(order))
    cuts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    if any(not idx for idx in cuts.values()):
        raise SystemExit(f"--data {args.data}: {len(order)} records leave a split empty at --split {args.split}")
    return {name: _write_rows(out / "data" / f"{name}.json", [records[i] for i in sorted(idx)])
            for name, idx in cuts.items()}


def make_data(out: Path, s: CompareSettings) -> dict[str, Path]:
    """<out>/data/{train,val,test}.json from `split_questions` (rewritten only when they change)."""
    from granular_po.data.synthetic import split_questions, write_json

    parts = split_questions(s.n_train, s.n_val, s.n_test, task=s.task, seed=s.data_seed, confound=s.confound,
                            highlight=s.highlight)
    paths = {}
    for name, pairs in zip(("train", "val", "test"), parts):
        path = out / "data" / f"{name}.json"
        if not path.is_file() or json.loads(path.read_text()) != pairs:
            write_json(path, pairs)
        paths[name] = path
    return paths


def start_line(s: CompareSettings, data: dict[str, Path], out: Path) -> str:
    """The first line of a comparison: a synthetic task's question counts (its settings), or your data's pair
    counts (its files, as the report counts them)."""
    if s.task != "data":
        return (f"compare: task {s.task}, {s.n_train} training pairs, {s.n_val} validation and {s.n_test} test "
                f"questions -> {out}")
    from granular_po.apps.eval import read_pairs

    n = {name: len(read_pairs(path)) for name, path in data.items()}
    return f"compare: your data, {n['train']} training, {n['val']} validation and {n['test']} test pairs -> {out}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    passive_openmp()
    s = settings_from_args(args)
    arms = arms_from_args(args, s)
    out = Path(args.out).resolve()
    runs = out / "runs"
    if args.fresh:
        for sub in (out / "eval", runs, out / "commands.txt"):
            shutil.rmtree(sub, ignore_errors=True) if sub.is_dir() else sub.unlink(missing_ok=True)
    t0 = time.monotonic()
    data = file_data(out, args)
    if data is not None:
        s = replace(s, task="data")
    data = data or make_data(out, s)
    print(start_line(s, data, out), flush=True)
    check_arms(arms, args.model, data, runs, s)  # an unknown key fails here, before any training
    for arm in arms:
        print(f"arm {arm.name}: {' '.join(arm.overrides)}", flush=True)
    if len(s.adamw) <= 1 and len(s.sgd) <= 1:
        print("learning rate: one per optimizer, fixed: no validation choice (validation questions not scored"
              + (" except for --pairs' choice of cells)" if s.pairs else ")"), flush=True)
    if args.sft is None:
        overrides = sft_overrides(args.model, data, runs, s)
        print(f"SFT: {shown_command(overrides)}", flush=True)
        sft_seconds = train_in_process(overrides, runs / "sft", s.sft_steps, data_fingerprint(data["train"],
                                                                                                 data["val"]), "SFT")
        (out / "sft_command.txt").write_text(shown_command(overrides) + "\n")
        sft = (runs / "sft" / checkpoints.LATEST).resolve()
    else:
        sft, sft_seconds = sft_model_dir(args.sft), 0.0

    from granular_po.apps.compare.report import write_report

    grid = Grid(s, out, args.model, data, sft, args.keep_weights, arms)
    if len(s.adamw) > 1 or len(s.sgd) > 1 or s.pairs:
        print(f"validation: {grid.choice_basis()}", flush=True)
    invocation = "granular-po compare " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    # the starting point of every run, on both splits (the test score is reported, never used to choose)
    baseline = {split: evaluate_model(sft, questions, out / "eval" / f"sft_{split}.json", s.max_new_tokens,
                                      f"SFT ({split})", batch_size=s.eval_batch_size)
                for split, questions in (("val", grid.val_questions), ("test", grid.test_questions))}
    scores = out / "eval" / "sft_test_scores.json"  # beside the reference log-probs: a resume does not rescore
    if grid.synthetic:
        baseline["test"] |= test_metrics(grid.scorer.baseline([r["completion"] for r in baseline["test"]["rows"]], scores),
                                         [r["correct"] for r in baseline["test"]["rows"]])
    else:
        baseline["test"] |= data_test_result(grid.scorer.baseline(None, scores), grid.scorer)
    grid.test_seconds_hint = baseline["test"].get("seconds")

    def report(seed: int | None) -> Path:
        path = write_report(grid, baseline, invocation, time.monotonic() - t0, sft_seconds)
        print(f"report: {path}" + (f" (after seed {seed})" if seed is not None else ""), flush=True)
        return path

    grid.run_all(report)
    path = report(None)
    print(f"\n{path}\ntotal {(time.monotonic() - t0) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

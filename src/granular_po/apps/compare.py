"""`granular-po compare`: {DPO, TDPO2} x {granular, response-level} x learning rates x seeds, one SFT model.

    granular-po compare --task styled --out report/compare-styled      # the default grid (measured: 2.1 h of 2 cores)
    granular-po compare --task arithmetic --seeds 2 --adamw 1,10 --sgd 100 --out report/compare-arith
    granular-po compare --quick                                        # the machinery, a few steps

1. data: `data.synthetic.split_questions` train / validation / test pairs on disjoint questions
   (`--task arithmetic`: the demo's minimal edits, the control; `--task styled`: sides that differ in
   style as well as in the error, `--confound` the share of pairs whose style sides with the preference);
2. one SFT run on the training pairs' correct responses (or `--sft`), the start of every preference run;
3. per seed, optimizer and learning rate, the four cells trained one after another in this process with
   the same config composition and entry point as `granular-po train` (each run's command in
   <out>/commands.txt); only the loss, `granular`, optimizer, lr and seed differ between runs;
4. each run is scored by greedy task accuracy on the validation questions; per seed, cell and optimizer
   the learning rate with the best validation accuracy (ties: the lower rate) is then scored on the test
   questions. Test questions are used for nothing else: no choice depends on them;
5. <out>/compare.md: test accuracy (mean and 95% interval over seeds), the paired granular -
   response-level differences, eval reward accuracy, the validation sweep, and plots with error bars;
6. with `--pairs 32,128` (sample efficiency): the granular and the response-level cell with the best
   mean validation accuracy are trained again on 32 and 128 pairs (one pass each, per seed at its
   chosen rate) and scored on test: test accuracy against annotated pairs, the cost that matters to users.

Resumable: a run with a recorded result is never retrained (a killed run resumes from its checkpoint),
the report is rewritten after every seed, so a stopped grid leaves a partial table. Weights of runs not
chosen on validation are deleted once scored (`--keep-weights` keeps them): a full grid would fill the
disk otherwise.

(Over 350 lines: the grid's order, resumption and pruning of weights are one procedure and read best
top to bottom; its statistics and report live in `compare_report.py`.)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from granular_po.apps.compare_metrics import TestScorer, mean_of
from granular_po.apps.demo import DEFAULT_MODEL, model_overrides
from granular_po.apps.help import DefaultsFormatter
from granular_po.apps.stages import (
    check_stamp,
    checkpoint_key,
    data_fingerprint,
    evaluate_model,
    finished,
    hydra_value,
    passive_openmp,
    shown_command,
)
from granular_po.training import checkpoints

LOSSES = ("dpo", "tdpo")
LOSS_LABELS = {"dpo": "DPO", "tdpo": "TDPO2"}
OPTIMIZERS = ("AdamW", "SGD")


@dataclass(frozen=True)
class CompareSettings:
    """The default grid: sized for about 2.5 h per task on this project's 2-core CPU with SmolLM2-135M;
    measured 2.1 h (styled) and 1.7 h (arithmetic) of the machine per task (README, 'Does granular data teach more?', has the times)."""

    task: str = "arithmetic"  # arithmetic (minimal edits, the control) | styled
    confound: float = 0.75  # styled: share of pairs written correct = worked style, wrong = terse
    highlight: str = "number"  # styled: the whole wrong number (the default grid) | digits: only the differing digits
    n_train: int = 512  # training pairs (questions repeat with other phrasings and errors)
    n_val: int = 32  # validation questions: the learning rate is chosen on them
    n_test: int = 200  # test questions: scored once per chosen run
    data_seed: int = 0  # the data and the SFT run
    sft_steps: int = 24
    sft_batch_size: int = 8
    sft_lr: float = 3e-5
    steps: int = 16  # optimizer steps per preference run (72 runs: the budget's largest share)
    batch_size: int = 4  # pairs per step
    base_lr: float = 5e-6  # the research code's rate; the grids below are multiples of it
    adamw: tuple[float, ...] = (1, 3, 10, 30)
    sgd: tuple[float, ...] = (1, 100)  # the research code's optimizer at its rate and at "100x for granular"
    seeds: int = 3  # training seeds 0..seeds-1 (data order of the preference runs)
    losses: tuple[str, ...] = LOSSES
    beta: float = 0.1
    alpha: float = 0.5  # TDPO2's KL weight
    warmup_steps: int = 2
    max_length: int = 128
    max_prompt_length: int = 96
    n_eval_pairs: int = 32  # validation pairs of the trainer's preference evaluation (reward accuracy)
    max_new_tokens: int = 40  # the longest styled response is about 40 tokens
    eval_batch_size: int = 64  # questions generated together in task accuracy (not a training setting)
    # sample efficiency (off by default): after the grid, the best granular and the best response-level
    # cell (mean validation accuracy of their chosen runs) are trained again on these many pairs, one
    # pass each (steps = pairs / batch_size), per seed at that seed's chosen rate, and scored on test
    pairs: tuple[int, ...] = ()
    rouge: bool = False  # also ROUGE-L of each greedy answer against the correct response (rouge-score)


QUICK = dict(n_train=16, n_val=4, n_test=4, sft_steps=2, sft_batch_size=4, steps=2, batch_size=2, adamw=(1,),
             sgd=(100,), seeds=2, n_eval_pairs=4, max_new_tokens=4, eval_batch_size=4)


@dataclass(frozen=True)
class Arm:
    """A named list of `granular-po train` overrides applied on top of every run's base config.

    The built-in grid's arms are {DPO, TDPO2} x {granular, response-level}, named `dpo_g1` ... so their
    runs keep the names (and their stamps the overrides) of the grids run before arms existed."""

    name: str
    overrides: tuple[str, ...]
    label: str = ""  # shown in the report; the name when empty

    @property
    def shown(self) -> str:
        return self.label or self.name

    def value(self, key: str) -> str | None:
        """The value the arm gives `key` (`granular` and `granular.enabled` are one key), or None."""
        found = [o.split("=", 1)[1] for o in self.overrides if override_key(o) == override_key(key + "=")]
        return found[-1] if found else None

    @property
    def loss(self) -> str:
        return self.value("loss") or ""

    @property
    def granular(self) -> bool:
        return str(self.value("granular.enabled")).lower() == "true"


def default_arms(losses: tuple[str, ...] = LOSSES) -> list[Arm]:
    """The built-in 2x2: per loss, granular then response-level."""
    return [Arm(f"{loss}_g{int(granular)}", (f"loss={loss}", f"granular={str(granular).lower()}"),
                f"{LOSS_LABELS[loss]}, {'granular' if granular else 'response-level'}")
            for loss in losses for granular in (True, False)]


@dataclass(frozen=True)
class Run:
    """One preference run of the grid."""

    arm: str
    optimizer: str
    multiplier: float  # lr = multiplier x base_lr
    seed: int
    pairs: int = 0  # training pairs; 0: the grid's steps x batch_size (a sample-efficiency run otherwise)

    @property
    def name(self) -> str:
        name = f"{self.arm}_{self.optimizer}_x{self.multiplier:g}_s{self.seed}"
        return f"{name}_n{self.pairs}" if self.pairs else name

    def steps(self, s: CompareSettings) -> int:
        return self.pairs // s.batch_size if self.pairs else s.steps

    @property
    def cell(self) -> tuple[str, str]:
        """What a learning rate is chosen for: arm and optimizer."""
        return (self.arm, self.optimizer)


def cell_label(arms: dict[str, Arm], arm: str, optimizer: str | None = None) -> str:
    label = arms[arm].shown if arm in arms else arm
    return f"{label}, {optimizer}" if optimizer else label


def builtin_grid(arms: list[Arm]) -> bool:
    """Every arm is one of the built-in 2x2's."""
    builtin = {a.name: a for a in default_arms()}
    return all(a.name in builtin and a.overrides == builtin[a.name].overrides for a in arms)


def paired_arms(arms: list[Arm]) -> list[tuple[str, str]]:
    """(arm, reference) pairs of the report's paired differences: each arm against the first one; in the
    built-in grid each granular arm against the response-level arm of its loss."""
    if builtin_grid(arms):
        names = {a.name for a in arms}
        return [(a.name, f"{a.loss}_g0") for a in arms if a.granular and f"{a.loss}_g0" in names]
    return [(a.name, arms[0].name) for a in arms[1:]]


def grid_runs(s: CompareSettings, arms: list[Arm] | None = None) -> list[Run]:
    """Every run in the order trained: seed, then optimizer and rate, then arm."""
    arms = default_arms(s.losses) if arms is None else arms
    rates = [("AdamW", m) for m in s.adamw] + [("SGD", m) for m in s.sgd]
    return [Run(arm.name, opt, m, seed) for seed in range(s.seeds) for opt, m in rates for arm in arms]


# ---------------------------------------------------------------- command line


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
        data.add_argument(f"--{name}", metavar="FILE", help=f"{name} pairs, JSON list or JSONL in our format"
                          + (" (the learning rate is chosen on its records that carry an `answer`)" if name == "val"
                             else " (scored once per chosen run)" if name == "test" else ""))
    data.add_argument("--data", metavar="FILE", help="one file split here by --split and --split-seed")
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


# ---------------------------------------------------------------- stages


def file_data(out: Path, args: argparse.Namespace) -> dict[str, Path] | None:
    """The user's data: --train/--val/--test as they are, or --data split by --split with --split-seed
    into <out>/data/{train,val,test}.json; None for a synthetic task. Every file is read as training
    reads it (an invalid record fails here, naming file, record and field), before any training."""
    from granular_po.data.records import load_records
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
        paths = {k: Path(v).expanduser().resolve() for k, v in given.items()} or split_file(out, args)
        for path in paths.values():
            load_records(path)
    except DataError as error:
        raise SystemExit(f"invalid data: {error}") from None
    return paths


def split_file(out: Path, args: argparse.Namespace) -> dict[str, Path]:
    """--data's records shuffled with --split-seed and cut by the --split fractions (in order)."""
    import random

    from granular_po.apps.eval import read_pairs
    from granular_po.data.synthetic import write_json

    fractions = _floats(args.split)
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise SystemExit(f"--split {args.split}: three positive fractions (train, val, test) that sum to 1")
    records = read_pairs(args.data)
    order = list(range(len(records)))
    random.Random(args.split_seed).shuffle(order)
    n_train = round(fractions[0] * len(order))
    n_val = round(fractions[1] * len(order))
    cuts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    if any(not idx for idx in cuts.values()):
        raise SystemExit(f"--data {args.data}: {len(order)} records leave a split empty at --split {args.split}")
    paths = {}
    for name, idx in cuts.items():
        paths[name] = out / "data" / f"{name}.json"
        pairs = [records[i] for i in sorted(idx)]
        if not paths[name].is_file() or json.loads(paths[name].read_text()) != pairs:
            write_json(paths[name], pairs)
    return paths


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


def train_in_process(overrides: list[str], run_dir: Path, steps: int, fingerprint: str, label: str) -> float:
    """Train one run as `granular-po train OVERRIDES` would, in this process; returns seconds (0: reused).

    A run already at its final step is not touched; an unfinished one resumes from its checkpoint.
    """
    check_stamp(run_dir, {"overrides": overrides, "data": fingerprint}, label)
    if finished(run_dir, steps):
        return 0.0
    from granular_po.training.config import compose_config
    from granular_po.training.recipe import run_training

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.monotonic()
    try:
        run_training(compose_config(overrides))
    except Exception as error:  # name the run: the grid is long and its log is read later
        raise SystemExit(f"{label} failed: {type(error).__name__}: {error}\n  {shown_command(overrides)}") from error
    finally:
        gc.collect()
    if not finished(run_dir, steps):
        raise SystemExit(f"{label}: the run ended without a checkpoint at step {steps} in {run_dir}")
    return time.monotonic() - start


def common_overrides(model: str, data: dict[str, Path], runs: Path, s: CompareSettings) -> list[str]:
    return [
        *model_overrides(model), "datasets=[ours]", f"custom_train_path={hydra_value(data['train'])}",
        f"custom_eval_path={hydra_value(data['val'])}", f"local_dirs=[{hydra_value(runs)}]",
        f"warmup_steps={s.warmup_steps}", f"max_length={s.max_length}", f"max_prompt_length={s.max_prompt_length}",
        "eval_batch_size=16", f"n_eval_examples={s.n_eval_pairs}", "trainer=BasicTrainer",
    ]


def sft_overrides(model: str, data: dict[str, Path], runs: Path, s: CompareSettings) -> list[str]:
    n = s.sft_steps * s.sft_batch_size
    return [*common_overrides(model, data, runs, s), "loss=sft", "granular=false", "exp_name=sft",
            f"seed={s.data_seed}", "optimizer=AdamW", f"lr={s.sft_lr:g}", f"batch_size={s.sft_batch_size}",
            f"n_examples={n}", f"eval_every={n}", f"save_every={n}"]


def override_key(override: str) -> str:
    """The key an override sets (`granular=x` is `granular.enabled=x`, as `granular-po train` reads it)."""
    key = override.split("=", 1)[0].strip()
    return "granular.enabled" if key == "granular" else key


def merge_overrides(base: list[str], extra: tuple[str, ...] | list[str]) -> list[str]:
    """`base` with each of `extra` replacing the override of the same key in place, or appended."""
    out = list(base)
    for item in extra:
        where = [i for i, o in enumerate(out) if override_key(o) == override_key(item)]
        if where:
            out[where[0]] = item
            for i in reversed(where[1:]):
                del out[i]
        else:
            out.append(item)
    return out


def run_overrides(run: Run, arm: Arm, model: str, data: dict[str, Path], runs: Path, sft: Path,
                  s: CompareSettings) -> list[str]:
    """The run's base config (model, data, optimizer, rate, seed, length) with the arm's overrides on top.

    The built-in arms give the same list, in the same order, as the grid gave before arms existed."""
    n = run.steps(s) * s.batch_size  # one pass over n pairs
    base = [
        *common_overrides(model, data, runs, s), f"model.archive={hydra_value(sft)}",
        f"loss={arm.loss}", f"granular={str(arm.granular).lower()}", f"optimizer={run.optimizer}",
        f"lr={run.multiplier * s.base_lr:g}", f"seed={run.seed}", f"exp_name={run.name}",
        f"loss.beta={s.beta:g}",
        *(["loss.if_tdpo2=true", f"loss.alpha={s.alpha:g}"] if arm.loss == "tdpo" else []),  # TDPO2's keys
        "do_first_eval=false",  # policy = reference before step 1: every reward 0
        f"batch_size={s.batch_size}", f"n_examples={n}", f"eval_every={n}", f"save_every={n}",
    ]
    return merge_overrides(base, arm.overrides)


# keys compare sets itself for every run: an arm that set them would break the comparison or the grid
GRID_KEYS = {
    "optimizer": "--adamw / --sgd", "lr": "--adamw / --sgd x --base-lr", "seed": "--seeds",
    "exp_name": "the run's name", "batch_size": "--batch-size", "n_examples": "--steps x --batch-size",
    "eval_every": "one evaluation at the end", "save_every": "one checkpoint at the end",
    "datasets": "--task or --train / --val", "custom_train_path": "--task or --train",
    "custom_eval_path": "--task or --val", "local_dirs": "--out", "local_run_dir": "--out",
    "model": "--model / --sft", "do_first_eval": "off: policy = reference before step 1",
}
ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*")


def make_arm(name: str, overrides: list[str] | tuple[str, ...], where: str) -> Arm:
    """An arm from its name and overrides, or SystemExit naming `where` and what is wrong."""
    name = str(name).strip()
    if not ARM_NAME.fullmatch(name) or name == "sft":
        raise SystemExit(f"{where}: arm name {name!r} must be letters, digits, '.' or '-' (it names run "
                         "directories), and not 'sft'")
    overrides = tuple(str(o).strip() for o in overrides if str(o).strip())
    for o in overrides:
        key = override_key(o)
        if "=" not in o or not key or key.startswith(("+", "~")):
            raise SystemExit(f"{where}: arm {name}: {o!r} is not a key=value override of granular-po train")
        top = key.split(".", 1)[0]
        if key in GRID_KEYS or (top == "model" and key != "model"):
            raise SystemExit(f"{where}: arm {name}: {key} is set by compare for every run "
                             f"({GRID_KEYS.get(key, GRID_KEYS['model'])}); an arm cannot change it")
    arm = Arm(name, overrides)
    if arm.loss not in LOSSES:
        raise SystemExit(f"{where}: arm {name}: give loss=dpo or loss=tdpo (compare trains preference runs"
                         + (f"; not {arm.loss!r})" if arm.loss else ")"))
    return arm


def parse_arm(text: str) -> Arm:
    """`'name: key=value key=value'` (quotes as in a shell) -> Arm."""
    name, sep, rest = text.partition(":")
    if not sep:
        raise SystemExit(f"--arm {text!r}: expected 'name: key=value key=value ...'")
    return make_arm(name, shlex.split(rest), f"--arm {text!r}")


def read_arms(path: str) -> list[Arm]:
    """An arms YAML file: a mapping name -> list of overrides (or one string of them), in order."""
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise SystemExit(f"--arms {path}: {type(error).__name__}: {error}") from None
    if not isinstance(loaded, dict) or not loaded:
        raise SystemExit(f"--arms {path}: expected a mapping of arm name -> list of overrides")
    arms = []
    for name, overrides in loaded.items():
        if isinstance(overrides, str):
            overrides = shlex.split(overrides)
        if not isinstance(overrides, list):
            raise SystemExit(f"--arms {path}: arm {name}: expected a list of overrides, not "
                             f"{type(overrides).__name__}")
        arms.append(make_arm(name, overrides, f"--arms {path}"))
    return arms


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


def check_arms(arms: list[Arm], model: str, data: dict[str, Path], runs: Path, s: CompareSettings) -> None:
    """Compose and validate each arm's first run with the settings' own checks, before any training:
    an unknown key or a bad value fails here, naming the arm."""
    from granular_po.training.config import ConfigError, compose_config, validate

    opt, m = (("AdamW", s.adamw[0]) if s.adamw else ("SGD", s.sgd[0]))
    for arm in arms:
        overrides = run_overrides(Run(arm.name, opt, m, 0), arm, model, data, runs, runs / "sft" / "LATEST", s)
        try:
            validate(compose_config([*overrides, "resume=false"]))  # resume: no run directory is read
        except ConfigError as error:
            raise SystemExit(f"arm {arm.name}: {error}") from None


def sft_model_dir(sft: str) -> Path:
    """An SFT run directory -> its LATEST; a model directory as it is (resolved, so it cannot move)."""
    path = Path(sft).expanduser()
    if (path / checkpoints.LATEST).exists():
        path = path / checkpoints.LATEST
    if not (path / "config.json").is_file():
        raise SystemExit(f"--sft {sft}: neither a run directory with LATEST nor a Hugging Face model directory")
    return path.resolve()


def drop_weights(run_dir: Path) -> None:
    """Delete a scored run's checkpoints (its metrics, config and results stay)."""
    (run_dir / checkpoints.LATEST).unlink(missing_ok=True)
    for step_dir in run_dir.glob("step-*"):
        shutil.rmtree(step_dir, ignore_errors=True)


def drop_optimizer_state(run_dir: Path) -> None:
    """A finished run is never resumed: its optimizer state (twice the weights for AdamW) is dead weight."""
    for step_dir in run_dir.glob("step-*"):
        for name in ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth"):
            (step_dir / name).unlink(missing_ok=True)


# ---------------------------------------------------------------- the grid


def test_metrics(items: dict[str, list], correct: list[bool] | None = None) -> dict:
    """A run's test metrics: `items` (per test item, aligned across runs; the greedy completions left out)
    and `metrics` (their means, None where no item has a value)."""
    items = {k: v for k, v in items.items() if k != "completions"}
    if correct is not None:
        items["accuracy"] = [float(c) for c in correct]
    return {"items": items, "metrics": {k: mean_of(v) for k, v in items.items()}}


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


def pick(scored: list[tuple[Run, dict]]) -> Run:
    """The run with the best validation accuracy; ties go to the lower learning rate (the safer one).

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
        if not self.synthetic and not self.val_questions and (len(s.adamw) > 1 or len(s.sgd) > 1 or s.pairs):
            raise SystemExit(f"--val {data['val']}: no record carries an `answer`, so there is nothing to choose a "
                             "learning rate or a cell on: give one rate per optimizer (e.g. --adamw 2 --sgd '')")
        self.scorer = TestScorer(data["test"], sft, out / "eval" / "reference_logps.json", s.max_length,
                                 s.max_prompt_length, synthetic=self.synthetic, rouge=s.rouge, max_new_tokens=s.max_new_tokens,
                                 batch_size=s.eval_batch_size)
        self.arms = {a.name: a for a in (default_arms(s.losses) if arms is None else arms)}
        self.runs = grid_runs(s, list(self.arms.values()))
        self.seconds: dict[str, list[float]] = {"run": [], "test": []}
        self.test_seconds_hint: float | None = None  # seconds the SFT model's test scoring took
        self.started = time.monotonic()

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
            val = evaluate_model(run_dir / checkpoints.LATEST, self.val_questions, self.out / "eval" / "val" /
                                 f"{run.name}.json", self.s.max_new_tokens, f"{run.name} (validation)",
                                 batch_size=self.s.eval_batch_size)
        else:  # one rate for this cell: nothing to choose, so the validation questions are not scored
            val = {"accuracy": None, "n": 0}
        records = read_metrics(run_dir)
        result = {"run": asdict(run), "lr": run.multiplier * self.s.base_lr, "val_accuracy": val["accuracy"],
                  "val_n": val["n"], "train_seconds": train_seconds,
                  "eval_reward_accuracy": last_value(records, "rewards_eval/accuracies", "eval"),
                  "eval_margin": last_value(records, "rewards_eval/margins", "eval"),
                  "eval_kl_margin": last_value(records, "kl_eval/margin", "eval"), "test": None}
        self._write_result(run, result)
        self.seconds["run"].append(time.monotonic() - start)
        return result

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
                print(f"{run.name}: note, validation accuracy {again['val_accuracy']:.3f} on retraining, "
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
        """granular -> the (arm, optimizer) cell of that granularity whose validation-chosen runs
        have the best mean validation accuracy over seeds (ties: the earlier cell of the grid); None until
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
                    self._progress(f"{run.name}: trained" + (f", validation accuracy {result['val_accuracy']:.3f}"
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
    print(f"compare: task {s.task}, {s.n_train} training pairs, {s.n_val} validation and {s.n_test} test "
          f"questions -> {out}", flush=True)
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

    from granular_po.apps.compare_report import write_report

    grid = Grid(s, out, args.model, data, sft, args.keep_weights, arms)
    invocation = "granular-po compare " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    # the starting point of every run, on both splits (the test score is reported, never used to choose)
    baseline = {split: evaluate_model(sft, questions, out / "eval" / f"sft_{split}.json", s.max_new_tokens,
                                      f"SFT ({split})", batch_size=s.eval_batch_size)
                for split, questions in (("val", grid.val_questions), ("test", grid.test_questions))}
    if grid.synthetic:
        baseline["test"] |= test_metrics(grid.scorer.score(sft, [r["completion"] for r in baseline["test"]["rows"]]),
                                         [r["correct"] for r in baseline["test"]["rows"]])
    else:
        baseline["test"] |= data_test_result(grid.scorer.score(sft), grid.scorer)
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

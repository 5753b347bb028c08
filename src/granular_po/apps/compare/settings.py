"""What a comparison is: its settings, its arms (named override lists) and its runs; no I/O beyond reading
an arms file."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

LOSSES = ("dpo", "tdpo")


LOSS_LABELS = {"dpo": "DPO", "tdpo": "TDPO2"}


CHOOSE_ON = ("auto", "accuracy", "preference")  # --choose-on


VAL_METRICS = {"accuracy": "validation accuracy", "preference": "validation preference accuracy"}  # shown names


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
    # what the rate is chosen on: accuracy (greedy, on validation records with an answer), preference (held-out
    # preference accuracy of the validation pairs), auto (accuracy where the validation records carry answers)
    choose_on: str = "auto"
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


def override_key(override: str) -> str:
    """The key an override sets (`granular=x` is `granular.enabled=x`, as `granular-po train` reads it)."""
    key = override.split("=", 1)[0].strip()
    return "granular.enabled" if key == "granular" else key


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

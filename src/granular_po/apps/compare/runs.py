"""One run of a comparison as `granular-po train` would run it: its overrides, training in this process,
the arms' check before any training, and what is kept of a run once scored."""

from __future__ import annotations

import gc
import os
import shutil
import time
from pathlib import Path

from granular_po.apps.compare.settings import Arm, CompareSettings, Run, override_key
from granular_po.apps.demo import model_overrides
from granular_po.apps.stages import check_stamp, finished, hydra_value, shown_command
from granular_po.training import checkpoints


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

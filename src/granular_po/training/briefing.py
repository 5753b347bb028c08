"""The start and end blocks of a run: where things go, what was loaded, what to run next.

At start, one short block: the run directory, the models (and what `model.archive` was loaded into), the
data summary (the lines `granular-po inspect` prints), the forward route and the memory estimate. At the
end: the final metrics, the checkpoint `LATEST` points to, and the next command (after SFT: stage 2
with `model.archive` filled in).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from granular_po.losses import LossType
from granular_po.models import archive_applied_in_memory
from granular_po.settings import TrainConfig
from granular_po.training.console import metric_line, number
from granular_po.training.resources import format_bytes

# the preference stage's rate of the README's small-data recipe (and the demo's `tdpo_lr`): SFT's higher
# rate is not carried over, as AdamW rates 10x above this one collapse preference runs (README results)
PREFERENCE_LR = 5e-6
# overrides a stage-2 command replaces: the loss (and its keys), the weighting switch, the rate, the name
# and the starting weights; `granular.outside_weight` and the like are kept
_STAGE_ONE_KEYS = ("loss", "granular", "granular.enabled", "lr", "exp_name", "model.archive", "do_first_eval")
STAGE_TWO = ("loss=tdpo", "loss.beta=0.1", "loss.alpha=0.5", "loss.if_tdpo2=true", "granular=true",
             f"lr={PREFERENCE_LR:g}")


def block(title: str, rows: list[tuple[str, str]]) -> str:
    """A title, then `label  value` rows with aligned values (a value may hold several lines)."""
    width = max((len(label) for label, _ in rows), default=0)
    lines = [title]
    for label, value in rows:
        first, *rest = str(value).split("\n")
        lines.append(f"  {label:<{width}}  {first}")
        lines += [f"  {'':<{width}}  {more}" for more in rest]
    return "\n".join(lines)


def entry_command() -> str:
    """How the user started this run: the research code's `train.py`, or the `granular-po` command."""
    return "python -u train.py" if sys.argv[0].endswith("train.py") else "granular-po train"


def weighted_tokens(dataset, loss: LossType) -> tuple[int, int]:
    """(response tokens with a non-zero weight, response tokens) of what the loss trains on: the chosen
    responses' SFT weights for SFT, both responses for DPO / TDPO."""
    import pyarrow.compute as pc

    columns = ("sft_weights",) if loss is LossType.SFT else ("chosen_weights", "rejected_weights")
    table = dataset.with_format("arrow")[:]
    nonzero = total = 0
    for name in columns:
        flat = pc.list_flatten(table.column(name))
        total += len(flat)
        nonzero += pc.sum(pc.not_equal(flat, 0)).as_py() or 0
    return nonzero, total


def data_lines(reports, dataset, loss: LossType) -> str:
    """The load summary of each file (records, kept, skipped by reason, its data-shape warnings: `data.shape`)
    and the weighted token share."""
    lines = [line for report in reports for line in (report.summary(), *report.warnings)]
    if dataset is not None and len(dataset):
        nonzero, total = weighted_tokens(dataset, loss)
        lines.append(f"response tokens carrying weight: {nonzero}/{total} = {nonzero / max(total, 1):.1%}")
    return "\n".join(lines)


def forward_line(route, loss_settings) -> str:
    """The forward route and where the chunked lm_head runs: on the margin's weighted positions, or on
    every response position where the KL over all tokens (`granular.kl_weights=all`) or the chosen
    response's NLL (`loss.nll_alpha` > 0) needs them (the statistics then read `response_positions`, so
    granular weighting no longer saves the head's work: `make bench` measures the cost)."""
    keys = (["granular.kl_weights=all"] if loss_settings.kl_over_all_tokens else []) + (
        [f"loss.nll_alpha={number(loss_settings.nll_alpha)}"] if loss_settings.adds_nll else [])
    if not keys:
        return route.describe()
    return route.describe(head_positions=f"every response position ({', '.join(keys)})")


def _checkpoint_name(path: str) -> str:
    """A checkpoint path with what a `LATEST` link points to, e.g. `runs/sft/LATEST (-> step-16)`."""
    resolved = Path(path).resolve()
    return path if resolved == Path(path).absolute() else f"{path} (-> {resolved.name})"


def model_rows(cfg: TrainConfig, loss: LossType, reference_loaded: bool, precomputed: bool) -> list[tuple[str, str]]:
    """What the policy and the reference were loaded from, naming `model.archive` when it was used."""
    archive = cfg.model.archive
    name = str(cfg.model.name_or_path)
    policy = f"{name}, weights from model.archive={_checkpoint_name(str(archive))}" if archive else name
    if cfg.lora.enabled:
        policy += f" + LoRA (r={cfg.lora.r})"
        if archive_applied_in_memory(archive):  # adapter_base.py
            policy += "; the adapters name the run's base/ (these starting weights, written once)"
    if loss is LossType.SFT:
        reference = "none (SFT trains without one)"
    elif getattr(cfg.loss, "reference_free", False):
        reference = "none (loss.reference_free=true: a uniform reference)"
    elif precomputed:
        reference = "its log-probs computed once before training (precompute_ref_log_probs=true)"
    elif cfg.lora.enabled:
        reference = "the policy with its LoRA adapters off (one copy of the weights)"
    elif reference_loaded:
        start = "model.archive" if archive else name
        dtype = cfg.model.reference_dtype or cfg.model.policy_dtype
        reference = f"a frozen copy of {start} ({dtype})"
    else:
        reference = "none"
    return [("policy", policy), ("reference", reference)]


def reference_offset_notice(cfg: TrainConfig, precision, offset: tuple[float, float] | None) -> str | None:
    """One line when the loaded reference is not held in the policy's weight dtype (`model.reference_dtype`
    asked for it, e.g. bfloat16 to halve its memory): before the first update its log-ratios, rewards and
    KL are not 0 but `offset` = (mean |log-ratio| per response, mean KL) measured on the first batch (None:
    not measured, e.g. under FSDP). None when the reference computes what the starting policy computes."""
    if precision.reference_dtype == precision.policy_dtype:
        return None
    name = str(precision.reference_dtype).removeprefix("torch.")
    weights = str(precision.policy_dtype).removeprefix("torch.")
    beta = getattr(cfg.loss, "beta", None)
    if offset is None:
        size = "an offset of the size of its rounding error (not measured on this setup)"
    else:
        logratio, kl = offset
        reward = f", rewards {number(beta * logratio)}" if beta is not None else ""
        size = f"on the first batch a mean |log-ratio| of {number(logratio)} nats per response{reward}, KL {number(kl)}"
    return (f"notice: model.reference_dtype={name} with {weights} policy weights: the reference does not compute "
            f"what the starting policy computes, so log-ratios, rewards and KL do not start at 0 ({size}); "
            "model.reference_dtype=null gives an exact reference (in the policy's dtype)")


def checkpoint_line(cfg: TrainConfig, size: int, how: str) -> str:
    """One checkpoint's size (`how`: measured or estimated from what) and what `save_total_limit` keeps."""
    keep = cfg.save_total_limit
    others = "only LATEST's kept" if keep == 0 else f"LATEST's and the newest {keep} other{'s' if keep != 1 else ''} kept"
    kept = ("all kept (save_total_limit=null)" if keep is None else
            f"{others} (save_total_limit={keep}): at most {format_bytes((keep + 1) * size)}")
    return f"about {format_bytes(size)} each ({how}); {kept}"


def start_block(cfg: TrainConfig, settings, *, train_reports, eval_reports, train_ds, route_line: str,
                memory, reference_loaded: bool, total_steps: int, resume_from: Path | None,
                checkpoint_size: tuple[int, str] | None = None) -> str:
    """The start-up block (printed once, by the main process, before the first step)."""
    loss = settings.loss
    what = {LossType.SFT: "SFT", LossType.DPO: "DPO"}.get(loss, "TDPO2" if getattr(cfg.loss, "if_tdpo2", False) else "TDPO1")
    granular = "granular" if cfg.granular.enabled else "response-level"
    run_dir = str(settings.run_dir)
    saved = "nothing saved (debug=true)" if cfg.debug else "config.yaml, metrics.jsonl, step-N/ checkpoints, LATEST"
    resumed = f"; resuming from {resume_from.name}" if resume_from is not None else ""
    rows = [("run directory", f"{run_dir} ({saved}){resumed}")]
    rows += model_rows(cfg, loss, reference_loaded, bool(cfg.precompute_ref_log_probs and loss is LossType.DPO))
    rows.append(("train data", data_lines(train_reports, train_ds, loss)))
    rows.append(("eval data", data_lines(eval_reports, None, loss) if eval_reports else "none (evaluation off)"))
    rows.append(("forward", route_line))
    rows.append(("memory", f"about {format_bytes(memory.total)} per step ({memory.describe()})"
                 if memory is not None else "not estimated on this device"))
    if checkpoint_size is not None:
        rows.append(("checkpoints", checkpoint_line(cfg, *checkpoint_size)))
    rows.append(("schedule", f"{total_steps} steps of {cfg.batch_size} examples, {cfg.optimizer} lr {number(cfg.lr)}, "
                 f"warmup {cfg.warmup_steps} steps"))
    return block(f"{entry_command()}: {cfg.exp_name} ({what}, {granular})", rows)


def _key(item: str) -> str:
    return item.lstrip("+~").split("=", 1)[0]


def stage_two_overrides(overrides: list[str], archive: Path, exp_name: str) -> list[str]:
    """The SFT run's overrides with the loss, weighting, rate and name of stage 2 and `model.archive`
    filled in; a key given twice is kept once, at its last (the value that took effect)."""
    last = {_key(item): i for i, item in enumerate(overrides)}
    kept = [item for i, item in enumerate(overrides) if last[_key(item)] == i
            and not (_key(item) in _STAGE_ONE_KEYS or _key(item).startswith("loss."))]
    return [*kept, *STAGE_TWO, f"exp_name={exp_name}_tdpo", f"model.archive={archive}"]


def _overrides_from_config(cfg: TrainConfig) -> list[str]:
    """Where the user's overrides are unknown (Hydra multirun): the keys that say which model and data."""
    keys = {"model.name_or_path": cfg.model.name_or_path, "datasets": "[" + ",".join(cfg.datasets) + "]",
            "custom_train_path": cfg.custom_train_path, "custom_eval_path": cfg.custom_eval_path,
            "local_dirs": "[" + ",".join(str(d) for d in cfg.local_dirs) + "]"}
    return [f"{key}={value}" for key, value in keys.items() if value is not None]


def next_command(cfg: TrainConfig, loss: LossType, run_dir: Path, overrides: list[str] | None,
                 sft_data: bool = False) -> str | None:
    """After SFT: stage 2 from this run's `LATEST` (on PAIRS.jsonl when the run's data held SFT records, which
    stage 2 refuses). After DPO / TDPO: task accuracy of the result."""
    if cfg.debug:
        return None
    run_dir = Path(os.path.abspath(run_dir))
    model = run_dir / ("merged" if cfg.lora.enabled and cfg.lora.merge_on_save else "LATEST")
    if loss is LossType.SFT:
        given = overrides if overrides is not None else _overrides_from_config(cfg)
        if sft_data:  # a key given again: its last value is kept
            given = [*given, "custom_train_path=PAIRS.jsonl",
                     *(["custom_eval_path=PAIRS_EVAL.jsonl"] if cfg.custom_eval_path else [])]
        items = stage_two_overrides(given, model, str(cfg.exp_name))
        return f"{entry_command()} " + " ".join(shlex.quote(item) for item in items)
    data = cfg.custom_eval_path or "EVAL.json"
    return f"granular-po eval --model {shlex.quote(str(model))} --data {shlex.quote(str(data))}"


def end_block(cfg: TrainConfig, loss: LossType, run_dir: Path, console, overrides: list[str] | None,
              latest: Path | None, global_step: int, published: list[tuple[str, str]] = (),
              sft_data: bool = False) -> str:
    """The closing block: final metrics, the checkpoint `LATEST` points to, the model card (and hub
    repository: `published`), the next command (`sft_data`: the training data held SFT records)."""
    summary = console.summary if console is not None else {}
    title = f"done: step {global_step}"
    if summary.get("train_runtime") is not None:
        title += f", {number(summary['train_runtime'])} s of training in this session"
    rows = []
    if console is not None and console.last_train:
        rows.append(("final train", f"step {console.last_train['step']}: {metric_line(console.last_train, 'train')}"))
    if console is not None and console.last_eval:
        rows.append(("final eval", f"step {console.last_eval['step']}: {metric_line(console.last_eval, 'eval')}"))
    if cfg.debug:
        rows.append(("checkpoint", "none (debug=true saves nothing)"))
    else:
        rows.append(("checkpoint", f"{run_dir / 'LATEST'} -> {latest.name}" if latest else "none written"))
        rows.append(("all metrics", str(run_dir / "metrics.jsonl")))
        rows += list(published)
    command = next_command(cfg, loss, run_dir, overrides, sft_data)
    if command:
        rows.append(("next", command))
    return block(title, rows)

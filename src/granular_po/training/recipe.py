"""Wire a checked config into data, models and `GranularTrainer`, then train, resume and save.

The one entry point behind `python -u train.py ...`, `granular-po train ...` and Hydra multirun.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import TrainingArguments
from transformers.trainer_callback import ProgressCallback

from granular_po.data.collate import PreferenceCollator, SFTCollator
from granular_po.data.encode import EncodeOptions, build_dataset
from granular_po.data.masks import GranularOptions
from granular_po.losses import LossType
from granular_po.settings import TrainConfig
from granular_po.training import checkpoints, reference_cache, resources
from granular_po.training.callbacks import MetricsFileCallback, ThrottledProgressCallback
from granular_po.training.config import RunSettings, check_inputs, existing_ancestor, redacted_yaml, validate
from granular_po.training.objectives import LossSettings
from granular_po.training.trainer import GranularTrainer

logger = logging.getLogger("granular_po")


def load_split(cfg: TrainConfig, split: str, tokenizer, enc: EncodeOptions, gran: GranularOptions):
    """One split of every dataset in `cfg.datasets`, validated and encoded (None when there is none), with
    one summary line each: records skipped while loading or encoding are counted and named there."""
    from datasets import concatenate_datasets

    parts = []
    for records, report in _split_sources(cfg, split, tokenizer.eos_token):
        parts.append(build_dataset(records, tokenizer, enc, gran, num_proc=cfg.num_proc, cache_dir=cfg.cache_dir,
                                   on_invalid=cfg.on_invalid, report=report))
        logger.info(report.summary())
        if report.n_skipped:
            print(report.summary(), file=sys.stderr)
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _split_sources(cfg: TrainConfig, split: str, eos_text: str | None):
    """(records, report) of one split, for every dataset in `cfg.datasets` that has the split."""
    from granular_po.data.records import load_hub_records, load_records

    for name in cfg.datasets:
        if name == "ours":
            path = cfg.custom_train_path if split == "train" else cfg.custom_eval_path
            if path is None:  # (a missing custom_train_path was refused by validate)
                logger.warning("notice: no custom_eval_path: evaluation is off")
                continue
            recs, report = load_records(path, on_invalid=cfg.on_invalid, eos_text=eos_text)
        else:
            recs, report = load_hub_records(name, split, on_invalid=cfg.on_invalid, cache_dir=cfg.cache_dir)
        yield recs, report


def _with_length(dataset):
    def length(example):
        return {"length": len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"]))}

    return dataset.map(length, desc="lengths")


def build_training_arguments(cfg: TrainConfig, settings: RunSettings) -> TrainingArguments:
    """Research-code keys to `TrainingArguments`; the loop, accumulation and engines come from there."""
    on_gpu = torch.cuda.is_available()
    fsdp_kwargs = {}
    if cfg.trainer == "FSDPTrainer" and on_gpu and settings.world_size > 1:
        fsdp_kwargs = {
            "fsdp": "full_shard auto_wrap",
            "fsdp_config": {
                "transformer_layer_cls_to_wrap": [cfg.model.block_name],
                "activation_checkpointing": bool(cfg.activation_checkpointing),
            },
        }
    elif cfg.trainer == "TensorParallelTrainer":
        logger.warning("notice: trainer=TensorParallelTrainer runs one process here (the research code's naive "
                       "tensor parallelism is not carried over); use FSDPTrainer to shard a model over GPUs")
    elif cfg.trainer == "FSDPTrainer":
        logger.warning("notice: trainer=FSDPTrainer needs several GPUs; running one process (BasicTrainer)")
    mixed = cfg.model.fsdp_policy_mp if fsdp_kwargs else None
    return TrainingArguments(
        output_dir=str(settings.run_dir),
        per_device_train_batch_size=settings.per_device_batch_size,
        per_device_eval_batch_size=max(1, cfg.eval_batch_size // settings.world_size),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.n_epochs,
        max_steps=settings.max_steps,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=1,
        eval_strategy="steps" if cfg.custom_eval_path or cfg.datasets != ["ours"] else "no",
        eval_steps=settings.eval_steps,
        eval_on_start=bool(cfg.do_first_eval),
        save_strategy="no" if cfg.debug else "steps",
        save_steps=settings.save_steps or 1,
        report_to=["wandb"] if cfg.wandb.enabled else "none",
        run_name=cfg.exp_name,
        remove_unused_columns=False,
        activation_checkpointing=bool(cfg.activation_checkpointing) and not fsdp_kwargs,
        dataloader_drop_last=False,  # the research code dropped the last partial batch every epoch
        use_cpu=not on_gpu,
        bf16=mixed == "bfloat16",
        fp16=mixed == "float16",
        disable_tqdm=False,
        **fsdp_kwargs,
    )


def warmup_warning(cfg: TrainConfig, n_examples: int, total_steps: int) -> str | None:
    """The research defaults (SGD, lr 5e-6, 150 warmup steps) on a small file: the run ends inside its
    warmup and the learning rate never reaches `lr`. Says so with the numbers and the keys to change."""
    if cfg.warmup_steps < total_steps or total_steps < 1:
        return None
    reached = cfg.lr * min(1.0, total_steps / (cfg.warmup_steps + 1))  # lr at the last step
    length = (f"n_examples={cfg.n_examples}" if cfg.n_examples is not None
              else f"{n_examples} examples x n_epochs={cfg.n_epochs}")
    return (f"warning: warmup_steps={cfg.warmup_steps} is as long as the run or longer: {total_steps} optimizer "
            f"steps ({length} / batch_size={cfg.batch_size}), so the learning rate only reaches {reached:.3g} "
            f"of lr={cfg.lr:g} at the last step. Lower warmup_steps (e.g. warmup_steps={total_steps // 10}), "
            "or train longer (n_epochs, n_examples); on small data see the README's small-data commands")


@contextlib.contextmanager
def wandb_environment(cfg: TrainConfig):
    """`wandb.project` / `wandb.entity` for this run, where transformers' WandbCallback and wandb read
    them (WANDB_PROJECT, WANDB_ENTITY); the previous environment comes back afterwards."""
    wanted = {}
    if cfg.wandb.enabled:
        wanted["WANDB_PROJECT"] = cfg.wandb.project
        if cfg.wandb.entity:
            wanted["WANDB_ENTITY"] = cfg.wandb.entity
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _maybe_relaunch_distributed(cfg: TrainConfig, argv: list[str]) -> bool:
    """trainer=FSDPTrainer started by plain `python train.py` on several GPUs: start one process per GPU
    through `accelerate launch` (the research code spawned its own). Returns True when relaunched."""
    if cfg.trainer != "FSDPTrainer" or "WORLD_SIZE" in os.environ or not torch.cuda.is_available():
        return False
    n_gpus = torch.cuda.device_count()
    if n_gpus < 2:
        return False
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n_gpus)]
    if cfg.fsdp_port:
        command += ["--main_process_port", str(cfg.fsdp_port)]
    command += argv
    print(f"starting {n_gpus} processes: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True)
    return True


def run_training(cfg: TrainConfig, argv: list[str] | None = None, settings: RunSettings | None = None) -> Path:
    """Train as the config says; returns the run directory (with `LATEST` unless debug=true).
    `settings`: what `validate(cfg)` returned, when the caller validated (and ran `check_inputs`) already.

    A start that fails, and a debug run, leave no directory behind (Trainer makes its output_dir as it
    is built; the run's own files are written only once the start has succeeded)."""
    if settings is None:
        settings = validate(cfg)
        check_inputs(cfg)
    untouched = existing_ancestor(settings.run_dir)
    ok = False
    try:
        run_dir = _train(cfg, argv, settings)
        ok = True
        return run_dir
    finally:
        if cfg.debug or not ok:
            _remove_empty_dirs(settings.run_dir, untouched)


def _remove_empty_dirs(path: Path, stop: Path) -> None:
    """Remove `path` and its parents up to `stop` (excluded) while they are empty directories."""
    path = path.absolute()
    while path != stop and stop in path.parents:
        try:
            path.rmdir()
        except OSError:  # not empty (or not there): leave it
            if path.exists():
                return
        path = path.parent


def _train(cfg: TrainConfig, argv: list[str] | None, settings: RunSettings) -> Path:
    from granular_po import models

    if argv is not None and _maybe_relaunch_distributed(cfg, argv):
        return settings.run_dir
    run_dir = settings.run_dir
    is_main = int(os.environ.get("RANK", "0")) == 0

    tokenizer_name = cfg.model.tokenizer_name_or_path or cfg.model.name_or_path
    tokenizer = models.load_tokenizer(models.resolve_model_path(tokenizer_name, cfg.cache_dir),
                                      trust_remote_code=cfg.trust_remote_code)
    enc, gran = cfg.encode_options(), cfg.granular
    train_ds = _with_length(load_split(cfg, "train", tokenizer, enc, gran))
    eval_ds = load_split(cfg, "test", tokenizer, enc, gran)
    if eval_ds is not None and cfg.n_eval_examples is not None:
        eval_ds = eval_ds.select(range(min(cfg.n_eval_examples, len(eval_ds))))
    if eval_ds is not None and len(eval_ds) == 0:
        eval_ds = None
    total_steps = settings.max_steps if settings.max_steps > 0 else (
        -(-len(train_ds) // cfg.batch_size) * cfg.n_epochs)
    if (warning := warmup_warning(cfg, len(train_ds), total_steps)) and is_main:
        logger.warning(warning)

    loss_type = settings.loss
    loss_settings = LossSettings.from_config(cfg, loss_type)
    policy, reference = models.load_policy_and_reference(
        cfg.model, loss_needs_reference=loss_settings.needs_reference,
        lora_cfg=cfg.lora if cfg.lora.enabled else None, trust_remote_code=cfg.trust_remote_code,
        cache_dir=cfg.cache_dir,
    )
    resources.preflight(cfg, policy, reference, settings)  # memory (CPU) and checkpoint disk space
    collator_cls = SFTCollator if loss_type is LossType.SFT else PreferenceCollator
    args = build_training_arguments(cfg, settings)
    if eval_ds is None:
        args.eval_strategy = "no"
        args.eval_on_start = False
    optimizer_cls = getattr(torch.optim, cfg.optimizer)  # checked by validate
    trainer = GranularTrainer(
        model=policy, ref_model=reference, args=args, loss_settings=loss_settings,
        data_collator=collator_cls(pad_token_id=tokenizer.pad_token_id),
        train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        optimizer_cls_and_kwargs=(optimizer_cls, {"lr": cfg.lr}),
        warmup_steps=cfg.warmup_steps, group_by_length=cfg.group_by_length, run_dir=run_dir,
        padding_free=cfg.padding_free, share_prompt=str(cfg.share_prompt),
        max_length=cfg.max_length,
        callbacks=[MetricsFileCallback(None if cfg.debug else run_dir / "metrics.jsonl")],
    )
    if cfg.sample_during_eval and eval_ds is not None and not cfg.debug:
        from granular_po.training.callbacks import SampleDuringEvalCallback

        trainer.add_callback(SampleDuringEvalCallback(
            trainer, run_dir / "samples.jsonl", cfg.n_eval_model_samples,
            max_new_tokens=max(1, cfg.max_length - cfg.max_prompt_length), seed=cfg.seed))
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ThrottledProgressCallback(cfg.minimum_log_interval_secs))

    if cfg.precompute_ref_log_probs and loss_type is LossType.DPO and not loss_settings.reference_free:
        cache_dir, batch = cfg.cache_dir or models_cache_dir(), cfg.eval_batch_size
        trainer.train_dataset = reference_cache.with_reference_logps(trainer, train_ds, cache_dir, batch)
        if eval_ds is not None:
            trainer.eval_dataset = reference_cache.with_reference_logps(trainer, eval_ds, cache_dir, batch)
        trainer.ref_model = reference = None  # the reference is no longer needed: free its memory
    resume_from = _resume_point(cfg, run_dir, is_main)
    if is_main and not cfg.debug:  # written once the start has succeeded: a failed start leaves nothing
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(redacted_yaml(cfg))
    if resume_from is not None:
        trainer.args.eval_on_start = False  # do_first_eval: before the first step, not at every restart
    done = resume_from is not None and int(resume_from.name.removeprefix("step-")) >= total_steps
    if done:  # the same command again on a finished run: nothing to train (Trainer would add a step)
        print(f"run already complete at {resume_from.name} of {total_steps} steps", flush=True)
        return run_dir
    with wandb_environment(cfg):
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if not cfg.debug:
        last = checkpoints.latest_complete_checkpoint(run_dir)
        if last is None or last.name != checkpoints.step_dir_name(trainer.state.global_step):
            trainer._save_checkpoint(trainer.model, trial=None)
        if cfg.lora.enabled and cfg.lora.merge_on_save and is_main:
            _save_merged(trainer, tokenizer, run_dir)
    if trainer.zero_weight_batches:
        print(f"{trainer.zero_weight_batches} batches had no weighted token", file=sys.stderr)
    return run_dir


def _save_merged(trainer: GranularTrainer, tokenizer, run_dir: Path) -> None:
    """LoRA with `lora.merge_on_save=true`: also write `merged/`, the base with the adapter folded in."""
    import copy
    import shutil

    merged = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model)).merge_and_unload()
    staged = run_dir / ".tmp-merged"
    shutil.rmtree(staged, ignore_errors=True)
    merged.save_pretrained(staged)
    tokenizer.save_pretrained(staged)
    final = run_dir / "merged"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staged, final)


def models_cache_dir() -> Path:
    from granular_po.models import default_cache_dir

    return default_cache_dir()


def _resume_point(cfg: TrainConfig, run_dir: Path, is_main: bool) -> Path | None:
    """The newest complete checkpoint when resuming is asked for (or `auto` and one exists)."""
    mode = str(cfg.resume).lower()
    if cfg.debug:
        return None
    if mode == "false":  # start the run over: what an earlier run of this name wrote goes
        if is_main and (removed := checkpoints.clear_run(run_dir)):
            print(f"resume=false: starting {run_dir} over (removed {', '.join(removed)})", flush=True)
        return None
    if is_main:
        for name in checkpoints.remove_stale_staging(run_dir):
            print(f"removed half-written checkpoint {name}", flush=True)
    latest = checkpoints.latest_complete_checkpoint(run_dir)
    if is_main:  # steps logged after the checkpoint are trained (and logged) again: drop their records
        step = int(latest.name.removeprefix("step-")) if latest is not None else 0
        if dropped := checkpoints.truncate_metrics(run_dir / "metrics.jsonl", step):
            print(f"metrics.jsonl: dropped {dropped} records logged after step-{step} (they will be re-run)",
                  flush=True)
    if latest is None:
        if mode == "true":
            print(f"resume=true but no complete checkpoint in {run_dir}: starting from scratch", flush=True)
        return None
    print(f"resuming from {latest.name}", flush=True)
    if is_main:  # a kill between a checkpoint's rename and the LATEST swap leaves LATEST one behind
        checkpoints.point_latest(run_dir, latest.name)
    return latest

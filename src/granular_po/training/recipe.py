"""Wire a checked config into data, models and `GranularTrainer`, then train, resume and save.

The one entry point behind `python -u train.py ...`, `granular-po train ...` and Hydra multirun.
(About 400 lines: the order in which a run is wired -- data, models, trainer, resume, the start-up and
closing blocks, the guarantee that a failed start leaves nothing -- reads best in one place; the parts
with a job of their own live beside it: `reference_cache`, `precision`, `optimizer`, `briefing`.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from granular_po.data.collate import PreferenceCollator, SFTCollator
from granular_po.data.encode import EncodeOptions, build_dataset
from granular_po.data.masks import GranularOptions
from granular_po.losses import LossType
from granular_po.settings import TrainConfig
from granular_po.training import briefing, checkpoints, console, publish, reference_cache, resources
from granular_po.training.adapter_base import base_writer
from granular_po.training.callbacks import MetricsFileCallback
from granular_po.training.config import RunSettings, existing_ancestor, redacted_yaml, validate
from granular_po.training.inputs import check_inputs
from granular_po.training.objectives import LossSettings
from granular_po.training.optimizer import describe as describe_optimizer
from granular_po.training.optimizer import optimizer_kwargs
from granular_po.training.optimizer import weight_decay as optimizer_weight_decay
from granular_po.training.precision import DeviceCaps, Precision, choose_precision
from granular_po.training.trainer import GranularTrainer

logger = logging.getLogger("granular_po")


def load_split(cfg: TrainConfig, split: str, tokenizer, enc: EncodeOptions, gran: GranularOptions,
               sft: bool = False):
    """(dataset, load reports) of one split of every dataset in `cfg.datasets`, validated and encoded (None
    when there is none). The reports count and name the records skipped while loading or encoding; their
    summary lines go into the start-up block. `sft`: the hub datasets give their SFT records (one per
    prompt for se and shp, as the research code)."""
    from datasets import concatenate_datasets

    from granular_po.data.shape import (
        check_fields,
        refuse_granular_sft,
        refuse_unpaired,
        require_regions,
        shape_warnings,
    )

    parts, reports = [], []
    for records, report in _split_sources(cfg, split, tokenizer.eos_token, sft):
        check_fields(report, cfg.on_invalid)  # a field misspelt in every record: refused (on_invalid=error)
        refuse_granular_sft(records, report.source, gran)  # SFT records have no regions to weigh by
        refuse_unpaired(report, sft)  # DPO / TDPO on a file of SFT records only (on_invalid=skip)
        report.warnings = shape_warnings(report, records, gran, preference=not sft)
        parts.append(build_dataset(records, tokenizer, enc, gran, num_proc=cfg.num_proc, cache_dir=cfg.cache_dir,
                                   on_invalid=cfg.on_invalid, report=report))
        logger.debug(report.summary())
        if report.n_skipped:  # also in the start-up block; a skip is worth a line on stderr too
            print(report.summary(), file=sys.stderr)
        reports.append(report)
    if split == "train":
        require_regions(reports, gran)  # granular=true on data without a region would be plain DPO / SFT
    if not parts:
        return None, reports
    return (parts[0] if len(parts) == 1 else concatenate_datasets(parts)), reports


def _split_sources(cfg: TrainConfig, split: str, eos_text: str | None, sft: bool):
    """(records, report) of one split, for every dataset in `cfg.datasets` that has the split."""
    from granular_po.data.formats import load_data
    from granular_po.data.hub import load_hub_records

    for name in cfg.datasets:
        if name == "ours":
            path = cfg.custom_train_path if split == "train" else cfg.custom_eval_path
            if path is None:  # (a missing custom_train_path was refused by validate)
                logger.warning("notice: no custom_eval_path: evaluation is off")
                continue
            recs, report = load_data(path, on_invalid=cfg.on_invalid, eos_text=eos_text,
                                     columns=asdict(cfg.columns), cache_dir=cfg.cache_dir, sft=sft)
        else:
            recs, report = load_hub_records(name, split, on_invalid=cfg.on_invalid, cache_dir=cfg.cache_dir,
                                            eos_text=eos_text, sft=sft)
        yield recs, report


def _with_length(dataset):
    def length(example):
        return {"length": len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"]))}

    return dataset.map(length, desc="lengths")


def uses_fsdp(cfg: TrainConfig, settings: RunSettings) -> bool:
    """trainer=FSDPTrainer with several processes (GPUs, or CPU processes over gloo as the tests run it),
    or one process started by a distributed launcher (torchrun: FSDP over one GPU, to check the path)."""
    return cfg.trainer == "FSDPTrainer" and (settings.world_size > 1 or "LOCAL_RANK" in os.environ)


def run_precision(cfg: TrainConfig, settings: RunSettings, device: DeviceCaps | None = None) -> Precision:
    """The run's precision (`training.precision.choose_precision`) from the config and this device."""
    return choose_precision(
        cfg.model.policy_dtype, cfg.model.reference_dtype, cfg.mixed_precision, device or DeviceCaps.detect(),
        fsdp_policy_mp=cfg.model.fsdp_policy_mp if uses_fsdp(cfg, settings) else None,
    )


def build_training_arguments(cfg: TrainConfig, settings: RunSettings,
                             precision: Precision | None = None) -> TrainingArguments:
    """Research-code keys to `TrainingArguments`; the loop, accumulation and engines come from there."""
    on_gpu = torch.cuda.is_available()
    precision = precision or run_precision(cfg, settings)
    fsdp_kwargs = {}
    if uses_fsdp(cfg, settings):
        fsdp_kwargs = {
            "fsdp": True,
            "fsdp_config": {  # FSDP2 (`fully_shard`): parameters sharded, gathered block by block
                "version": 2,
                "reshard_after_forward": True,  # full shard
                "transformer_layer_cls_to_wrap": [cfg.model.block_name],
                "activation_checkpointing": bool(cfg.activation_checkpointing),
            },
        }
    elif cfg.trainer == "TensorParallelTrainer":
        logger.warning("notice: trainer=TensorParallelTrainer runs one process here (the research code's naive "
                       "tensor parallelism is not carried over); use FSDPTrainer to shard a model over GPUs")
    elif cfg.trainer == "FSDPTrainer":
        logger.warning("notice: trainer=FSDPTrainer needs several processes; running one (BasicTrainer)")
    return TrainingArguments(
        output_dir=str(settings.run_dir),
        per_device_train_batch_size=settings.per_device_batch_size,
        per_device_eval_batch_size=max(1, cfg.eval_batch_size // settings.world_size),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.n_epochs,
        max_steps=settings.max_steps,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        # the class's own default unless set (AdamW 0.01, as the research code's AdamW(params, lr=lr))
        weight_decay=optimizer_weight_decay(getattr(torch.optim, cfg.optimizer), cfg.weight_decay),
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=1,
        # the non-finite guard checks the losses once per step (GranularTrainer._get_grad_norm); Trainer's
        # filter would read every micro-batch's loss back from the device
        logging_nan_inf_filter=False,
        # batches go to the GPU from pinned memory without waiting for the work queued before them
        accelerator_config={"non_blocking": on_gpu},
        eval_strategy="steps" if cfg.custom_eval_path or cfg.datasets != ["ours"] else "no",
        eval_steps=settings.eval_steps,
        eval_on_start=bool(cfg.do_first_eval),
        save_strategy="no" if cfg.debug else "steps",
        save_steps=settings.save_steps or 1,
        report_to=list(settings.report_to) or "none",  # reconciled with wandb.enabled by validate
        run_name=cfg.exp_name,
        remove_unused_columns=False,
        activation_checkpointing=bool(cfg.activation_checkpointing) and not fsdp_kwargs,
        dataloader_drop_last=False,  # the research code dropped the last partial batch every epoch
        use_cpu=not on_gpu,
        **precision.training_arguments,  # bf16 / fp16 autocast over fp32 master weights
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
def wandb_environment(cfg: TrainConfig, report_to: tuple[str, ...] | None = None):
    """`wandb.project` / `wandb.entity` for this run, where transformers' WandbCallback and wandb read
    them (WANDB_PROJECT, WANDB_ENTITY); the previous environment comes back afterwards. `report_to`: the
    run's loggers (`RunSettings.report_to`); None: wandb as `wandb.enabled` says."""
    wanted = {}
    if cfg.wandb.enabled or (report_to is not None and ("wandb" in report_to or "all" in report_to)):
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


def run_training(cfg: TrainConfig, argv: list[str] | None = None, settings: RunSettings | None = None,
                 overrides: list[str] | None = None) -> Path:
    """Train as the config says; returns the run directory (with `LATEST` unless debug=true).
    `settings`: what `validate(cfg)` returned, when the caller validated (and ran `check_inputs`) already;
    `overrides` (the user's, as typed) make the closing block's next command; `argv` relaunches FSDP.

    A start that fails, and a debug run, leave no directory behind (Trainer makes its output_dir as it
    is built; the run's own files are written only once the start has succeeded)."""
    if settings is None:
        settings = validate(cfg)
        check_inputs(cfg)
    untouched = existing_ancestor(settings.run_dir)
    ok = False
    try:
        run_dir = _train(cfg, argv, settings, overrides)
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


def _train(cfg: TrainConfig, argv: list[str] | None, settings: RunSettings,
           overrides: list[str] | None) -> Path:
    from granular_po import models

    if argv is not None and _maybe_relaunch_distributed(cfg, argv):
        return settings.run_dir
    run_dir = settings.run_dir
    is_main = int(os.environ.get("RANK", "0")) == 0
    if not console.interactive():  # a log file: no carriage-return bars from the libraries
        console.quiet_library_bars()

    tokenizer_name = cfg.model.tokenizer_name_or_path or cfg.model.name_or_path
    tokenizer = models.load_tokenizer(models.resolve_model_path(tokenizer_name, cfg.cache_dir),
                                      trust_remote_code=cfg.trust_remote_code)
    enc, gran = cfg.encode_options(), cfg.granular
    sft = settings.loss is LossType.SFT
    train_ds, train_reports = load_split(cfg, "train", tokenizer, enc, gran, sft)
    train_ds = _with_length(train_ds)
    eval_ds, eval_reports = load_split(cfg, "test", tokenizer, enc, gran, sft)
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
    precision = run_precision(cfg, settings)
    logger.info(precision.describe())
    policy, reference = models.load_policy_and_reference(
        cfg.model, loss_needs_reference=loss_settings.needs_reference,
        lora_cfg=cfg.lora if cfg.lora.enabled else None, trust_remote_code=cfg.trust_remote_code,
        cache_dir=cfg.cache_dir, policy_dtype=precision.policy_dtype, reference_dtype=precision.reference_dtype,
        seed=cfg.seed,  # the LoRA matrices: drawn before Trainer seeds
        lora_base=base_writer(cfg, run_dir, tokenizer, is_main),  # LoRA on a policy.pt: run/base/
    )
    memory = resources.preflight(cfg, policy, reference, settings)  # memory (CPU) and checkpoint disk space
    collator_cls = SFTCollator if loss_type is LossType.SFT else PreferenceCollator
    args = build_training_arguments(cfg, settings, precision)
    if eval_ds is None:
        args.eval_strategy = "no"
        args.eval_on_start = False
    optimizer_cls = getattr(torch.optim, cfg.optimizer)  # checked by validate
    # torch's fused (else foreach) implementation of it where there is one: the same update, far fewer kernels
    trainable = next((p for p in policy.parameters() if p.requires_grad), None)
    opt_kwargs = optimizer_kwargs(optimizer_cls, cfg.lr, args.device,
                                  trainable.dtype if trainable is not None else torch.float32,
                                  sharded=uses_fsdp(cfg, settings))
    logger.info("optimizer: %s", describe_optimizer(optimizer_cls, opt_kwargs, args.weight_decay))
    trainer = GranularTrainer(
        model=policy, ref_model=reference, args=args, loss_settings=loss_settings,
        data_collator=collator_cls(pad_token_id=tokenizer.pad_token_id),
        train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        optimizer_cls_and_kwargs=(optimizer_cls, opt_kwargs),
        warmup_steps=cfg.warmup_steps, group_by_length=cfg.group_by_length, run_dir=run_dir,
        padding_free=cfg.padding_free, share_prompt=str(cfg.share_prompt),
        max_length=cfg.max_length, save_total_limit=cfg.save_total_limit,
        callbacks=[MetricsFileCallback(None if cfg.debug else run_dir / "metrics.jsonl")],
    )
    if uses_fsdp(cfg, settings) and not trainer.is_fsdp_enabled:  # Accelerate runs FSDP on GPUs only
        logger.warning("notice: trainer=FSDPTrainer: Accelerate enables FSDP on GPUs only; the %d CPU "
                       "process(es) run data-parallel (DDP) with full copies of the model", settings.world_size)
    if cfg.sample_during_eval and eval_ds is not None and not cfg.debug:
        from granular_po.training.callbacks import SampleDuringEvalCallback

        trainer.add_callback(SampleDuringEvalCallback(
            trainer, run_dir / "samples.jsonl", cfg.n_eval_model_samples,
            max_new_tokens=max(1, cfg.max_length - cfg.max_prompt_length), seed=cfg.seed))
    for noisy in (ProgressCallback, PrinterCallback):  # dicts of strings, cursor escapes in log files
        trainer.remove_callback(noisy)
    screen = console.ConsoleCallback(cfg.minimum_log_interval_secs)
    trainer.add_callback(screen)

    if reference is not None and is_main and precision.reference_dtype != precision.policy_dtype:
        sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled  # not measured: not yet sharded
        offset = None if sharded else trainer.reference_offset(train_ds, settings.per_device_batch_size)
        logger.warning(briefing.reference_offset_notice(cfg, precision, offset))  # how far off it starts
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
        if is_main:
            print(briefing.end_block(cfg, loss_type, run_dir, None, overrides, resume_from,
                                     int(resume_from.name.removeprefix("step-")),
                                     sft_data=any(r.n_sft for r in train_reports)), flush=True)
        return run_dir
    if is_main:
        print(briefing.start_block(
            cfg, settings, train_reports=train_reports, eval_reports=eval_reports, train_ds=train_ds,
            route_line=briefing.forward_line(trainer.route, loss_settings), memory=memory, reference_loaded=reference is not None,
            total_steps=total_steps, resume_from=resume_from,
            checkpoint_size=resources.checkpoint_size(cfg, policy, resume_from)), flush=True)
    with wandb_environment(cfg, settings.report_to):
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if not cfg.debug:
        last = checkpoints.latest_complete_checkpoint(run_dir)
        if last is None or last.name != checkpoints.step_dir_name(trainer.state.global_step):
            trainer._save_checkpoint(trainer.model, trial=None)
        if cfg.lora.enabled and cfg.lora.merge_on_save and is_main:
            _save_merged(trainer, tokenizer, run_dir)
    if trainer.zero_weight_batches:
        print(f"{trainer.zero_weight_batches} batches had no weighted token", file=sys.stderr)
    if is_main:
        latest = None if cfg.debug else checkpoints.latest_complete_checkpoint(run_dir)
        folder, rows = (None, []) if latest is None else publish.write_final_card(
            cfg, loss_type, run_dir, latest, train_reports, trainer.state.global_step, screen)
        print(briefing.end_block(cfg, loss_type, run_dir, screen, overrides, latest, trainer.state.global_step,
                                 rows, sft_data=any(r.n_sft for r in train_reports)), flush=True)
        if cfg.push_to_hub and folder is not None:  # after the closing block: a failed upload loses nothing
            print(f"pushed to {publish.push(folder, cfg.hub_model_id or cfg.exp_name)}", flush=True)
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

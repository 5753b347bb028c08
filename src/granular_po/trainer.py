"""`GranularTrainer`: one `transformers.Trainer` subclass for SFT, DPO and TDPO with token weights.

Accumulation, mixed precision, DDP / FSDP / DeepSpeed (through Accelerate), LR schedules and logging
integrations come from `transformers.Trainer`. What we change, and why:
- `compute_loss`: the granular losses, metrics under the research code's names.
- `_save_checkpoint`: atomic `step-N/` folders and a `LATEST` link (Trainer's are not crash-safe);
  the arguments as `training_args.json`, not Trainer's pickled `training_args.bin`.
- `create_scheduler`: the research code's warmup, `min(1, (step + 1) / (warmup_steps + 1))`.
- `_get_train_sampler`: seeded by (seed, epoch), grouped by length; the resumed order is the same.
- `_get_grad_norm`: a non-finite gradient norm stops the run, naming the step and records.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import Trainer
from transformers.trainer_callback import ProgressCallback, TrainerCallback

from granular_po import checkpoints
from granular_po.logprobs import compute_token_stats, forward_hidden, supports_hidden_path, unwrap_model
from granular_po.losses import LossType, dpo_loss, sft_loss, tdpo_loss
from granular_po.packing import PackedBatch, attention_cost, check_packing, pack_batch, packs_in_one_row
from granular_po.prompt_sharing import (
    check_prompt_sharing,
    forward_hidden_shared,
    sliding_window_conflict,
    split_prompts,
)
from granular_po.sampler import SeededLengthGroupedSampler

logger = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A loss or gradient norm became NaN or infinite; names the step and the batch's records."""


@dataclass(frozen=True)
class LossSettings:
    """The loss and how token statistics are computed (from `loss.*`, `logprobs.*`, `skip_nonfinite`)."""

    loss: LossType
    beta: float = 0.1
    alpha: float = 0.5
    if_tdpo2: bool = False
    label_smoothing: float = 0.0
    reference_free: bool = False
    average_log_prob: bool = False
    logprobs_impl: str = "chunked"
    chunk_size: int = 256
    skip_nonfinite: bool = False


def hidden_states_and_head(model, input_ids, attention_mask, use_hidden_path: bool,
                           packed: PackedBatch | None = None):
    """`(hidden (N, T, H), head, None)` without full logits, or `(None, None, logits (N, T, V))`.

    With `packed`, the model runs on the packed real tokens and the outputs come back padded.
    """
    position_ids = None
    if packed is not None:
        input_ids, attention_mask, position_ids = packed.input_ids, None, packed.position_ids
    if not use_hidden_path:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits
        return None, None, logits if packed is None else packed.unpack(logits)
    hidden, head = forward_hidden(model, input_ids, attention_mask, position_ids=position_ids)
    return (hidden if packed is None else packed.unpack(hidden)), head, None


class MetricsFileCallback(TrainerCallback):
    """Appends every log (train and eval) to `metrics.jsonl`, one JSON object a line, main process only."""

    def __init__(self, path: Path | None):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.path is None or not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class ThrottledProgressCallback(ProgressCallback):
    """The Trainer's progress bar, printing metrics at most every `minimum_log_interval_secs`."""

    def __init__(self, minimum_interval: float):
        super().__init__()
        self.minimum_interval = minimum_interval
        self._last = 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):
        now = time.monotonic()
        is_eval = any(k.startswith(("eval_", "rewards_eval", "loss/eval")) for k in (logs or {}))
        if is_eval or now - self._last >= self.minimum_interval:
            self._last = now
            super().on_log(args, state, control, logs=logs, **kwargs)


class GranularTrainer(Trainer):
    """SFT / DPO / TDPO on granular token weights. `ref_model` is None for SFT and for LoRA policies."""

    def __init__(self, *args, ref_model=None, loss_settings: LossSettings, run_dir: Path | None = None,
                 warmup_steps: int = 0, group_by_length: bool = True, save_total_limit: int | None = None,
                 padding_free: bool = False, share_prompt: str | bool = False,
                 max_length: int | None = None, **kwargs):
        self.loss_settings = loss_settings
        self.ref_model = ref_model
        self.run_dir = run_dir
        self.warmup_steps = warmup_steps
        self.group_by_length = group_by_length
        self.keep_checkpoints = save_total_limit
        self._stored = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.nonfinite_skipped = 0
        self.zero_weight_batches = 0
        self._last_indices: list[int] = []
        self._step_indices: list[int] = []  # records of every micro-batch of the current optimizer step
        self._skip_step = False  # a micro-batch of this step had a non-finite loss (skip_nonfinite=true)
        self._last_log_time = time.monotonic()
        self._examples_since_log = 0
        super().__init__(*args, **kwargs)
        # Our loss is a per-batch mean: let the Trainer divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.use_hidden_path = loss_settings.logprobs_impl == "chunked" and supports_hidden_path(self.model)
        # the fused head reads the lm_head's weights directly: not where FSDP / DeepSpeed shard them
        self.fused_head = not (getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False))
        if self.ref_model is not None:
            self.ref_model.eval()
            self.ref_model.requires_grad_(False)
            self.ref_model.to(self.args.device)
        self.padding_free = padding_free
        self._attention_cost = None
        if padding_free:  # refuse a model whose packed outputs differ, before any step
            for name, m in (("policy", self.model), ("reference", self.ref_model)):
                if m is not None:
                    check_packing(m, what=name)
            self._attention_cost = attention_cost(self.model)
        self.share_prompt = self._resolve_share_prompt(str(share_prompt).lower(), padding_free, max_length)

    def _resolve_share_prompt(self, mode: str, padding_free: bool, max_length: int | None) -> bool:
        """Whether chosen and rejected rows share one prompt forward: `auto` turns it on where it is
        exact (checked on the models at start-up), `true` insists (an error says why it cannot)."""
        if mode not in ("auto", "true", "false"):
            raise ValueError(f"share_prompt={mode!r}: expected auto, true or false")
        if mode == "false":
            return False
        why_not = None
        if not self.loss_settings.loss.is_preference:
            why_not = "SFT has no response pairs"
        elif not self.use_hidden_path:
            why_not = "it needs logprobs.impl=chunked on a model whose logits are its lm_head's output"
        elif self.args.gradient_checkpointing:
            why_not = "activation checkpointing drops the key/value cache"
        elif getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            why_not = "not verified with FSDP or DeepSpeed"
        elif padding_free:
            why_not = "padding_free=true packs the rows instead"
        elif sliding_window_conflict(self.model, max_length):
            why_not = sliding_window_conflict(self.model, max_length)
        else:
            try:
                for name, m in (("policy", self.model), ("reference", self.ref_model)):
                    if m is not None:
                        check_prompt_sharing(m, what=name)
            except ValueError as exc:
                why_not = str(exc)
        if why_not is not None and mode == "true":
            raise ValueError(f"share_prompt=true: {why_not}")
        if why_not is not None and self.loss_settings.loss.is_preference:
            logger.info("share_prompt: off (%s)", why_not)
        return why_not is None

    def model_outputs(self, model, batch, layouts: dict | None = None):
        """`hidden_states_and_head` for the batch, by the cheapest exact route: one shared prompt forward
        (`share_prompt`), packed real tokens (`padding_free`), or the padded rows. `layouts` carries the
        batch's split / packing from the policy's call to the reference's, so neither is built twice."""
        layouts = {} if layouts is None else layouts
        pad_id = getattr(self.data_collator, "pad_token_id", 0)
        if self.share_prompt and "response_mask" in batch:
            if "split" not in layouts:
                layouts["split"] = split_prompts(batch["input_ids"], batch["attention_mask"],
                                                 batch["response_mask"], pad_id)
            hidden = forward_hidden_shared(model, layouts["split"])
            return hidden, unwrap_model(model).get_output_embeddings(), None
        packed = None
        if self.padding_free:
            one_row = packs_in_one_row(self.accelerator.unwrap_model(model))
            if ("packed", one_row) not in layouts:
                layouts[("packed", one_row)] = pack_batch(batch["input_ids"], batch["attention_mask"], pad_id,
                                                          one_row=one_row, attention_cost=self._attention_cost)
            packed = layouts[("packed", one_row)]
        return hidden_states_and_head(model, batch["input_ids"], batch["attention_mask"], self.use_hidden_path,
                                      packed)

    # ---- data ----
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        global_batch = (self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
                        * self.args.world_size)
        return SeededLengthGroupedSampler(
            dataset["length"], group_size=global_batch, seed=self.args.seed, group_by_length=self.group_by_length
        )

    # ---- optimisation ----
    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            warmup = self.warmup_steps
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1))
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _get_grad_norm(self, model, grad_norm=None):
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        value = float(norm) if norm is not None else 0.0
        skip, self._skip_step = self._skip_step, False
        indices, self._step_indices = self._step_indices, []
        if not math.isfinite(value):
            where = f"step {self.state.global_step + 1}, records {indices}"
            if not self.loss_settings.skip_nonfinite:
                raise NonFiniteError(f"non-finite gradient norm ({value}) at {where}; "
                                     "set skip_nonfinite=true to skip such steps")
            logger.warning("skipping optimizer step: non-finite gradient norm at %s", where)
            skip = True
        if skip:  # zero gradients would still move Adam-like optimizers (momentum): drop them
            self.nonfinite_skipped += 1
            for param in model.parameters():
                param.grad = None  # the optimizer leaves parameters without gradients untouched
        return norm

    # ---- loss ----
    def _reference_context(self):
        if self.ref_model is not None:
            return contextlib.nullcontext()
        inner = self.accelerator.unwrap_model(self.model)
        if hasattr(inner, "disable_adapter"):
            return inner.disable_adapter()
        raise RuntimeError("a preference loss needs a reference model (or a LoRA policy)")

    def token_stats(self, model, batch, need_reference: bool):
        """Per-sequence weighted log-probs, log-ratios and sequential KL for the batch's rows."""
        settings = self.loss_settings
        ids, weights = batch["input_ids"], batch["loss_weights"]
        layouts: dict = {}
        hidden, head, logits = self.model_outputs(model, batch, layouts)
        ref_hidden = ref_head = ref_logits = None
        if need_reference:
            with torch.inference_mode(), self._reference_context():
                ref = self.ref_model if self.ref_model is not None else model
                ref_hidden, ref_head, ref_logits = self.model_outputs(ref, batch, layouts)
        return compute_token_stats(
            policy_hidden=hidden, policy_head=head, ref_hidden=ref_hidden, ref_head=ref_head,
            policy_logits=logits, ref_logits=ref_logits, input_ids=ids, loss_weights=weights,
            need_kl=settings.loss.needs_kl, average=settings.average_log_prob,
            reference_free=settings.reference_free,
            impl=settings.logprobs_impl, chunk_size=settings.chunk_size, fused=self.fused_head,
        )

    @torch.inference_mode()
    def reference_logps(self, dataset, batch_size: int) -> tuple[list[float], list[float]]:
        """The reference's weighted log-probs of every (chosen, rejected) of `dataset`, in order (DPO only:
        TDPO's KL needs the live reference distribution at every step)."""
        from torch.utils.data import DataLoader

        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=self.data_collator)
        chosen, rejected = [], []
        for batch in tqdm(loader, desc="reference log-probs", disable=not self.is_world_process_zero()):
            batch = self._prepare_inputs(batch)
            ref = self.ref_model if self.ref_model is not None else self.model
            with self._reference_context():
                hidden, head, logits = self.model_outputs(ref, batch)
            stats = compute_token_stats(
                hidden, head, None, None, batch["input_ids"], batch["loss_weights"], False,
                self.loss_settings.average_log_prob, policy_logits=logits,
                impl=self.loss_settings.logprobs_impl, chunk_size=self.loss_settings.chunk_size,
                fused=self.fused_head,
            )
            n = batch["input_ids"].shape[0] // 2
            chosen += stats.policy_logps[:n].float().cpu().tolist()
            rejected += stats.policy_logps[n:].float().cpu().tolist()
        return chosen, rejected

    def loss_and_metrics(self, model, batch, split: str):
        """The batch's mean loss and per-example metric tensors named as the research code named them."""
        settings = self.loss_settings
        precomputed = batch.get("ref_logps")
        need_reference = settings.loss.needs_reference and not settings.reference_free and precomputed is None
        stats = self.token_stats(model, batch, need_reference)
        if precomputed is not None:
            stats.logratio = stats.policy_logps - precomputed.to(stats.policy_logps.dtype)
        metrics = {}
        if settings.loss is LossType.SFT:
            losses = sft_loss(stats.policy_logps)
            metrics[f"logps_{split}/chosen"] = stats.policy_logps.detach()
        else:
            n = batch["input_ids"].shape[0] // 2
            margin = stats.logratio
            if settings.loss is LossType.DPO:
                losses, chosen_r, rejected_r = dpo_loss(margin[:n], margin[n:], settings.beta, settings.label_smoothing)
            else:
                kl = stats.position_kl
                losses, chosen_r, rejected_r = tdpo_loss(
                    margin[:n], margin[n:], kl[:n], kl[n:], settings.beta, settings.alpha, settings.if_tdpo2
                )
                metrics[f"kl_{split}/chosen"] = kl[:n].detach()
                metrics[f"kl_{split}/rejected"] = kl[n:].detach()
                metrics[f"kl_{split}/margin"] = (kl[n:] - kl[:n]).detach()
            metrics[f"rewards_{split}/chosen"] = chosen_r
            metrics[f"rewards_{split}/rejected"] = rejected_r
            metrics[f"rewards_{split}/accuracies"] = (chosen_r > rejected_r).float()
            metrics[f"rewards_{split}/margins"] = chosen_r - rejected_r
            metrics[f"logps_{split}/chosen"] = stats.policy_logps[:n].detach()
            metrics[f"logps_{split}/rejected"] = stats.policy_logps[n:].detach()
        weight_sum = stats.weight_sum.detach()
        if "response_mask" in batch:
            metrics[f"weighted_token_share_{split}"] = (
                (batch["loss_weights"] > 0).sum(-1).float() / batch["response_mask"].sum(-1).clamp(min=1).float()
            )
        if bool((weight_sum == 0).all()):
            self.zero_weight_batches += 1
            logger.warning("batch with records %s has no weighted token: nothing to learn from it",
                           batch["index"].tolist())
        loss = losses.mean()
        metrics[f"loss/{split}"] = losses.detach()
        return loss, metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._last_indices = inputs["index"].tolist()
        self._step_indices.extend(self._last_indices)
        loss, metrics = self.loss_and_metrics(model, inputs, "train")
        if not torch.isfinite(loss):
            where = f"step {self.state.global_step + 1}, records {self._last_indices}"
            if not self.loss_settings.skip_nonfinite:
                raise NonFiniteError(f"non-finite loss ({loss.item()}) at {where}; set skip_nonfinite=true to skip")
            logger.warning("skipping non-finite loss at %s", where)
            self._skip_step = True  # counted, and the whole optimizer step dropped, in _get_grad_norm
            loss = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
        else:
            self._store(metrics, "train")
        self._examples_since_log += len(self._last_indices) * self.args.world_size
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, metrics = self.loss_and_metrics(model, inputs, "eval")
        self._store(metrics, "eval")
        return loss.detach(), None, None

    def _store(self, metrics: dict, split: str) -> None:
        for key, value in metrics.items():
            gathered = self.accelerator.gather_for_metrics(value.detach().float().reshape(-1))
            self._stored[split][key].append(gathered.cpu())

    def log(self, logs: dict, start_time: float | None = None) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        for key, chunks in self._stored[split].items():
            logs[key] = torch.cat(chunks).mean().item()
        self._stored[split].clear()
        if split == "train":
            now = time.monotonic()
            logs["examples_per_second"] = self._examples_since_log / max(now - self._last_log_time, 1e-9)
            self._last_log_time, self._examples_since_log = now, 0
            if self.nonfinite_skipped:
                logs["nonfinite_skipped"] = self.nonfinite_skipped
        super().log(logs, start_time)

    # ---- checkpoints ----
    def _save_checkpoint(self, model, trial) -> None:
        """Write `step-N/` beside its final name and rename it into place only when complete."""
        run_dir = Path(self.args.output_dir)
        step = self.state.global_step
        staged = checkpoints.staging_dir(run_dir, step)
        if self.args.should_save:
            import shutil

            shutil.rmtree(staged, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.store_flos()
        self.save_model(str(staged), _internal_call=True)
        if self.args.should_save:  # Trainer pickles its arguments; a pickle needs trust to load: JSON instead
            (staged / "training_args.bin").unlink(missing_ok=True)
            (staged / "training_args.json").write_text(self.args.to_json_string(), encoding="utf-8")
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(str(staged))
            self._save_scaler(str(staged))
            self._save_rng_state(str(staged))
        if self.args.should_save:
            self.state.save_to_json(str(staged / "trainer_state.json"))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            checkpoints.commit_staged(run_dir, step)
            checkpoints.rotate(run_dir, self.keep_checkpoints)
        self.accelerator.wait_for_everyone()

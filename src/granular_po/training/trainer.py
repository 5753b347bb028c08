"""`GranularTrainer`: one `transformers.Trainer` subclass for SFT, DPO and TDPO with token weights.

Accumulation, mixed precision, DDP / FSDP / DeepSpeed (through Accelerate), LR schedules and logging
integrations come from `transformers.Trainer`. What we change, and why:
- `get_batch_samples` / `compute_loss`: every pair of an optimizer step weighs 1 / (the step's pairs over all
  processes), whatever the accumulation and process count (a short last step included); the repeats
  Accelerate adds to even out the last step over processes weigh nothing (`sampler.step_layout`).
- `compute_loss` / `prediction_step`: the objective (`objectives.py`) on token statistics from the
  forward route chosen once at start-up (`forward/routes.py`); metrics under the research code's names.
- `_save_checkpoint`: atomic `step-N/` folders and a `LATEST` link (Trainer's are not crash-safe);
  the arguments as `training_args.json`, not Trainer's pickled `training_args.bin`.
- `create_scheduler`: the research code's warmup, `min(1, (step + 1) / (warmup_steps + 1))`.
- `_get_train_sampler`: seeded by (seed, epoch), grouped by length; the resumed order is the same.
- `_get_grad_norm`: the step's non-finite guard (`step_state.StepGuard`): one read of the step's losses
  and gradient norm, agreed over processes; a non-finite one stops the run naming the step and records,
  or (skip_nonfinite=true) drops the step on every rank.
- `log`: the research code's per-step metrics (`objectives.py`), `examples_per_second` (examples of the
  step over the step's own time), `counters/examples`, `counters/updates`. Metrics stay on the device
  until a log reads them all at once (`step_state.MetricBuffer`): no micro-batch reads a value back.
- `compute_loss_context_manager`: the whole loss (reference forward, token statistics) under the autocast.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import Trainer

from granular_po.forward.routes import ForwardRoute, choose_route, host_facts
from granular_po.models import reference_context
from granular_po.stats import compute_token_stats
from granular_po.training import checkpoints
from granular_po.training.callbacks import StepTimer
from granular_po.training.objectives import LossSettings, compute_objective, per_token_nll
from granular_po.training.sampler import SeededLengthGroupedSampler, examples_after, step_layout
from granular_po.training.step_state import MetricBuffer, NonFiniteError, StepGuard

logger = logging.getLogger(__name__)

__all__ = ["GranularTrainer", "NonFiniteError"]
STATE_FILE = "granular_state.json"  # our counters in a checkpoint, beside Trainer's trainer_state.json


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
        self._metrics = {"train": MetricBuffer(), "eval": MetricBuffer()}
        self.guard = StepGuard(skip_nonfinite=loss_settings.skip_nonfinite)
        self.nonfinite_skipped = 0
        self.zero_weight_batches = 0
        self._last_indices: list[int] = []
        self._epoch_records: tuple[int, list[int]] | None = None  # (epoch, record index at each order position)
        self._examples_since_log = 0
        self.step_timer = StepTimer()
        super().__init__(*args, **kwargs)
        self.add_callback(self.step_timer)
        # compute_loss divides by the step's pair count (`num_items_in_batch`, from get_batch_samples)
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = True
        if self.ref_model is not None:
            self.ref_model.eval()
            self.ref_model.requires_grad_(False)
            self.ref_model.to(self.args.device)
        sharded = bool(getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False))
        # The fused head reads the lm_head's weights directly: not where DeepSpeed or FSDP1 shard them.
        # Under FSDP2 Accelerate puts the lm_head in a unit that stays gathered after the forward, so its
        # weights are whole when the statistics read them (and calling the module again, as the
        # checkpointed path does, would re-enter FSDP's hooks: it crashes in backward).
        self.fused_head = not sharded or self._fsdp_version() == 2
        self.route: ForwardRoute = choose_route(
            self.model, self.ref_model, is_preference=loss_settings.loss.is_preference,
            logprobs_impl=loss_settings.logprobs_impl, share_prompt=share_prompt, padding_free=padding_free,
            max_length=max_length, activation_checkpointing=bool(self.args.gradient_checkpointing),
            sharded=sharded, pad_token_id=getattr(self.data_collator, "pad_token_id", 0),
        )

    def _fsdp_version(self) -> int | None:
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) if getattr(self, "is_fsdp_enabled", False) else None
        return None if plugin is None else int(getattr(plugin, "fsdp_version", 1))

    # ---- data ----
    def _global_batch_size(self) -> int:
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return SeededLengthGroupedSampler(
            dataset["length"], group_size=self._global_batch_size(), seed=self.args.seed,
            group_by_length=self.group_by_length,
        )

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer's prefetch of a step's micro-batches, with the step's pairs over all processes as
        `num_items_in_batch`; each batch's `host["real_pairs"]`: how many of its leading pairs belong to the
        step (the others are Accelerate's repeats from the epoch's start, checked against the order)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches or self.train_dataset is None:
            return batches, None
        n, args = len(self.train_dataset), self.args
        epoch, step = divmod(self.state.global_step, -(-n // self._global_batch_size()))
        pairs, ranges = step_layout(step, n, args.per_device_train_batch_size, args.gradient_accumulation_steps,
                                    args.world_size, args.process_index, len(batches))
        if self._epoch_records is None or self._epoch_records[0] != epoch:
            index = self.train_dataset["index"]
            self._epoch_records = (epoch, [index[i] for i in self._get_train_sampler().order(epoch)])
        for batch, positions in zip(batches, ranges):
            expected, got = [self._epoch_records[1][i] for i in positions], self._records(batch)
            if got[:len(expected)] != expected:
                raise RuntimeError(f"step {self.state.global_step + 1}: a micro-batch holds records {got}, where "
                                   f"the epoch's order puts {expected} first: the batches are not dealt as assumed")
            batch["host"]["real_pairs"] = len(expected)
        self._examples_since_log += pairs
        return batches, pairs

    # ---- optimisation ----
    def create_optimizer(self, model=None):
        """Trainer's optimizer with `args.weight_decay` on every parameter, biases and norms too: the research
        code built its optimizer on all parameters in one group, where Trainer exempts biases and norms.
        Trainer's two groups are kept (same members, same decay): older checkpoints still load into them."""
        optimizer = super().create_optimizer(model)
        for group in optimizer.param_groups:
            group["weight_decay"] = self.args.weight_decay
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            warmup = self.warmup_steps
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1))
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _get_grad_norm(self, model, grad_norm=None):
        """The step's one read from the device: its losses and gradient norm, agreed over processes."""
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        decision = self.guard.decide(
            norm, step=self.state.global_step + 1, rank=self.args.process_index, world_size=self.args.world_size,
            reduce=lambda t: self.accelerator.reduce(t, reduction="sum"),
            scaler_handles_overflow=getattr(self.accelerator, "scaler", None) is not None,
        )
        if decision.skip:  # zero gradients would still move Adam-like optimizers (momentum): drop them
            logger.warning("skipping optimizer step: %s", decision.message)
            self.nonfinite_skipped += 1
            for param in model.parameters():
                param.grad = None  # the optimizer leaves parameters without gradients untouched
        self._metrics["train"].end_step(applied=not decision.skip)
        return decision.grad_norm

    # ---- loss ----
    def compute_loss_context_manager(self):
        """The whole loss under Accelerate's autocast (mixed precision), not only the wrapped policy's
        forward: the reference's forward and the token statistics on the policy's half-precision hidden
        states run in the same precision (Trainer leaves autocast to the prepared model's forward)."""
        stack = super().compute_loss_context_manager()
        stack.enter_context(self.accelerator.autocast())
        return stack

    def _statistics(self, hidden, head, logits, batch, ref=(None, None, None), need_kl=False, extra=None):
        """Token statistics of the batch; `extra`: weights beyond the margin's (`statistic_weights`)."""
        settings = self.loss_settings
        extra = extra or {}
        # the collator's host-side list of weighted positions, where its facts match the batch; with a KL
        # or NLL over every response token, the list of every response position
        key = "response_positions" if extra else "weighted_positions"
        positions = batch.get(key) if host_facts(batch) else None
        return compute_token_stats(
            policy_hidden=hidden, policy_head=head, ref_hidden=ref[0], ref_head=ref[1],
            policy_logits=logits, ref_logits=ref[2], input_ids=batch["input_ids"],
            loss_weights=batch["loss_weights"], need_kl=need_kl, average=settings.average_log_prob,
            reference_free=settings.reference_free, impl=settings.logprobs_impl,
            chunk_size=settings.chunk_size, fused=self.fused_head, weighted_positions=positions, **extra,
        )

    def token_stats(self, model, batch, need_reference: bool):
        """Per-sequence weighted log-probs, log-ratios and sequential KL for the batch's rows."""
        layouts: dict = {}
        hidden, head, logits = self.route.outputs(model, batch, layouts)
        ref = (None, None, None)
        if need_reference:
            with torch.inference_mode(), reference_context(model, self.ref_model) as reference:
                ref = self.route.outputs(reference, batch, layouts)
        settings = self.loss_settings
        # DPO logs the KL as the research code did (a metric only: its gradient is skipped)
        has_reference = need_reference or settings.reference_free
        need_kl = settings.loss.needs_kl or (settings.loss.is_preference and has_reference)
        return self._statistics(hidden, head, logits, batch, ref, need_kl=need_kl,
                                extra=settings.statistic_weights(batch))

    @torch.no_grad()
    def reference_offset(self, dataset, n_pairs: int) -> tuple[float, float]:
        """(mean |log-ratio| per response, mean sequential KL) between the starting policy and the loaded
        reference on the first `n_pairs` of `dataset`, computed as a training step computes them. Both 0
        (to rounding) when the reference is the policy's own weights and dtype path; the start-up notice
        of a reduced-precision reference names them. Call before training, on an unsharded model."""
        batch = self._prepare_inputs(self.data_collator([dataset[i] for i in range(min(n_pairs, len(dataset)))]))
        with self.compute_loss_context_manager():
            stats = self.token_stats(self.model, batch, need_reference=True)
        kl = stats.position_kl if stats.position_kl is not None else torch.zeros(1)
        return float(stats.logratio.abs().mean()), float(kl.float().mean())

    @torch.inference_mode()
    def reference_logps(self, dataset, batch_size: int) -> tuple[list[float], list[float]]:
        """The reference's weighted log-probs of every (chosen, rejected) of `dataset`, in order (DPO only:
        TDPO's KL needs the live reference distribution at every step)."""
        from torch.utils.data import DataLoader

        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=self.data_collator)
        chosen, rejected = [], []
        for batch in tqdm(loader, desc="reference log-probs", disable=not self.is_world_process_zero()):
            batch = self._prepare_inputs(batch)
            with reference_context(self.model, self.ref_model) as reference, self.compute_loss_context_manager():
                stats = self._statistics(*self.route.outputs(reference, batch), batch)
            n = batch["input_ids"].shape[0] // 2
            chosen += stats.policy_logps[:n].float().cpu().tolist()
            rejected += stats.policy_logps[n:].float().cpu().tolist()
        return chosen, rejected

    def loss_and_metrics(self, model, batch, split: str):
        """The batch's mean loss and per-example metric tensors (B,) named as the research code named them;
        over the leading `batch["host"]["real_pairs"]` pairs where given (the rest are repeats), a zero
        that keeps the graph when there are none."""
        settings = self.loss_settings
        precomputed = batch.get("ref_logps")
        stats = self.token_stats(model, batch, settings.needs_reference and precomputed is None)
        if precomputed is not None:
            stats.logratio = stats.policy_logps - precomputed.to(stats.policy_logps.dtype)
        losses, metrics = compute_objective(settings, stats, batch["input_ids"].shape[0] // 2, split)
        if "response_mask" in batch:  # per row (N,), then one value per example: every metric is (B,), as
            # gathering and the step's pair count assume (a (2B,) tensor would be cut to the pair count)
            rows = (batch["loss_weights"] > 0).sum(-1).float() / batch["response_mask"].sum(-1).clamp(min=1).float()
            metrics[f"weighted_token_share_{split}"] = rows.reshape(-1, len(self._records(batch))).mean(0)
        if self._no_weighted_token(batch, stats):
            self.zero_weight_batches += 1
            logger.warning("batch with records %s has no weighted token: nothing to learn from it",
                           self._records(batch))
        metrics[f"loss/{split}"] = losses.detach()
        real = batch.get("host", {}).get("real_pairs", len(losses))
        if real < len(losses):
            metrics = {key: value[:real] for key, value in metrics.items()}
            return (losses[:real].mean() if real else losses.sum() * 0.0), metrics
        return losses.mean(), metrics

    @staticmethod
    def _records(batch) -> list[int]:
        """The batch's record indices: the collator's host-side list (no read from the device)."""
        host = host_facts(batch)
        return list(host["index"]) if "index" in host else batch["index"].tolist()

    @staticmethod
    def _no_weighted_token(batch, stats) -> bool:
        """Whether no target of the batch has a weight: from the host-side positions' count where given."""
        if host_facts(batch) and "weighted_positions" in batch:
            return batch["weighted_positions"].shape[1] == 0
        return bool((stats.weight_sum == 0).all())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The micro-batch's share of the step's mean loss: the sum over its pairs of the step (not Accelerate's
        repeats) / the step's pairs, x the processes (whose gradients DDP / FSDP average). Shape: losses (B,)."""
        records = self._records(inputs)
        loss, metrics = self.loss_and_metrics(model, inputs, "train")
        if num_items_in_batch is not None:  # from Trainer's loop (else a direct call: the batch's mean)
            records = records[:inputs["host"]["real_pairs"]]
            loss = loss * (len(records) * self.args.world_size / num_items_in_batch)
        self._last_indices = records
        self._metrics["train"].add(metrics)  # dropped again if the step is skipped
        loss = self.guard.add(loss, records)  # checked once, at the optimizer step
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, metrics = self.loss_and_metrics(model, inputs, "eval")
        self._store(metrics, "eval")
        return loss.detach(), None, None

    def _store(self, metrics: dict, split: str) -> None:
        """Evaluation metrics, gathered over processes (on the device) batch by batch."""
        gathered = {key: self.accelerator.gather_for_metrics(value.detach().float().reshape(-1))
                    for key, value in metrics.items()}
        self._metrics[split].add(gathered, keep=True)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        reduce = (lambda t: self.accelerator.reduce(t, reduction="sum")) if split == "train" else None
        logs.update(self._metrics[split].means(reduce if self.args.world_size > 1 else None))
        logs.update(per_token_nll(logs, split))  # SFT: beside the summed loss, the per-token figure TRL logs
        if split == "train" and "loss" in logs:  # a step's log (not the end-of-training summary)
            seconds = self.step_timer.take()
            if seconds > 0:
                logs["examples_per_second"] = self._examples_since_log / seconds
            self._examples_since_log = 0
            logs["counters/updates"] = self.state.global_step
            if self.train_dataset is not None:
                logs["counters/examples"] = examples_after(self.state.global_step, len(self.train_dataset),
                                                           self._global_batch_size())
            if self.nonfinite_skipped:
                logs["nonfinite_skipped"] = self.nonfinite_skipped
        super().log(logs, start_time)

    # ---- resume ----
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Trainer's train, with our counters (skipped steps, weightless batches) restored on resume."""
        if resume_from_checkpoint and (Path(resume_from_checkpoint) / STATE_FILE).is_file():
            state = json.loads((Path(resume_from_checkpoint) / STATE_FILE).read_text(encoding="utf-8"))
            self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
            self.zero_weight_batches = int(state.get("zero_weight_batches", 0))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ---- checkpoints ----
    def _issue_warnings_after_load(self, load_result) -> None:
        """On resume, a tied lm_head is missing from the checkpoint on purpose (safetensors stores the
        shared tensor once): tie it again instead of warning "missing keys" at every restart."""
        model = self.accelerator.unwrap_model(self.model)
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        missing = set(load_result.missing_keys)
        if missing and missing <= tied:
            model.tie_weights()
            load_result = type(load_result)(missing_keys=[], unexpected_keys=load_result.unexpected_keys)
        super()._issue_warnings_after_load(load_result)

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        """Trainer's, except an optimizer without tensor state (SGD without momentum) under FSDP: torch's
        `set_optimizer_state_dict` refuses that ("Expected device to be set") though there is nothing to load
        but the schedule, so the schedule alone is restored, with the learning rate it had reached."""
        if checkpoint is None or not self.is_fsdp_enabled or not holds_no_tensor_state(self.optimizer):
            return super()._load_optimizer_and_scheduler(checkpoint)
        from transformers.trainer import SCHEDULER_NAME

        state = torch.load(Path(checkpoint) / SCHEDULER_NAME, map_location="cpu", weights_only=True)
        self.lr_scheduler.load_state_dict(state)
        for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
            group["lr"] = lr

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Trainer's save, less the aliases of tied weights in a gathered (FSDP / DeepSpeed) state dict.

        Gathered tensors are copies, so transformers no longer sees that `lm_head.weight` is the
        embedding and would write it twice (and the checkpoint would differ from a one-process run's)."""
        if state_dict is not None:
            state_dict = drop_tied_aliases(self.accelerator.unwrap_model(self.model), state_dict)
        super()._save(output_dir, state_dict=state_dict)

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
            counters = {"nonfinite_skipped": self.nonfinite_skipped, "zero_weight_batches": self.zero_weight_batches}
            (staged / STATE_FILE).write_text(json.dumps(counters), encoding="utf-8")
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            checkpoints.commit_staged(run_dir, step)
            checkpoints.rotate(run_dir, self.keep_checkpoints)
        self.accelerator.wait_for_everyone()


def drop_tied_aliases(model: torch.nn.Module, state_dict: dict) -> dict:
    """`state_dict` without the names under which `model` holds a parameter it already holds under an
    earlier name (tied weights), as `model.state_dict()` of an unsharded model would be written."""
    first_name: dict[int, str] = {}
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            aliases.add(name)
        else:
            first_name[id(param)] = name
    return {name: value for name, value in state_dict.items() if name not in aliases}


def holds_no_tensor_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` keeps no tensor per parameter (SGD without momentum), its state first built as
    torch's distributed optimizer loading builds it (a step at learning rate 0 on zero gradients)."""
    try:  # private, but the very function `set_optimizer_state_dict` calls first (torch 2.2 to 2.14 at least)
        from torch.distributed.checkpoint.state_dict import _init_optim_state
    except ImportError:  # a torch without it: leave the loading to Trainer, as before
        return False
    _init_optim_state(optimizer)
    return not any(torch.is_tensor(value) and value.dim() > 0
                   for state in optimizer.state.values() for value in state.values())


"""Trainer callbacks: the metrics file, step timing, samples during evaluation (the console: `console.py`).

`SampleDuringEvalCallback` writes policy and reference generations for eval prompts to `samples.jsonl`
(`sample_during_eval=true`) under `torch.random.fork_rng`, so a run with samples trains exactly like one
without.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from granular_po.models import has_adapters, reference_context


def left_padded(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded for generation. Shape: (B, T) ids and attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt):] = 1
    return ids, mask


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, seed: int) -> list[str]:
    """Sampled continuations (top-p 0.95, as HF defaults) of token-id prompts, decoded."""
    ids, mask = left_padded(prompts, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                             top_p=0.95, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    return tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)


class SampleDuringEvalCallback(TrainerCallback):
    """On each evaluation, sample `n` eval prompts from the policy and the reference (main process)."""

    def __init__(self, trainer, path: Path, n: int, max_new_tokens: int, seed: int):
        self.trainer, self.path, self.n = trainer, path, n
        self.max_new_tokens, self.seed = max_new_tokens, seed

    def on_evaluate(self, args, state, control, **kwargs):
        trainer = self.trainer
        if not state.is_world_process_zero or trainer.eval_dataset is None or self.n <= 0:
            return
        rows = trainer.eval_dataset.select(range(min(self.n, len(trainer.eval_dataset))))
        prompts = [list(r) for r in rows["prompt_ids"]]
        tokenizer = trainer.processing_class
        policy = trainer.accelerator.unwrap_model(trainer.model)
        policy_text = generate(policy, tokenizer, prompts, self.max_new_tokens, self.seed)
        ref_text = None
        if trainer.ref_model is not None or has_adapters(policy):
            with reference_context(policy, trainer.ref_model) as reference:
                ref_text = generate(reference, tokenizer, prompts, self.max_new_tokens, self.seed)
        with open(self.path, "a", encoding="utf-8") as handle:
            for i, index in enumerate(rows["index"]):
                line = {"step": state.global_step, "index": int(index),
                        "prompt": tokenizer.decode(prompts[i], skip_special_tokens=False),
                        "policy": policy_text[i]}
                if ref_text is not None:
                    line["reference"] = ref_text[i]
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")


def _now() -> float:
    return time.perf_counter()


class StepTimer(TrainerCallback):
    """Seconds spent inside optimizer steps (forward, backward and the optimizer step; not loading the
    batch, evaluating or saving): the research code's denominator of `examples_per_second`."""

    def __init__(self):
        self.seconds = 0.0
        self._start: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = _now()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.seconds += _now() - self._start
            self._start = None

    def take(self) -> float:
        """Seconds since the last call."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds


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

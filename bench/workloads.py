"""What one benchmark configuration does, run inside its own (fresh) process by `bench/step.py`.

- `run_ours`:   SFT / DPO / TDPO through the real `granular_po.training.recipe.run_training` (Hydra overrides, the
                shipped config), with a timing callback added to its `GranularTrainer`.
- `run_trl`:    TRL's `DPOTrainer` on the same model, token ids, batch, optimizer and precision.
- `logits_memory`: `compute_token_stats` forward + backward on random hidden states (naive vs chunked).
- `matmul_peak`: the best fp32 matmul rate of this machine (the physical limit the MFU is a share of).

Every function returns a JSON-able dict; peak memory is this process's `ru_maxrss`, which is why each
configuration runs in a process of its own.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

# ---------------------------------------------------------------- memory and time


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, MiB (Linux reports ru_maxrss in KiB)."""
    scale = 1024 if sys.platform == "darwin" else 1
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / scale


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _busy_cpu_seconds() -> float:
    """CPU seconds spent by every process on the machine so far (all cores, idle and iowait excluded)."""
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _mark() -> tuple[float, float, float]:
    return time.perf_counter(), time.process_time(), _busy_cpu_seconds()


class Baton:
    """Turn-taking with `bench/step.py` when configurations run interleaved: before each optimizer step
    wait for its "go", after it say "done" (".") and at the end of training say "E" and wait for a last
    "go", so that no sibling process is ever busy while another one is timed. Without pipes: no waiting."""

    def __init__(self, fds: list[int] | None):
        self.go, self.done = fds if fds else (None, None)

    def wait(self) -> None:
        if self.go is not None and os.read(self.go, 1) == b"":
            raise RuntimeError("bench/step.py went away")

    def say(self, token: bytes) -> None:
        if self.done is not None:
            os.write(self.done, token)


def step_callback(warmup: int = 0, profile_to: str | None = None, baton: list[int] | None = None):
    """A `TrainerCallback` timing each optimizer step, from `on_step_begin` to `on_step_end`: forward,
    backward, gradient clipping and the optimizer update (collating the next batch and logging, a few
    milliseconds here, fall outside).

    With `profile_to`, the first step after `warmup` runs under `torch.profiler` and the ops that took
    the most CPU time are written there as a table.
    """
    from transformers import TrainerCallback

    turn = Baton(baton)

    class StepTimer(TrainerCallback):
        def __init__(self):
            # (begin, end) of each step; a mark is (wall, this process's CPU, the machine's busy CPU)
            self.windows: list[tuple[tuple[float, float, float], tuple[float, float, float]]] = []
            self.rss_at_start = self.idle_rss = 0.0
            self.profiler = self.begin = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.rss_at_start = rss_mb()

        def on_step_begin(self, args, state, control, **kwargs):
            turn.wait()
            self.idle_rss = max(self.idle_rss, rss_mb())  # what this process holds between steps
            if profile_to and self.profiler is None and state.global_step == warmup:
                import torch

                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.profiler.__enter__()
            self.begin = _mark()

        def on_step_end(self, args, state, control, **kwargs):
            self.windows.append((self.begin, _mark()))
            if self.profiler is not None and state.global_step == warmup + 1:
                self.profiler.__exit__(None, None, None)
                table = self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
                Path(profile_to).write_text(table)
            turn.say(b".")

        def on_train_end(self, args, state, control, **kwargs):
            turn.say(b"E")
            turn.wait()

        def step_seconds(self, cpu: bool = False) -> list[float]:
            """Wall (or this process's CPU) seconds of each optimizer step after the first `warmup`."""
            k = 1 if cpu else 0
            return [end[k] - begin[k] for begin, end in self.windows[warmup:]]

        def other_load(self) -> float:
            """Cores kept busy by other processes during the timed steps (0 on an otherwise idle machine)."""
            timed = self.windows[warmup:]
            wall = sum(end[0] - begin[0] for begin, end in timed)
            others = sum((end[2] - begin[2]) - (end[1] - begin[1]) for begin, end in timed)
            return max(0.0, others) / max(wall, 1e-9)

    return StepTimer()


# ---------------------------------------------------------------- data

# a plain word list: the text only has to tokenise to known lengths, its meaning does not matter
WORDS = (
    "the model reads a long answer and marks every step where the reasoning goes wrong so that training "
    "can focus on those tokens instead of the whole response which mostly repeats what the question "
    "already said about prices distances weights speeds areas volumes times rates totals and averages "
    "first second third then next finally because therefore however although while since until unless "
    "apple river stone cloud green music paper light sugar window tiger honey seven eight nine twelve"
).split()


def make_pairs(n: int, words_per_response: int, mark_every: int = 10, seed: int = 0) -> list[dict]:
    """n research-format pairs: a prompt, a long correct response and a minimally edited incorrect one.

    Every `mark_every`-th word of the incorrect response is replaced; the replaced words are marked in
    both responses (flag -1 in the incorrect one, flag 1 at the same words of the correct one), so a
    granular run weighs about 1 / mark_every of the response tokens (the table reports the measured share).
    """
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = "Check this worked answer and correct it: " + " ".join(rng.choices(WORDS, k=40))
        chosen_words = rng.choices(WORDS, k=words_per_response)
        rejected_words = list(chosen_words)
        regions = []
        for side, words, flag in (("chosen", chosen_words, 1), ("rejected", rejected_words, -1)):
            pos = 0
            for i, word in enumerate(words):
                if i % mark_every == mark_every // 2:
                    if side == "rejected":
                        word = words[i] = rng.choice([w for w in WORDS if w != chosen_words[i]])
                    regions.append([pos, pos + len(word), flag])
                pos += len(word) + 1
        pairs.append({
            "prompt": prompt,
            "correct_response": " ".join(chosen_words),
            "incorrect_response": " ".join(rejected_words),
            "masked_regions": regions,
        })  # fmt: skip
    return pairs


def encode_options(seq_len: int):
    from granular_po.data.encode import EncodeOptions

    # prompts are cut to a quarter of the row, responses fill the rest: every row is exactly seq_len tokens
    return EncodeOptions(max_length=seq_len, max_prompt_length=max(8, seq_len // 4))


def write_pairs(path: Path, spec: dict) -> list[dict]:
    n = spec["batch"] * (spec["warmup"] + spec["steps"])
    pairs = make_pairs(n, words_per_response=2 * spec["seq_len"])
    path.write_text(json.dumps(pairs))
    return pairs


# ---------------------------------------------------------------- our trainer


def _overrides(spec: dict, data: Path, run_root: Path) -> list[str]:
    total_steps = spec["warmup"] + spec["steps"]
    enc = encode_options(spec["seq_len"])
    out = [
        f"model.name_or_path={spec['model']}", "datasets=[ours]", f"custom_train_path={data}",
        f"local_dirs=[{run_root}]", "exp_name=bench", "debug=true",  # debug: train and log, save nothing
        f"loss={spec['loss']}", f"batch_size={spec['batch']}", f"n_examples={spec['batch'] * total_steps}",
        f"max_length={enc.max_length}", f"max_prompt_length={enc.max_prompt_length}",
        f"optimizer={spec['optimizer']}", f"lr={spec['lr']}", "warmup_steps=0", "do_first_eval=false",
        f"logprobs.impl={spec['impl']}", f"granular.enabled={str(spec['granular']).lower()}",
        "minimum_log_interval_secs=100000",
    ]  # fmt: skip
    if spec.get("chunk_size"):
        out.append(f"logprobs.chunk_size={spec['chunk_size']}")
    return out


def run_ours(spec: dict) -> dict:
    """One configuration through `run_training`, as `granular-po train <overrides>` runs it."""
    import granular_po.training.recipe as run
    from granular_po.data.encode import build_dataset, response_token_share
    from granular_po.data.masks import GranularOptions
    from granular_po.data.records import load_records
    from granular_po.models import load_tokenizer, resolve_model_path
    from granular_po.training.config import compose_config

    timer = step_callback(spec["warmup"], spec.get("profile_to"), spec.get("baton"))
    seen = {}

    class TimedGranularTrainer(run.GranularTrainer):
        """The shipped trainer plus a timing callback; everything else is what `run_training` builds."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(timer)
            seen["trainer"] = self

    with tempfile.TemporaryDirectory(prefix="granular-bench-") as tmp:
        data = Path(tmp) / "pairs.json"
        write_pairs(data, spec)
        cfg = compose_config(_overrides(spec, data, Path(tmp) / "runs"))
        shipped, run.GranularTrainer = run.GranularTrainer, TimedGranularTrainer
        try:
            run.run_training(cfg)
        finally:
            run.GranularTrainer = shipped
        trainer = seen["trainer"]
        # the weighted share and row lengths of exactly what was trained on
        tokenizer = load_tokenizer(resolve_model_path(spec["model"]))
        records, _ = load_records(data)
        gran = GranularOptions(enabled=spec["granular"])
        encoded = build_dataset(records, tokenizer, encode_options(spec["seq_len"]), gran)
    rows = spec["batch"] * (1 if spec["loss"] == "sft" else 2)
    losses = [h["loss/train"] for h in trainer.state.log_history if "loss/train" in h]
    return {
        **_common_result(spec, timer, trainer.model, encoded, rows),
        "weighted_share": response_token_share(encoded) if spec["granular"] else 1.0,
        "chunk_size": trainer.loss_settings.chunk_size,
        "hidden_path": bool(getattr(trainer, "use_hidden_path", False)),
        "losses": losses,
    }


def _common_result(spec: dict, timer, model, encoded, rows: int) -> dict:
    lengths = {len(p) + len(c) for p, c in zip(encoded["prompt_ids"], encoded["chosen_ids"])}
    lengths |= {len(p) + len(r) for p, r in zip(encoded["prompt_ids"], encoded["rejected_ids"])}
    if lengths != {spec["seq_len"]}:
        raise RuntimeError(f"rows should all be {spec['seq_len']} tokens, got lengths {sorted(lengths)}")
    step_s, cpu_s = timer.step_seconds(), timer.step_seconds(cpu=True)
    return {
        "step_s": step_s,
        "median_s": statistics.median(step_s),
        "median_cpu_s": statistics.median(cpu_s),
        "other_load": timer.other_load(),
        "tokens_per_step": rows * spec["seq_len"],
        "params": sum(p.numel() for p in model.parameters()),
        "rss_start_mb": timer.rss_at_start,
        "idle_rss_mb": timer.idle_rss,
        "peak_rss_mb": peak_rss_mb(),
    }


# ---------------------------------------------------------------- TRL


def run_trl(spec: dict) -> dict:
    """TRL's DPOTrainer on our token ids: same model files, batch, rows, optimizer, fp32, no checkpointing."""
    import datasets
    import torch
    from trl import DPOConfig, DPOTrainer

    from granular_po.data.encode import build_dataset
    from granular_po.data.masks import GranularOptions
    from granular_po.data.records import load_records
    from granular_po.models import load_model, load_tokenizer, resolve_model_path

    datasets.disable_progress_bars()
    path = resolve_model_path(spec["model"])
    tokenizer = load_tokenizer(path)
    timer = step_callback(spec["warmup"], spec.get("profile_to"), spec.get("baton"))
    with tempfile.TemporaryDirectory(prefix="granular-bench-trl-") as tmp:
        data = Path(tmp) / "pairs.json"
        pairs = write_pairs(data, spec)
        records, _ = load_records(data)
        encoded = build_dataset(records, tokenizer, encode_options(spec["seq_len"]), GranularOptions())
        policy = load_model(path, "float32", device="cpu")
        reference = load_model(path, "float32", device="cpu").eval().requires_grad_(False)
        args = DPOConfig(
            output_dir=str(Path(tmp) / "trl"), per_device_train_batch_size=spec["batch"],
            max_steps=spec["warmup"] + spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="constant",
            weight_decay=0.0, max_grad_norm=10.0, beta=0.1, max_length=spec["seq_len"],
            precompute_ref_log_probs=False, logging_steps=1, save_strategy="no", report_to="none",
            bf16=False, gradient_checkpointing=False,  # as ours: fp32, no activation checkpointing
            use_cpu=not torch.cuda.is_available(), seed=0, disable_tqdm=True,
        )  # fmt: skip
        # TRL tokenises text at __init__; the text is then swapped for our exact token ids
        text = datasets.Dataset.from_dict({
            "prompt": [p["prompt"] for p in pairs], "chosen": [p["correct_response"] for p in pairs],
            "rejected": [p["incorrect_response"] for p in pairs],
        })  # fmt: skip
        trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=text,
                             processing_class=tokenizer, callbacks=[timer])
        trainer.train_dataset = encoded.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
        # the optimizer exactly as run_training builds ours (torch.optim class, lr, Trainer's param groups)
        trainer.optimizer_cls_and_kwargs = (getattr(torch.optim, spec["optimizer"]), {"lr": spec["lr"]})
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {**_common_result(spec, timer, trainer.model, encoded, 2 * spec["batch"]), "losses": losses,
            "weighted_share": 1.0}


# ---------------------------------------------------------------- micro-benchmarks


def logits_memory(spec: dict) -> dict:
    """Peak RSS above the inputs of `compute_token_stats` forward + backward, naive or chunked.

    Random hidden states (N, T, H), a trainable head (V, H) and a frozen reference head, all response
    positions weighted (the worst case for the chunked path), the KL on when `need_kl`.
    """
    import torch

    from granular_po.stats import compute_token_stats

    n, t, h, v = spec["rows"], spec["seq_len"], spec["hidden"], spec["vocab"]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, t, h, generator=g).requires_grad_(True)  # (N, T, H)
    ref_hidden = torch.randn(n, t, h, generator=g)  # (N, T, H)
    head = torch.nn.Linear(h, v, bias=False)
    ref_head = torch.nn.Linear(h, v, bias=False).requires_grad_(False)
    ids = torch.randint(0, v, (n, t), generator=g)  # (N, T)
    weights = torch.ones(n, t)
    weights[:, : t // 4] = 0  # the prompt

    def once(rows: int, cols: int) -> float:
        start = time.perf_counter()
        stats = compute_token_stats(
            hidden[:rows, :cols], head, ref_hidden[:rows, :cols], ref_head, ids[:rows, :cols],
            weights[:rows, :cols], need_kl=spec["need_kl"], impl=spec["impl"], chunk_size=spec["chunk_size"],
        )  # fmt: skip
        loss = stats.logratio.sum() + (stats.position_kl.sum() if spec["need_kl"] else 0.0)
        loss.backward()
        return time.perf_counter() - start

    once(1, 16)  # first-call allocations (thread pools, kernels) are not the logits' memory
    head.weight.grad = torch.zeros_like(head.weight)  # held by both paths alike: allocated before the baseline
    hidden.grad = torch.zeros_like(hidden)
    before = rss_mb()
    seconds = once(n, t)
    return {"logits_peak_mb": peak_rss_mb() - before, "seconds": seconds}


def matmul_peak(spec: dict) -> dict:
    """Best fp32 GFLOP/s of square matmuls on this machine (torch's default thread count)."""
    import torch

    best = 0.0
    for n in spec.get("sizes", (2048, 4096)):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        for _ in range(spec.get("repeats", 3)):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return {"matmul_flops": best, "threads": torch.get_num_threads()}


WORKERS = {"ours": run_ours, "trl": run_trl, "logits": logits_memory, "matmul": matmul_peak}


def run_worker(spec: dict) -> dict:
    return WORKERS[spec["kind"]](spec)

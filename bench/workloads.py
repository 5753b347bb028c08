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

import importlib.util
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


def _synchronize(device: str) -> None:
    """Wait for the device's queued work, so that a step's time is the device's, not its launches'."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def step_callback(warmup: int = 0, profile_to: str | None = None, baton: list[int] | None = None,
                  device: str = "cpu"):
    """A `TrainerCallback` timing each optimizer step, from `on_step_begin` to `on_step_end`: forward,
    backward, gradient clipping and the optimizer update (collating the next batch and logging, a few
    milliseconds here, fall outside). On CUDA both ends wait for the GPU (`torch.cuda.synchronize`), and
    the peak allocated memory is counted from the start of training (after the models are loaded).

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
            if device == "cuda":  # the models are loaded: count the training's own peak from here
                import torch

                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args, state, control, **kwargs):
            turn.wait()
            self.idle_rss = max(self.idle_rss, rss_mb())  # what this process holds between steps
            if profile_to and self.profiler is None and state.global_step == warmup:
                import torch

                self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                self.profiler.__enter__()
            _synchronize(device)
            self.begin = _mark()

        def on_step_end(self, args, state, control, **kwargs):
            _synchronize(device)
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


def make_pairs(n: int, words_per_response: int | tuple[int, int], mark_every: int = 10, seed: int = 0,
               prompt_words: int | tuple[int, int] = 40) -> list[dict]:
    """n research-format pairs: a prompt, a long correct response and a minimally edited incorrect one.
    A (low, high) word count draws each pair's length from that range (variable-length rows).

    Every `mark_every`-th word of the incorrect response is replaced; the replaced words are marked in
    both responses (flag -1 in the incorrect one, flag 1 at the same words of the correct one), so a
    granular run weighs about 1 / mark_every of the response tokens (the table reports the measured share).
    """
    rng = random.Random(seed)

    def count(words: int | tuple[int, int]) -> int:
        return rng.randint(*words) if isinstance(words, (tuple, list)) else words

    pairs = []
    for _ in range(n):
        prompt = "Check this worked answer and correct it: " + " ".join(rng.choices(WORDS, k=count(prompt_words)))
        chosen_words = rng.choices(WORDS, k=count(words_per_response))
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


# the short-row workload: prompts of about 15 tokens, responses of 40-70 (SmolLM2's tokenizer), padded
SHORT_PROMPT_WORDS, SHORT_RESPONSE_WORDS, SHORT_MAX_LENGTH = (1, 3), (32, 56), 128


def encode_options(seq_len: int, workload: str = "full"):
    from granular_po.data.encode import EncodeOptions

    if workload == "short":  # nothing is cut: the rows keep their own lengths and batches are padded; raw
        # prompts (a chat template would add a ~30-token system prompt to every row)
        return EncodeOptions(max_length=SHORT_MAX_LENGTH, max_prompt_length=SHORT_MAX_LENGTH // 2, prompt_format="raw")
    # prompts are cut to a quarter of the row, responses fill the rest: every row is exactly seq_len tokens
    return EncodeOptions(max_length=seq_len, max_prompt_length=max(8, seq_len // 4))


def write_pairs(path: Path, spec: dict) -> list[dict]:
    n = spec["batch"] * (spec["warmup"] + spec["steps"])
    if spec.get("workload") == "short":
        pairs = make_pairs(n, words_per_response=SHORT_RESPONSE_WORDS, prompt_words=SHORT_PROMPT_WORDS)
    else:
        pairs = make_pairs(n, words_per_response=2 * spec["seq_len"])
    path.write_text(json.dumps(pairs))
    return pairs


# ---------------------------------------------------------------- our trainer


def _mixed_precision(spec: dict) -> str:
    """Our `mixed_precision` for the bench's --dtype: bf16 autocast over fp32 weights, or none."""
    return "bf16" if spec.get("dtype", "fp32") == "bf16" else "no"


def _overrides(spec: dict, data: Path, run_root: Path) -> list[str]:
    total_steps = spec["warmup"] + spec["steps"]
    enc = encode_options(spec["seq_len"], spec.get("workload", "full"))
    out = [
        f"model.name_or_path={spec['model']}", "datasets=[ours]", f"custom_train_path={data}",
        f"local_dirs=[{run_root}]", "exp_name=bench", "debug=true",  # debug: train and log, save nothing
        f"loss={spec['loss']}", f"batch_size={spec['batch']}", f"n_examples={spec['batch'] * total_steps}",
        f"max_length={enc.max_length}", f"max_prompt_length={enc.max_prompt_length}",
        f"prompt_format={enc.prompt_format}",
        f"optimizer={spec['optimizer']}", f"lr={spec['lr']}", "warmup_steps=0", "do_first_eval=false",
        "weight_decay=0",  # as TRL's rows (DPOConfig weight_decay=0.0): the same update on both sides
        f"logprobs.impl={spec['impl']}", f"granular.enabled={str(spec['granular']).lower()}",
        "minimum_log_interval_secs=100000", f"mixed_precision={_mixed_precision(spec)}",
    ]  # fmt: skip
    if spec.get("chunk_size"):
        out.append(f"logprobs.chunk_size={spec['chunk_size']}")
    return out + list(spec.get("overrides", ()))  # a configuration's own keys (configs.py)


def run_ours(spec: dict) -> dict:
    """One configuration through `run_training`, as `granular-po train <overrides>` runs it."""
    import granular_po.training.recipe as run
    from granular_po.data.encode import build_dataset, response_token_share
    from granular_po.data.records import load_records
    from granular_po.models import load_tokenizer, resolve_model_path
    from granular_po.training.config import compose_config

    timer = step_callback(spec["warmup"], spec.get("profile_to"), spec.get("baton"), spec.get("device", "cpu"))
    seen = {}

    class TimedGranularTrainer(run.GranularTrainer):
        """The shipped trainer plus a timing callback; everything else is what `run_training` builds
        (except, for the "before" rows, the optimizer's plain per-parameter loop)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(timer)
            if spec.get("optimizer_loop"):
                cls, kwargs = self.optimizer_cls_and_kwargs
                self.optimizer_cls_and_kwargs = (cls, {"lr": kwargs["lr"], "foreach": False})
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
        # the run's own weighting keys (granular.sides, after_first_error: configs.py's overrides)
        encoded = build_dataset(records, tokenizer, encode_options(spec["seq_len"], spec.get("workload", "full")),
                                cfg.granular)
    losses = [h["loss/train"] for h in trainer.state.log_history if "loss/train" in h]
    return {
        **_common_result(spec, timer, trainer.model, encoded, pairs=spec["loss"] != "sft"),
        "optimizer": _implementation(trainer.optimizer),
        "weighted_share": response_token_share(encoded) if spec["granular"] else 1.0,
        "chunk_size": trainer.loss_settings.chunk_size,
        "hidden_path": bool(trainer.route.use_hidden_path),
        "losses": losses,
    }


def _implementation(optimizer) -> str:
    """`AdamW (fused)`, `SGD (foreach)`, `AdamW (loop)`: the torch optimizer inside Accelerate's wrapper."""
    inner = getattr(optimizer, "optimizer", optimizer)
    kind = "fused" if inner.defaults.get("fused") else "foreach" if inner.defaults.get("foreach") else "loop"
    return f"{type(inner).__name__} ({kind})"


def _common_result(spec: dict, timer, model, encoded, pairs: bool) -> dict:
    chosen = [len(p) + len(c) for p, c in zip(encoded["prompt_ids"], encoded["chosen_ids"])]
    rejected = [len(p) + len(r) for p, r in zip(encoded["prompt_ids"], encoded["rejected_ids"])]
    if spec.get("workload", "full") == "full" and set(chosen + rejected) != {spec["seq_len"]}:
        raise RuntimeError(f"rows should all be {spec['seq_len']} tokens, got lengths {sorted(set(chosen + rejected))}")
    # real (unpadded) tokens per optimizer step, on average: every step trains `batch` of these pairs
    tokens = sum(chosen) + (sum(rejected) if pairs else 0)
    step_s, cpu_s = timer.step_seconds(), timer.step_seconds(cpu=True)
    out = {
        "step_s": step_s,
        "median_s": statistics.median(step_s),
        "median_cpu_s": statistics.median(cpu_s),
        "other_load": timer.other_load(),
        "tokens_per_step": tokens / len(chosen) * spec["batch"],
        "params": sum(p.numel() for p in model.parameters()),
        "rss_start_mb": timer.rss_at_start,
        "idle_rss_mb": timer.idle_rss,
        "peak_rss_mb": peak_rss_mb(),
        "prompt_tokens": statistics.mean(len(p) for p in encoded["prompt_ids"]),
        "response_tokens": statistics.mean(len(c) for c in encoded["chosen_ids"]),
    }
    if spec.get("device") == "cuda":
        import torch

        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20  # since training began
    return out


# ---------------------------------------------------------------- TRL


def run_trl(spec: dict) -> dict:
    """TRL's DPOTrainer on our token ids and batches: same model files, batch order, rows, optimizer and
    precision (fp32, or its bf16 autocast), no activation checkpointing, its fused head (Liger) where
    installed on CUDA."""
    import datasets
    import torch
    from trl import DPOConfig, DPOTrainer

    from granular_po.data.encode import build_dataset
    from granular_po.data.masks import GranularOptions
    from granular_po.data.records import load_records
    from granular_po.models import load_model, load_tokenizer, resolve_model_path
    from granular_po.training.optimizer import optimizer_kwargs
    from granular_po.training.sampler import SeededLengthGroupedSampler

    datasets.disable_progress_bars()
    path = resolve_model_path(spec["model"])
    tokenizer = load_tokenizer(path)
    device = spec.get("device", "cpu")
    timer = step_callback(spec["warmup"], spec.get("profile_to"), spec.get("baton"), device)
    liger = device == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    workload = spec.get("workload", "full")
    with tempfile.TemporaryDirectory(prefix="granular-bench-trl-") as tmp:
        data = Path(tmp) / "pairs.json"
        pairs = write_pairs(data, spec)
        records, _ = load_records(data)
        enc = encode_options(spec["seq_len"], workload)
        encoded = build_dataset(records, tokenizer, enc, GranularOptions())
        # fp32 weights (the master copy under TRL's bf16 autocast), as TRL's users load them
        policy = load_model(path, "float32", device=device)
        reference = load_model(path, "float32", device=device).eval().requires_grad_(False)
        args = DPOConfig(
            output_dir=str(Path(tmp) / "trl"), per_device_train_batch_size=spec["batch"],
            max_steps=spec["warmup"] + spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="constant",
            weight_decay=0.0, max_grad_norm=10.0, beta=0.1, max_length=enc.max_length,
            precompute_ref_log_probs=False, logging_steps=1, save_strategy="no", report_to="none",
            bf16=spec.get("dtype", "fp32") == "bf16", gradient_checkpointing=False,  # no activation checkpointing
            use_liger_kernel=liger, use_cpu=device == "cpu", seed=0, disable_tqdm=True,
        )  # fmt: skip
        # TRL tokenises text at __init__; the text is then swapped for our exact token ids
        text = datasets.Dataset.from_dict({
            "prompt": [p["prompt"] for p in pairs], "chosen": [p["correct_response"] for p in pairs],
            "rejected": [p["incorrect_response"] for p in pairs],
        })  # fmt: skip
        trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=text,
                             processing_class=tokenizer, callbacks=[timer])
        trainer.train_dataset = encoded.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
        # the same batches in the same order as ours (our seeded, length-grouped sampler)
        lengths = [len(p) + max(len(c), len(r)) for p, c, r in
                   zip(encoded["prompt_ids"], encoded["chosen_ids"], encoded["rejected_ids"])]
        trainer._get_train_sampler = lambda *_args, **_kwargs: SeededLengthGroupedSampler(
            lengths, group_size=spec["batch"], seed=0, group_by_length=True)
        # the optimizer exactly as run_training builds ours (class, lr, fused / foreach, Trainer's param groups)
        optimizer_cls = getattr(torch.optim, spec["optimizer"])
        trainer.optimizer_cls_and_kwargs = (optimizer_cls, optimizer_kwargs(optimizer_cls, spec["lr"], policy.device))
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {**_common_result(spec, timer, trainer.model, encoded, pairs=True), "losses": losses,
            "weighted_share": 1.0, "liger": liger, "optimizer": _implementation(trainer.optimizer)}


# ---------------------------------------------------------------- micro-benchmarks


def logits_memory(spec: dict) -> dict:
    """Peak memory above the inputs of `compute_token_stats` forward + backward, naive or chunked: RSS on
    CPU, `torch.cuda.max_memory_allocated` on CUDA.

    Random hidden states (N, T, H), a trainable head (V, H) and a frozen reference head, all response
    positions weighted (the worst case for the chunked path), the KL on when `need_kl`. With dtype bf16
    the hidden states are bf16 and the heads fp32 under bf16 autocast, as mixed-precision training runs.
    """
    import contextlib

    import torch

    from granular_po.stats import compute_token_stats

    device = torch.device(spec.get("device", "cpu"))
    bf16 = spec.get("dtype", "fp32") == "bf16"
    n, t, h, v = spec["rows"], spec["seq_len"], spec["hidden"], spec["vocab"]
    g = torch.Generator().manual_seed(0)
    hidden_dtype = torch.bfloat16 if bf16 else torch.float32
    hidden = torch.randn(n, t, h, generator=g).to(device, hidden_dtype).requires_grad_(True)  # (N, T, H)
    ref_hidden = torch.randn(n, t, h, generator=g).to(device, hidden_dtype)  # (N, T, H)
    head = torch.nn.Linear(h, v, bias=False).to(device)
    ref_head = torch.nn.Linear(h, v, bias=False).to(device).requires_grad_(False)
    ids = torch.randint(0, v, (n, t), generator=g).to(device)  # (N, T)
    weights = torch.ones(n, t, device=device)
    weights[:, : t // 4] = 0  # the prompt
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def once(rows: int, cols: int) -> float:
        start = time.perf_counter()
        with autocast:
            stats = compute_token_stats(
                hidden[:rows, :cols], head, ref_hidden[:rows, :cols], ref_head, ids[:rows, :cols],
                weights[:rows, :cols], need_kl=spec["need_kl"], impl=spec["impl"], chunk_size=spec["chunk_size"],
            )  # fmt: skip
        loss = stats.logratio.sum() + (stats.position_kl.sum() if spec["need_kl"] else 0.0)
        loss.backward()
        _synchronize(device.type)
        return time.perf_counter() - start

    once(1, 16)  # first-call allocations (thread pools, kernels) are not the logits' memory
    head.weight.grad = torch.zeros_like(head.weight)  # held by both paths alike: allocated before the baseline
    hidden.grad = torch.zeros_like(hidden)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
        seconds = once(n, t)
        return {"logits_peak_mb": torch.cuda.max_memory_allocated() / 2**20 - before, "seconds": seconds}
    before = rss_mb()
    seconds = once(n, t)
    return {"logits_peak_mb": peak_rss_mb() - before, "seconds": seconds}


def matmul_peak(spec: dict) -> dict:
    """Best GFLOP/s of square matmuls on this machine's device in the run's dtype (fp32 on CPU with
    torch's default thread count; bf16 on a GPU for bf16 runs)."""
    import torch

    device = spec.get("device", "cpu")
    dtype = torch.bfloat16 if spec.get("dtype", "fp32") == "bf16" else torch.float32
    best = 0.0
    for n in spec.get("sizes", (2048, 4096)):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        _synchronize(device)
        for _ in range(spec.get("repeats", 3)):
            start = time.perf_counter()
            a @ b
            _synchronize(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return {"matmul_flops": best, "threads": torch.get_num_threads()}


WORKERS = {"ours": run_ours, "trl": run_trl, "logits": logits_memory, "matmul": matmul_peak}


def run_worker(spec: dict) -> dict:
    return WORKERS[spec["kind"]](spec)

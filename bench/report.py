"""The markdown report of `bench/step.py`: one table of figures and ratios, then the issue's targets.

Results are keyed by run ("tdpo", "tdpo@2", ...); each carries its configuration ("config") and the
index of the interleaved group it ran in ("group"). A time ratio between two configurations is taken
inside a group that ran both (side by side, step by step); else through a configuration that ran in
both groups (an anchor: a/anchor in one group times anchor/b in the other); else, marked, across groups.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from pathlib import Path

from configs import CONFIGS, GPU_TARGETS, OPTION_CONFIGS, TARGETS

CHAINED, SEPARATE = "†", "‡"  # marks on ratios: through an anchor / across groups, not side by side


# ---------------------------------------------------------------- ratios


def runs_of(results: dict[str, dict], config: str) -> list[dict]:
    return [r for r in results.values() if r["config"] == config]


def first(results: dict[str, dict], config: str) -> dict | None:
    runs = runs_of(results, config)
    return runs[0] if runs else None


def time_ratio(results: dict[str, dict], a: str, b: str) -> tuple[float, str] | None:
    """(s/step of a over s/step of b, mark): "" side by side, CHAINED through an anchor, SEPARATE else."""
    runs_a, runs_b = runs_of(results, a), runs_of(results, b)
    if not runs_a or not runs_b:
        return None
    for ra in runs_a:
        for rb in runs_b:
            if ra["group"] == rb["group"]:
                return ra["median_s"] / rb["median_s"], ""
    for ra in runs_a:
        for rb in runs_b:
            for anchor in {r["config"] for r in results.values()} - {a, b}:
                near_a = [r for r in runs_of(results, anchor) if r["group"] == ra["group"]]
                near_b = [r for r in runs_of(results, anchor) if r["group"] == rb["group"]]
                if near_a and near_b:
                    ratio = ra["median_s"] / near_a[0]["median_s"] * near_b[0]["median_s"] / rb["median_s"]
                    return ratio, CHAINED
    return runs_a[0]["median_s"] / runs_b[0]["median_s"], SEPARATE


def cpu_ratio(results: dict[str, dict], a: str, b: str) -> float | None:
    """CPU s/step of a over b where both ran side by side (None else): on a machine shared with other
    work the wall time counts the others' load, the process's CPU time much less."""
    for ra in runs_of(results, a):
        for rb in runs_of(results, b):
            if ra["group"] == rb["group"] and rb.get("median_cpu_s"):
                return ra["median_cpu_s"] / rb["median_cpu_s"]
    return None


def peak_mb(r: dict) -> float:
    """The run's peak memory: allocated CUDA memory on a GPU, else the process's peak RSS."""
    return r.get("peak_cuda_mb") or r["peak_rss_mb"]


def memory_ratio(results: dict[str, dict], a: str, b: str) -> float | None:
    """Peak memory of a over b (each its own process: no load dependence, no pairing needed)."""
    ra, rb = first(results, a), first(results, b)
    return None if ra is None or rb is None else peak_mb(ra) / peak_mb(rb)


def _fmt(value: float | None, mark: str = "") -> str:
    return "" if value is None else f"{value:.2f}{mark}"


def _tokens_per_s(r: dict) -> float:
    return r["tokens_per_step"] / r["median_s"]


def _flops_per_step(r: dict) -> float:
    """6 x params per token trained (forward + backward), plus 2 x params per token of reference forward."""
    flops = 6 * r["params"] * r["tokens_per_step"]
    if CONFIGS[r["config"]].get("loss", "dpo") != "sft":
        flops += 2 * r["params"] * r["tokens_per_step"]
    return flops


# ---------------------------------------------------------------- tables


def results_table(results: dict[str, dict], peak_flops: float | None) -> list[str]:
    """One row per configuration (its first run): absolute figures, ratios to TRL's DPO and to our DPO."""
    lines = [
        "| configuration | chunk_size | weighted tokens | s / step | CPU s / step | other load | tokens / s "
        "| peak memory (GiB) | time / TRL | throughput / TRL | memory / TRL | time / our DPO | memory / our DPO "
        "| MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    shown = []
    for r in results.values():
        if r["config"] in shown:
            continue
        shown.append(name := r["config"])
        config = CONFIGS[name]
        columns = []
        for ref in ("trl-dpo", "dpo"):
            t = time_ratio(results, name, ref)
            ref_run = first(results, ref)
            columns.append(_fmt(*t) if t else "")
            if ref == "trl-dpo":
                tps = None if t is None else r["tokens_per_step"] / ref_run["tokens_per_step"] / t[0]
                columns.append(_fmt(tps, t[1] if t else ""))
            columns.append(_fmt(memory_ratio(results, name, ref)))
        mfu = ""
        if peak_flops:
            mfu = f"{100 * _flops_per_step(r) / r['median_s'] / peak_flops:.0f}%"
            mfu = f"({mfu})" if config.get("granular") else mfu
        chunk = "" if config["kind"] == "trl" else ("-" if config["impl"] == "naive" else str(r["chunk_size"]))
        lines.append(
            f"| {config['label']} | {chunk} | {100 * r['weighted_share']:.0f}% | {r['median_s']:.2f} | "
            f"{r['median_cpu_s']:.1f} | {r['other_load']:.1f} | {_tokens_per_s(r):.0f} | "
            f"{peak_mb(r) / 1024:.2f} | {' | '.join(columns)} | {mfu} |"
        )
    return lines


def targets_table(results: dict[str, dict], micro: dict, gpu: bool = False) -> list[str]:
    """The issue's targets beside the measured ratios (issue 14's GPU targets on CUDA)."""
    out = ["| target (issue 7) | measured | |", "|---|---|---|"]

    def row(text: str, value: str, ok: bool | None):
        verdict = "n/a" if ok is None else ("met" if ok else "**not met**")
        out.append(f"| {text} | {value} | {verdict} |")

    t = time_ratio(results, "trl-dpo", "dpo")
    if t:
        throughput = t[0] * first(results, "dpo")["tokens_per_step"] / first(results, "trl-dpo")["tokens_per_step"]
        row(f"our DPO throughput >= {TARGETS['dpo_throughput']:g}x TRL's DPOTrainer", f"{throughput:.2f}x{t[1]}",
            throughput >= TARGETS["dpo_throughput"])
        m = memory_ratio(results, "dpo", "trl-dpo")
        row("our DPO peak memory <= TRL's", f"{m:.2f}x", m <= 1.0)
    for tdpo, dpo in (("tdpo", "dpo"), ("tdpo-1024", "dpo-1024")):
        t = time_ratio(results, tdpo, dpo)
        if t:
            versus = f"our DPO at chunk_size {first(results, dpo)['chunk_size']}"
            label = f"TDPO chunked (chunk_size {first(results, tdpo)['chunk_size']})"
            row(f"{label} time <= {TARGETS['tdpo_time']:g}x {versus}", f"{t[0]:.2f}x{t[1]}",
                t[0] <= TARGETS["tdpo_time"])
            m = memory_ratio(results, tdpo, dpo)
            row(f"{label} peak memory <= {TARGETS['tdpo_memory']:g}x {versus}", f"{m:.2f}x",
                m <= TARGETS["tdpo_memory"])
    naive = micro.get("logits-naive")
    for key in sorted(k for k in micro if k.startswith("logits-chunked")):
        if naive:
            m = naive["logits_peak_mb"] / max(micro[key]["logits_peak_mb"], 1.0)
            shipped = key == "logits-chunked"  # the others show the trade-off, they are no target
            row(f"logits-related peak of chunked (chunk_size {micro[key]['chunk_size']}"
                f"{'' if shipped else ', for comparison'}) >= {TARGETS['logits_memory']:g}x below naive "
                f"(V={micro[key]['vocab']}, T={micro[key]['seq_len']})",
                f"{m:.1f}x", (m >= TARGETS["logits_memory"]) if shipped else None)
    t = time_ratio(results, "tdpo-gran", "tdpo")
    if t:
        share = 100 * first(results, "tdpo-gran")["weighted_share"]
        row(f"granular TDPO ({share:.0f}% of response tokens weighted) measurably cheaper than all weights 1 "
            f"(< {TARGETS['granular_cheaper']:g}x the time)", f"{t[0]:.2f}x time{t[1]}",
            t[0] < TARGETS["granular_cheaper"])
    for config, key in OPTION_CONFIGS.items():  # issue 21: costs to report, no target
        t = time_ratio(results, config, "tdpo2-gran")
        if t:
            cpu = cpu_ratio(results, config, "tdpo2-gran")
            cpu = f" (CPU time {cpu:.2f}x)" if cpu else ""
            share = 100 * first(results, config)["weighted_share"]
            row(f"granular TDPO2 with `{key}` ({share:.0f}% of response tokens weighted in the margin) against "
                "today's granular TDPO2", f"{t[0]:.2f}x time{t[1]}{cpu}", None)
    if gpu:
        m = memory_ratio(results, "dpo", "trl-dpo")
        if m is not None:
            row(f"GPU: our DPO peak CUDA memory <= {GPU_TARGETS['dpo_memory']:g}x TRL's", f"{m:.2f}x",
                m <= GPU_TARGETS["dpo_memory"])
        t = time_ratio(results, "tdpo", "dpo")
        if t:
            row(f"GPU: TDPO chunked time <= {GPU_TARGETS['tdpo_time']:g}x our DPO's", f"{t[0]:.2f}x{t[1]}",
                t[0] <= GPU_TARGETS["tdpo_time"])
            m = memory_ratio(results, "tdpo", "dpo")
            row(f"GPU: TDPO chunked peak CUDA memory <= {GPU_TARGETS['tdpo_memory']:g}x our DPO's", f"{m:.2f}x",
                m <= GPU_TARGETS["tdpo_memory"])
    else:
        row("GPU (bf16): the same ratios (bench/gpu_check.sh)", "no GPU lent to this run", None)
    return out


def micro_lines(micro: dict) -> list[str]:
    runs = [v for k, v in micro.items() if k.startswith("logits-")]
    if not runs:
        return []
    parts = []
    for v in runs:
        what = "naive" if v["impl"] == "naive" else f"chunked (chunk_size {v['chunk_size']})"
        parts.append(f"{what}: {v['logits_peak_mb']:.0f} MiB, {v['seconds']:.1f} s")
    v = runs[0]
    return [
        f"Logits-related peak memory: `compute_token_stats` forward + backward with the KL (TDPO) on random "
        f"hidden states, {v['rows']} rows x {v['seq_len']} positions, H = {v['hidden']}, V = {v['vocab']}, the "
        "first quarter of each row unweighted (the prompt); peak RSS above its inputs, a fresh process each: "
        + "; ".join(parts) + ".",
    ]


# ---------------------------------------------------------------- the whole report


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    ram = psutil.virtual_memory().total / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, {platform.system()} {platform.release()}"


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torch", "transformers", "trl"):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} (not installed)")
    return ", ".join(out) + f"; Python {platform.python_version()}"


def anchor_lines(results: dict[str, dict]) -> list[str]:
    """Where a configuration ran more than once (an anchor between groups), its other timings."""
    out = []
    for config in dict.fromkeys(r["config"] for r in results.values()):
        runs = runs_of(results, config)
        if len(runs) > 1:
            times = ", ".join(f"group {r['group'] + 1}: {r['median_s']:.2f} s ({r['median_cpu_s']:.1f} s CPU)"
                              for r in runs)
            out.append(f"- {CONFIGS[config]['label']} ran in several groups (the anchor between them): {times}")
    return out


def report(args, results: dict, micro: dict, peak: float | None, groups: list[list[str]], started: float,
           loads: tuple[str, str], notes: list[str]) -> str:
    r0 = next(iter(results.values()), {})
    gpu = getattr(args, "device", "cpu") == "cuda"
    bf16 = getattr(args, "dtype", "fp32") == "bf16"
    if getattr(args, "workload", "full") == "short":
        rows = (f"variable-length rows: prompts {r0.get('prompt_tokens', 0):.0f} tokens and responses "
                f"{r0.get('response_tokens', 0):.0f} tokens on average, padded batches (TRL gets our sampler: "
                f"the same batches in the same order)")
    else:
        rows = f"{args.seq_len} tokens, every row full (no padding)"
    precision = "bf16 autocast over fp32 weights (ours: reference held in bf16; TRL: its fp32 reference)" \
        if bf16 else "fp32"
    optimizers = sorted({f"{CONFIGS[r['config']]['label']}: {r['optimizer']}" for r in results.values()
                         if r.get("optimizer")})
    liger = [r.get("liger") for r in results.values() if CONFIGS[r["config"]]["kind"] == "trl"]
    memory = ("peak memory = `torch.cuda.max_memory_allocated` from the start of training (models loaded)"
              if gpu else "peak memory = peak RSS")
    if args.in_process:
        where = "every configuration in this one process (--in-process: peak RSS accumulates, not comparable)"
    else:
        where = ("each configuration in a fresh process (peak RSS = its ru_maxrss: models, gradients, optimizer "
                 "state, activations); the processes of a group take turns step by step")
    lines = [
        "# Benchmark: seconds per optimizer step, throughput, peak memory (issue 7)",
        "",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; the whole run took "
        f"{(time.time() - started) / 60:.1f} min: `{' '.join(['python bench/step.py', *args.argv])}`",
        f"- machine: {machine()}; load average {loads[0]} before, {loads[1]} after (a shared machine: compare "
        "ratios, not absolute times)",
        f"- software: {versions()}",
        f"- work: model `{args.model}` ({r0.get('params', 0) / 1e6:.1f}M parameters), {args.batch} pairs "
        f"(SFT: {args.batch} rows) x {rows}, {precision} on {'CUDA' if gpu else 'CPU'}, optimizer "
        f"{args.optimizer} (lr {args.lr}), no activation checkpointing; {memory}"
        + (f"; {args.threads} torch thread(s) per process" if getattr(args, "threads", None) else ""),
        *([f"- optimizer implementations: {'; '.join(optimizers)}"] if optimizers else []),
        *([f"- TRL's fused head (Liger kernel): {'on' if liger[0] else 'off (not installed, or not CUDA)'}"]
          if liger else []),
        "- ours: `run_training` with the shipped config and overrides (loss, logprobs.impl, granular.enabled, "
        "batch_size, max_length, optimizer, mixed_precision, debug=true); TRL: `DPOTrainer` + `DPOConfig` "
        "(precompute off; bf16 as ours; gradient checkpointing off, as ours) on the same token ids, models and "
        "optimizer (class, lr, fused / foreach as `training.optimizer` chooses for ours)",
        f"- s / step: the median of {args.steps} optimizer step(s) after {args.warmup} warm-up step(s), each "
        f"timed from `on_step_begin` to `on_step_end` (forward, backward, clipping, update); {where}",
        *([] if args.in_process else ["- groups (interleaved, one after another): "
                                      + "; ".join(" + ".join(CONFIGS[n]["label"] for n in g) for g in groups)]),
        f"- ratios: plain = side by side in one group; {CHAINED} = through a configuration run in both groups; "
        f"{SEPARATE} = across groups (exposed to load changes between them)",
        "- MFU: (6 x params x tokens, + 2 x params x tokens for the reference forward) / step time / the best "
        f"{'bf16' if bf16 else 'fp32'} matmul rate measured in this run"
        + (f" ({peak / 1e9:.0f} GFLOP/s)" if peak else " (not measured)")
        + "; in parentheses for granular runs, whose nominal count includes lm_head work they skip",
        *anchor_lines(results),
        *[f"- note: {n}" for n in notes],
        "",
        *results_table(results, peak),
        "",
        *targets_table(results, micro, gpu),
        "",
        *micro_lines(micro),
    ]
    return "\n".join(lines) + "\n"

"""Seconds per optimizer step, tokens per second and peak memory: our SFT / DPO / TDPO beside TRL's DPO.

    python bench/step.py                      # the full table (make bench); writes bench/results.md
    python bench/step.py --quick              # 1 measured step each, TDPO naive left out
    python bench/step.py --steps 5 --model /path/to/hf-model --configs dpo,trl-dpo

Each configuration runs in a fresh subprocess (its peak RSS is its own), one after another, on the
default SmolLM2-135M at 4 pairs x 256 tokens, fp32 on CPU. Ours go through `run_training` (the shipped
config plus overrides, as `granular-po train` runs them); TRL's `DPOTrainer` gets the same token ids,
batch, optimizer, precision and no activation checkpointing. See bench/README.md for what is measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> what the worker runs; "kind" picks the worker in workloads.py
CONFIGS = {
    "sft": {"label": "SFT", "kind": "ours", "loss": "sft", "impl": "chunked", "granular": False},
    "dpo": {"label": "DPO", "kind": "ours", "loss": "dpo", "impl": "chunked", "granular": False},
    "tdpo-naive": {"label": "TDPO naive", "kind": "ours", "loss": "tdpo", "impl": "naive", "granular": False},
    "tdpo": {"label": "TDPO chunked", "kind": "ours", "loss": "tdpo", "impl": "chunked", "granular": False},
    "tdpo-gran": {"label": "TDPO chunked, granular", "kind": "ours", "loss": "tdpo", "impl": "chunked",
                  "granular": True},
    "tdpo-naive-gran": {"label": "TDPO naive, granular", "kind": "ours", "loss": "tdpo", "impl": "naive",
                        "granular": True},
    "trl-dpo": {"label": "TRL DPOTrainer", "kind": "trl"},
}
DEFAULT_CONFIGS = ["sft", "dpo", "tdpo-naive", "tdpo", "tdpo-gran", "trl-dpo"]
QUICK_CONFIGS = ["sft", "dpo", "tdpo", "tdpo-gran", "trl-dpo"]

# the targets (issue 7), checked against the measured ratios
TARGET_DPO_THROUGHPUT = 1.3  # our DPO tokens/s >= 1.3 x TRL's
TARGET_TDPO_TIME = 1.2  # TDPO chunked s/step <= 1.2 x our DPO's
TARGET_TDPO_MEMORY = 1.1  # TDPO chunked peak <= 1.1 x our DPO's
TARGET_LOGITS_MEMORY = 4.0  # naive logits-related peak >= 4 x chunked
GRANULAR_CHEAPER = 0.95  # "measurably cheaper": at least 5% less time per step than all weights 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="hub id, local HF dir, or smollm2-135m (the default)")
    p.add_argument("--steps", type=int, default=None, help="measured optimizer steps per configuration (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="optimizer steps run before timing starts")
    p.add_argument("--batch", type=int, default=4, help="pairs per optimizer step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row (prompt + response, no padding)")
    p.add_argument("--optimizer", default="SGD", help="torch.optim class for ours and TRL (SGD: the config default)")
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--configs", default=None, help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--quick", action="store_true", help="1 measured step each, TDPO naive left out")
    p.add_argument("--matmul-size", type=int, default=4096, help="side of the square matmuls timed for the peak")
    p.add_argument("--no-micro", action="store_true", help="skip the logits-memory and matmul-peak micro-benchmarks")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="profile the first measured step of each configuration (torch.profiler) into DIR/<name>.txt")
    p.add_argument("--in-process", action="store_true",
                   help="run every configuration in this process (fast, for tests; peak RSS then accumulates)")
    p.add_argument("--out", default=str(HERE / "results.md"), help="where the markdown table is written")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: JSON spec of one configuration
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)  # internal: where the worker writes JSON
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 1 if args.quick else 2
    return args


# ---------------------------------------------------------------- running configurations


def run_spec(spec: dict, in_process: bool, log_dir: Path) -> dict:
    """Run one worker spec in a fresh Python process (or this one); returns its result dict."""
    if in_process:
        sys.path.insert(0, str(HERE))
        from workloads import run_worker

        return run_worker(spec)
    result = log_dir / f"{spec['name']}.json"
    log = log_dir / f"{spec['name']}.log"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--result", str(result)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    with open(log, "w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if code != 0 or not result.is_file():
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"configuration {spec['name']} failed (exit {code}); end of its log:\n{tail}")
    return json.loads(result.read_text())


def specs(args: argparse.Namespace) -> list[dict]:
    names = args.configs.split(",") if args.configs else (QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    common = {"model": args.model, "steps": args.steps, "warmup": args.warmup, "batch": args.batch,
              "seq_len": args.seq_len, "optimizer": args.optimizer, "lr": args.lr}
    out = [{**CONFIGS[n], **common, "name": n} for n in names]
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
        for spec in out:
            spec["profile_to"] = str(Path(args.profile).resolve() / f"{spec['name']}.txt")
    return out


def micro_specs(args: argparse.Namespace, hidden: int, vocab: int, chunk_size: int) -> list[dict]:
    logits = {"kind": "logits", "rows": 2 * args.batch, "seq_len": args.seq_len, "hidden": hidden,
              "vocab": vocab, "need_kl": True, "chunk_size": chunk_size}
    return [
        {**logits, "name": "logits-naive", "impl": "naive"},
        {**logits, "name": "logits-chunked", "impl": "chunked"},
    ]


def model_shape(model: str) -> tuple[int, int]:
    """(hidden_size, vocab_size) from the model's config.json, without loading the model."""
    from granular_po.models import resolve_model_path

    config = json.loads((Path(resolve_model_path(model)) / "config.json").read_text())
    config = config.get("text_config", config)
    return int(config["hidden_size"]), int(config["vocab_size"])


# ---------------------------------------------------------------- the table


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        ram = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        ram = ""
    return f"{cpu}, {os.cpu_count()} cores{ram}, {platform.system()} {platform.release()}"


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("torch", "transformers", "trl"):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} (not installed)")
    return ", ".join(out)


def _ratio(a: float | None, b: float | None) -> str:
    return "" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**not met**")


def build_table(args, results: dict[str, dict], micro: dict[str, dict], peak_flops: float | None) -> str:
    """The markdown report: one row per configuration, ratios to TRL and to our DPO, then the targets."""
    trl, dpo = results.get("trl-dpo"), results.get("dpo")
    lines = [
        "| configuration | weighted share | s / step | CPU s / step | tokens / s | peak RSS (GiB) | time / TRL | "
        "throughput / TRL | memory / TRL | time / our DPO | memory / our DPO | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        tps = r["tokens_per_step"] / r["median_s"]
        # training: 6 x params per token (forward + backward); the reference forward: 2 x params per token
        flops = 6 * r["params"] * r["tokens_per_step"]
        if CONFIGS[name].get("loss", "dpo") != "sft":
            flops += 2 * r["params"] * r["tokens_per_step"]
        mfu = f"{100 * flops / r['median_s'] / peak_flops:.0f}%" if peak_flops else ""
        trl_tps = trl["tokens_per_step"] / trl["median_s"] if trl else None
        lines.append(
            f"| {CONFIGS[name]['label']} | {100 * r['weighted_share']:.0f}% | {r['median_s']:.2f} | "
            f"{r['median_cpu_s']:.1f} | {tps:.0f} | "
            f"{r['peak_rss_mb'] / 1024:.2f} | {_ratio(r['median_s'], trl and trl['median_s'])} | "
            f"{_ratio(tps, trl_tps)} | {_ratio(r['peak_rss_mb'], trl and trl['peak_rss_mb'])} | "
            f"{_ratio(r['median_s'], dpo and dpo['median_s'])} | "
            f"{_ratio(r['peak_rss_mb'], dpo and dpo['peak_rss_mb'])} | {mfu} |"
        )
    lines += ["", *targets(results, micro)]
    if micro.get("logits-naive") and micro.get("logits-chunked"):
        naive, chunked = micro["logits-naive"], micro["logits-chunked"]
        lines += [
            "",
            f"Logits-related peak (compute_token_stats forward + backward with the KL, {2 * args.batch} rows x "
            f"{args.seq_len} tokens, V = {micro['vocab']}, chunk_size = {micro['chunk_size']}; peak RSS above "
            f"its inputs, fresh process each): naive {naive['logits_peak_mb']:.0f} MiB "
            f"({naive['seconds']:.1f} s), chunked {chunked['logits_peak_mb']:.0f} MiB ({chunked['seconds']:.1f} s).",
        ]
    return "\n".join(lines)


def targets(results: dict[str, dict], micro: dict[str, dict]) -> list[str]:
    r = results
    tps = {k: v["tokens_per_step"] / v["median_s"] for k, v in r.items()}
    out = ["| target (issue 7) | measured | |", "|---|---|---|"]

    def row(text: str, value: str, ok: bool | None):
        out.append(f"| {text} | {value} | {_verdict(ok)} |")

    if "dpo" in r and "trl-dpo" in r:
        ratio = tps["dpo"] / tps["trl-dpo"]
        row(f"our DPO throughput >= {TARGET_DPO_THROUGHPUT}x TRL DPOTrainer", f"{ratio:.2f}x",
            ratio >= TARGET_DPO_THROUGHPUT)
        mem = r["dpo"]["peak_rss_mb"] / r["trl-dpo"]["peak_rss_mb"]
        row("our DPO peak memory <= TRL's", f"{mem:.2f}x", mem <= 1.0)
    if "dpo" in r and "tdpo" in r:
        t = r["tdpo"]["median_s"] / r["dpo"]["median_s"]
        row(f"TDPO chunked time <= {TARGET_TDPO_TIME}x our DPO", f"{t:.2f}x", t <= TARGET_TDPO_TIME)
        m = r["tdpo"]["peak_rss_mb"] / r["dpo"]["peak_rss_mb"]
        row(f"TDPO chunked peak memory <= {TARGET_TDPO_MEMORY}x our DPO", f"{m:.2f}x", m <= TARGET_TDPO_MEMORY)
    if micro.get("logits-naive") and micro.get("logits-chunked"):
        m = micro["logits-naive"]["logits_peak_mb"] / max(micro["logits-chunked"]["logits_peak_mb"], 1.0)
        row(f"logits-related peak: naive >= {TARGET_LOGITS_MEMORY}x chunked (V={micro['vocab']}, "
            f"T={micro['seq_len']})", f"{m:.1f}x", m >= TARGET_LOGITS_MEMORY)
    if "tdpo" in r and "tdpo-gran" in r:
        t = r["tdpo-gran"]["median_s"] / r["tdpo"]["median_s"]
        share = 100 * r["tdpo-gran"]["weighted_share"]
        row(f"granular TDPO ({share:.0f}% weighted) measurably cheaper than all weights 1 (< {GRANULAR_CHEAPER}x)",
            f"{t:.2f}x time", t < GRANULAR_CHEAPER)
    row("GPU (bf16): same ratios; >= 1B model, TDPO at batch 8 x 1024 on one H100 where naive runs out",
        "no GPU lent to this run", None)
    return out


def report(args, results, micro, peak, started: float, load_before, load_after) -> str:
    first = next(iter(results.values()), {})
    header = [
        "# Benchmark: seconds per optimizer step, throughput, peak memory (issue 7)",
        "",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; wall time of the whole run: "
        f"{(time.time() - started) / 60:.1f} min",
        f"- machine: {machine()}; load average {load_before} before, {load_after} after "
        "(the machine may be shared: compare the ratios, which are measured side by side, not absolute times)",
        f"- software: {versions()}; Python {platform.python_version()}",
        f"- work: model `{args.model}` ({first.get('params', 0) / 1e6:.1f}M parameters), {args.batch} pairs "
        f"(SFT: {args.batch} rows) x {args.seq_len} tokens, no padding, fp32 on CPU, optimizer {args.optimizer}, "
        f"lr {args.lr}; median of {args.steps} optimizer step(s) after {args.warmup} warm-up step(s); "
        "each configuration in a fresh process (peak RSS = its ru_maxrss, models and optimizer included)",
        "- matmul peak (best fp32 square matmul, same threads): "
        + (f"{peak / 1e9:.0f} GFLOP/s; MFU = (6 x params x tokens, + 2 x params x tokens for the reference) "
           "/ step time / peak" if peak else "not measured"),
        "",
    ]
    return "\n".join(header) + build_table(args, results, micro, peak) + "\n"


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:  # inside a fresh subprocess: run one configuration, write its JSON
        sys.path.insert(0, str(HERE))
        from workloads import run_worker

        Path(args.result).write_text(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    started, load_before = time.time(), _load()
    results, micro, peak = {}, {}, None
    with tempfile.TemporaryDirectory(prefix="granular-bench-logs-") as tmp:
        log_dir = Path(tmp)
        if not args.no_micro:
            peak = run_spec({"kind": "matmul", "name": "matmul", "sizes": [args.matmul_size // 2, args.matmul_size]},
                            args.in_process, log_dir)["matmul_flops"]
        for spec in specs(args):
            print(f"[{time.strftime('%H:%M:%S')}] {spec['name']} ...", flush=True)
            results[spec["name"]] = run_spec(spec, args.in_process, log_dir)
            r = results[spec["name"]]
            print(f"    {r['median_s']:.2f} s/step (steps {[round(s, 2) for s in r['step_s']]}), "
                  f"peak RSS {r['peak_rss_mb']:.0f} MiB", flush=True)
        if not args.no_micro:
            hidden, vocab = model_shape(args.model)
            chunk = next((r["chunk_size"] for r in results.values() if r.get("chunk_size")), 1024)
            micro = {"vocab": vocab, "seq_len": args.seq_len, "chunk_size": chunk}
            for spec in micro_specs(args, hidden, vocab, chunk):
                print(f"[{time.strftime('%H:%M:%S')}] {spec['name']} ...", flush=True)
                micro[spec["name"]] = run_spec(spec, args.in_process, log_dir)
    text = report(args, results, micro, peak, started, load_before, _load())
    print("\n" + text)
    Path(args.out).write_text(text)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

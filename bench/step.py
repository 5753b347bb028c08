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

# name -> what the worker runs; "kind" picks the worker in workloads.py. Ours use the shipped config's
# logprobs.chunk_size unless "chunk_size" is given.
CONFIGS = {
    "trl-dpo": {"label": "TRL DPOTrainer", "kind": "trl"},
    "dpo": {"label": "DPO", "kind": "ours", "loss": "dpo", "impl": "chunked", "granular": False},
    "tdpo": {"label": "TDPO chunked", "kind": "ours", "loss": "tdpo", "impl": "chunked", "granular": False},
    "tdpo-gran": {"label": "TDPO chunked, granular", "kind": "ours", "loss": "tdpo", "impl": "chunked",
                  "granular": True},
    "tdpo-naive": {"label": "TDPO naive", "kind": "ours", "loss": "tdpo", "impl": "naive", "granular": False},
    "sft": {"label": "SFT", "kind": "ours", "loss": "sft", "impl": "chunked", "granular": False},
    "tdpo-naive-gran": {"label": "TDPO naive, granular", "kind": "ours", "loss": "tdpo", "impl": "naive",
                        "granular": True},
    "dpo-256": {"label": "DPO, chunk_size=256", "kind": "ours", "loss": "dpo", "impl": "chunked",
                "granular": False, "chunk_size": 256},
    "tdpo-256": {"label": "TDPO chunked, chunk_size=256", "kind": "ours", "loss": "tdpo", "impl": "chunked",
                 "granular": False, "chunk_size": 256},
}
# Groups run interleaved (one process each, taking turns step by step), so the configurations whose
# ratios the targets compare are timed under the same conditions; groups run one after another.
# Interleaved processes hold their models and allocator caches between steps (about 3 GiB each for
# SmolLM2-135M at this batch), the one in its step its full peak: the first group needs about 17 GiB.
DEFAULT_GROUPS = [["trl-dpo", "dpo", "tdpo", "tdpo-gran"], ["tdpo-naive", "sft"]]
# run last, and only while the projected end stays inside --budget-min
OPTIONAL_GROUPS = [["dpo-256", "tdpo-256"]]
QUICK_GROUPS = [["trl-dpo", "dpo", "tdpo", "tdpo-gran"], ["sft"]]
MICRO_CHUNK = 256  # the logits micro-benchmark also runs at this chunk size

# the targets (issue 7), checked against the measured ratios
TARGET_DPO_THROUGHPUT = 1.3  # our DPO tokens/s >= 1.3 x TRL's
TARGET_TDPO_TIME = 1.2  # TDPO chunked s/step <= 1.2 x our DPO's
TARGET_TDPO_MEMORY = 1.1  # TDPO chunked peak <= 1.1 x our DPO's
TARGET_LOGITS_MEMORY = 4.0  # naive logits-related peak >= 4 x chunked
GRANULAR_CHEAPER = 0.95  # "measurably cheaper": at least 5% less time per step than all weights 1
OTHER_LOAD_WARNING = 0.25  # cores used by other processes during a row's timed steps: above this, say so


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="hub id, local HF dir, or smollm2-135m (the default)")
    p.add_argument("--steps", type=int, default=None, help="measured optimizer steps per configuration (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="optimizer steps run before timing starts")
    p.add_argument("--batch", type=int, default=4, help="pairs per optimizer step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row (prompt + response, no padding)")
    p.add_argument("--optimizer", default="SGD", help="torch.optim class for ours and TRL (SGD: the config default)")
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--configs", default=None, help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--quick", action="store_true", help="1 measured step each, TDPO naive left out")
    p.add_argument("--budget-min", type=float, default=14.0,
                   help="optional configurations are skipped when they would end the run after this many minutes")
    p.add_argument("--gib-per-process", type=float, default=4.5,
                   help="memory a group needs per process; a group is run one process at a time when less is free")
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
        args.steps = 1 if args.quick else 3
    return args


# ---------------------------------------------------------------- running configurations


def _worker_command(spec: dict, result: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--result", str(result)]


_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def _failed(name: str, log: Path, why: str) -> RuntimeError:
    return RuntimeError(f"configuration {name} {why}; end of its log:\n{log.read_text()[-3000:]}")


def run_spec(spec: dict, in_process: bool, log_dir: Path) -> dict:
    """Run one worker spec in a fresh Python process (or this one); returns its result dict."""
    if in_process:
        sys.path.insert(0, str(HERE))
        from workloads import run_worker

        return run_worker(spec)
    result, log = log_dir / f"{spec['name']}.json", log_dir / f"{spec['name']}.log"
    with open(log, "w") as handle:
        code = subprocess.call(_worker_command(spec, result), stdout=handle, stderr=subprocess.STDOUT,
                               env={**os.environ, **_ENV})
    if code != 0 or not result.is_file():
        raise _failed(spec["name"], log, f"failed (exit {code})")
    return json.loads(result.read_text())


def run_interleaved(group: list[dict], log_dir: Path) -> dict[str, dict]:
    """Run training configurations side by side, one fresh process each, taking turns step by step.

    Every process loads its models at once; then the first runs one optimizer step while the others
    wait on a pipe, then the second, and so on, round after round. A burst of load from elsewhere on
    the machine then lands on neighbouring steps of all of them alike, and each process's peak RSS is
    still its own. Returns {name: result}.
    """
    running = []
    try:
        for spec in group:
            go_read, go_write = os.pipe()
            done_read, done_write = os.pipe()
            result, log = log_dir / f"{spec['name']}.json", log_dir / f"{spec['name']}.log"
            with open(log, "w") as handle:
                proc = subprocess.Popen(
                    _worker_command({**spec, "baton": [go_read, done_write]}, result), stdout=handle,
                    stderr=subprocess.STDOUT, env={**os.environ, **_ENV}, pass_fds=(go_read, done_write),
                )  # fmt: skip
            os.close(go_read)
            os.close(done_write)
            running.append((spec["name"], proc, go_write, done_read, result, log))
        for _ in range(group[0]["warmup"] + group[0]["steps"]):
            for name, _proc, go, done, _result, log in running:
                answer = _answer(done) if _say_go(go) else b""
                if answer != b".":
                    raise _failed(name, log, "stopped before its last step" if answer == b"E" else "died")
        for name, _proc, go, done, _result, log in running:
            if _answer(done) != b"E":  # its training is over: let it write its result and exit
                raise _failed(name, log, "ran more steps than asked")
            _say_go(go)
        out = {}
        for name, proc, _go, _done, result, log in running:
            if proc.wait() != 0 or not result.is_file():
                raise _failed(name, log, f"failed (exit {proc.returncode})")
            out[name] = json.loads(result.read_text())
        return out
    finally:
        for _name, proc, go, done, _result, _log in running:
            for fd in (go, done):
                try:
                    os.close(fd)
                except OSError:
                    pass
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _say_go(fd: int) -> bool:
    try:
        os.write(fd, b"g")
        return True
    except BrokenPipeError:  # the process is gone
        return False


def _answer(fd: int) -> bytes:
    """"." a step is done, "E" its training is over, b"" the process died."""
    return os.read(fd, 1)


def _group_names(args: argparse.Namespace) -> list[list[str]]:
    if args.configs:
        return [g.split("+") for g in args.configs.split(",")]
    return QUICK_GROUPS if args.quick else DEFAULT_GROUPS + OPTIONAL_GROUPS


def groups(args: argparse.Namespace) -> list[list[dict]]:
    """The configurations to run, as interleaved groups of worker specs (`--configs a+b,c`: a and b together)."""
    names = _group_names(args)
    optional = [g for g in OPTIONAL_GROUPS if g in names] if not args.configs else []
    names = [g for g in names if g not in optional]
    unknown = [n for g in names + optional for n in g if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    common = {"model": args.model, "steps": args.steps, "warmup": args.warmup, "batch": args.batch,
              "seq_len": args.seq_len, "optimizer": args.optimizer, "lr": args.lr}
    out = []
    for group in names + optional:
        out.append([{**CONFIGS[n], **common, "name": n, "optional": group in optional} for n in group])
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            for spec in out[-1]:
                spec["profile_to"] = str(Path(args.profile).resolve() / f"{spec['name']}.txt")
    return out


def micro_specs(args: argparse.Namespace, hidden: int, vocab: int, chunk_size: int) -> list[dict]:
    logits = {"kind": "logits", "rows": 2 * args.batch, "seq_len": args.seq_len, "hidden": hidden,
              "vocab": vocab, "need_kl": True, "chunk_size": chunk_size}
    out = [
        {**logits, "name": "logits-naive", "impl": "naive"},
        {**logits, "name": "logits-chunked", "impl": "chunked"},
    ]
    if chunk_size != MICRO_CHUNK:
        out.append({**logits, "name": f"logits-chunked-{MICRO_CHUNK}", "impl": "chunked", "chunk_size": MICRO_CHUNK})
    return out


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


def _tokens_per_s(r: dict) -> float:
    return r["tokens_per_step"] / r["median_s"]


def _flops_per_step(name: str, r: dict) -> float:
    """6 x params per token trained (forward + backward), plus 2 x params per token of reference forward."""
    flops = 6 * r["params"] * r["tokens_per_step"]
    if CONFIGS[name].get("loss", "dpo") != "sft":
        flops += 2 * r["params"] * r["tokens_per_step"]
    return flops


def results_table(results: dict[str, dict], peak_flops: float | None) -> list[str]:
    """One row per configuration: absolute figures, then ratios to TRL's DPO and to our DPO."""
    trl, dpo = results.get("trl-dpo"), results.get("dpo")
    lines = [
        "| configuration | chunk_size | weighted tokens | s / step | CPU s / step | other load | tokens / s "
        "| peak RSS (GiB) | time / TRL | throughput / TRL | memory / TRL | time / our DPO | memory / our DPO "
        "| MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        tps = _tokens_per_s(r)
        mfu = f"{100 * _flops_per_step(name, r) / r['median_s'] / peak_flops:.0f}%" if peak_flops else ""
        chunk = "" if CONFIGS[name]["kind"] == "trl" else ("-" if CONFIGS[name]["impl"] == "naive" else r["chunk_size"])
        lines.append(
            f"| {CONFIGS[name]['label']} | {chunk} | {100 * r['weighted_share']:.0f}% | {r['median_s']:.2f} | "
            f"{r['median_cpu_s']:.1f} | {r['other_load']:.1f} | {tps:.0f} | {r['peak_rss_mb'] / 1024:.2f} | "
            f"{_ratio(r['median_s'], trl and trl['median_s'])} | {_ratio(tps, trl and _tokens_per_s(trl))} | "
            f"{_ratio(r['peak_rss_mb'], trl and trl['peak_rss_mb'])} | {_ratio(r['median_s'], dpo and dpo['median_s'])} | "
            f"{_ratio(r['peak_rss_mb'], dpo and dpo['peak_rss_mb'])} | {mfu} |"
        )
    return lines


def targets_table(results: dict[str, dict], micro: dict) -> list[str]:
    """The issue's targets beside the measured ratios."""
    r = results
    out = ["| target (issue 7) | measured | |", "|---|---|---|"]

    def row(text: str, value: str, ok: bool | None):
        out.append(f"| {text} | {value} | {_verdict(ok)} |")

    if "dpo" in r and "trl-dpo" in r:
        ratio = _tokens_per_s(r["dpo"]) / _tokens_per_s(r["trl-dpo"])
        row(f"our DPO throughput >= {TARGET_DPO_THROUGHPUT}x TRL's DPOTrainer", f"{ratio:.2f}x",
            ratio >= TARGET_DPO_THROUGHPUT)
        mem = r["dpo"]["peak_rss_mb"] / r["trl-dpo"]["peak_rss_mb"]
        row("our DPO peak memory <= TRL's", f"{mem:.2f}x", mem <= 1.0)
    for name, base in (("tdpo", "dpo"), ("tdpo-256", "dpo-256" if "dpo-256" in r else "dpo")):
        if base in r and name in r:
            label = f"TDPO chunked (chunk_size {r[name]['chunk_size']})"
            versus = f"our DPO (chunk_size {r[base]['chunk_size']})"
            t = r[name]["median_s"] / r[base]["median_s"]
            row(f"{label} time <= {TARGET_TDPO_TIME}x {versus}", f"{t:.2f}x", t <= TARGET_TDPO_TIME)
            m = r[name]["peak_rss_mb"] / r[base]["peak_rss_mb"]
            row(f"{label} peak memory <= {TARGET_TDPO_MEMORY}x {versus}", f"{m:.2f}x", m <= TARGET_TDPO_MEMORY)
    naive = micro.get("logits-naive")
    for key in sorted(k for k in micro if isinstance(micro[k], dict) and k.startswith("logits-chunked")):
        if naive:
            m = naive["logits_peak_mb"] / max(micro[key]["logits_peak_mb"], 1.0)
            row(f"logits-related peak of chunked (chunk_size {micro[key]['chunk_size']}) >= "
                f"{TARGET_LOGITS_MEMORY:g}x below naive (V={micro['vocab']}, T={micro['seq_len']})", f"{m:.1f}x",
                m >= TARGET_LOGITS_MEMORY)
    if "tdpo" in r and "tdpo-gran" in r:
        t = r["tdpo-gran"]["median_s"] / r["tdpo"]["median_s"]
        share = 100 * r["tdpo-gran"]["weighted_share"]
        row(f"granular TDPO ({share:.0f}% of response tokens weighted) measurably cheaper than all weights 1 "
            f"(< {GRANULAR_CHEAPER}x the time)", f"{t:.2f}x time", t < GRANULAR_CHEAPER)
    row("GPU (bf16): the same ratios; a >= 1B model with TDPO at batch 8 x 1024 on one H100 where naive "
        "runs out of memory", "no GPU lent to this run", None)
    return out


def micro_lines(args, micro: dict) -> list[str]:
    runs = [v for v in micro.values() if isinstance(v, dict)]
    if not runs:
        return []
    parts = []
    for v in runs:
        what = "naive" if v["impl"] == "naive" else f"chunked (chunk_size {v['chunk_size']})"
        parts.append(f"{what}: {v['logits_peak_mb']:.0f} MiB, {v['seconds']:.1f} s")
    return [
        f"Logits-related peak memory: `compute_token_stats` forward + backward with the KL (TDPO), on random "
        f"hidden states, {2 * args.batch} rows x {args.seq_len} tokens, H = {runs[0]['hidden']}, "
        f"V = {micro['vocab']}, the first quarter of each row unweighted (the prompt); peak RSS above its "
        "inputs: " + "; ".join(parts) + ".",
    ]


def report(args, results, micro, peak, started: float, loads: tuple[str, str], notes: list[str]) -> str:
    first = next(iter(results.values()), {})
    if args.in_process:
        where = "every configuration in this one process (--in-process: peak RSS accumulates, not comparable)"
    else:
        where = ("each configuration in a fresh process (peak RSS = its ru_maxrss: models, gradients, optimizer "
                 "state, activations); the processes of a group take turns step by step, so a burst of load from "
                 "elsewhere lands on all of them alike")
    group_text = "; ".join(" + ".join(CONFIGS[n]["label"] for n in g) for g in _group_names(args))
    lines = [
        "# Benchmark: seconds per optimizer step, throughput, peak memory (issue 7)",
        "",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; the whole run took "
        f"{(time.time() - started) / 60:.1f} min",
        f"- machine: {machine()}; load average {loads[0]} before, {loads[1]} after. The machine may be "
        "shared: the ratios, measured side by side in one run, carry over; absolute times do not",
        f"- software: {versions()}; Python {platform.python_version()}",
        f"- work: model `{args.model}` ({first.get('params', 0) / 1e6:.1f}M parameters), {args.batch} pairs "
        f"(SFT: {args.batch} rows) x {args.seq_len} tokens, every row full (no padding), fp32 on CPU, "
        f"optimizer {args.optimizer} (lr {args.lr}), no activation checkpointing",
        f"- s / step: the median of {args.steps} optimizer step(s) after {args.warmup} warm-up step(s), each "
        "timed from `on_step_begin` to `on_step_end` (forward, backward, clipping, update); " + where,
        *([] if args.in_process else [f"- groups (interleaved): {group_text}"]),
        "- ours: `run_training` with the shipped config and overrides (loss, logprobs.impl, granular.enabled, "
        "batch_size, max_length, optimizer, debug=true); TRL: `DPOTrainer` + `DPOConfig` (precompute off, "
        "bf16 and gradient checkpointing off to match) on the same token ids, models and optimizer class",
        "- matmul peak (best fp32 square matmul, same threads): "
        + (f"{peak / 1e9:.0f} GFLOP/s. MFU = (6 x params x tokens, + 2 x params x tokens for the reference "
           "forward) / step time / that peak" if peak else "not measured"),
        *[f"- note: {n}" for n in notes],
        "",
        *results_table(results, peak),
        "",
        *targets_table(results, micro),
        "",
        *micro_lines(args, micro),
    ]
    return "\n".join(lines) + "\n"


def _free_gib() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**30


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def run_notes(results: dict[str, dict]) -> list[str]:
    """Caveats the table's reader must see: disturbed rows, a chunked run that fell back to full logits."""
    notes = []
    # (below half a second a step, the kernel's 10 ms CPU accounting makes the figure noise)
    busy = [CONFIGS[n]["label"] for n, r in results.items()
            if r["other_load"] > OTHER_LOAD_WARNING and r["median_s"] > 0.5]
    if busy:
        notes.append(f"other processes kept more than {OTHER_LOAD_WARNING:g} core busy during: {', '.join(busy)}; "
                     "those times are inflated, and so are the ratios that involve them")
    for name, r in results.items():
        if CONFIGS[name].get("impl") == "chunked" and not r.get("hidden_path", True):
            notes.append(f"{CONFIGS[name]['label']} took the full-logits route (supports_hidden_path was false)")
    return notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:  # inside a fresh subprocess: run one configuration, write its JSON
        sys.path.insert(0, str(HERE))
        from workloads import run_worker

        Path(args.result).write_text(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    started, load_before = time.time(), _load()
    results, micro, peaks, notes, wall = {}, {}, [], [], []
    todo = groups(args)

    def stamp(what: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}, {(time.time() - started) / 60:.1f} min] {what} ...", flush=True)

    def run_group(group: list[dict]) -> None:
        stamp(" + ".join(spec["name"] for spec in group))
        begin = time.time()
        free = _free_gib()
        sequential = args.in_process or len(group) == 1 or free < args.gib_per_process * len(group)
        if sequential and len(group) > 1 and not args.in_process:
            notes.append(f"{' + '.join(s['name'] for s in group)} ran one after another, not interleaved: "
                         f"{free:.0f} GiB free, {args.gib_per_process:g} GiB per process wanted")
        if sequential:
            done = {spec["name"]: run_spec(spec, args.in_process, log_dir) for spec in group}
        else:
            done = run_interleaved(group, log_dir)
        wall.append((time.time() - begin) / len(group))  # per configuration
        for name, r in done.items():
            results[name] = r
            print(f"    {name}: {r['median_s']:.2f} s/step (steps {[round(x, 2) for x in r['step_s']]}), "
                  f"peak RSS {r['peak_rss_mb']:.0f} MiB, between steps {r['idle_rss_mb']:.0f} MiB", flush=True)

    with tempfile.TemporaryDirectory(prefix="granular-bench-logs-") as tmp:
        log_dir = Path(tmp)
        matmul = {"kind": "matmul", "name": "matmul", "sizes": [args.matmul_size // 2, args.matmul_size]}
        if not args.no_micro:
            stamp("matmul peak")
            peaks.append(run_spec(matmul, args.in_process, log_dir)["matmul_flops"])
        for group in [g for g in todo if not g[0]["optional"]]:
            run_group(group)
        default_chunk = next((r["chunk_size"] for r in results.values() if r.get("chunk_size")), 1024)
        if not args.no_micro:
            hidden, vocab = model_shape(args.model)
            micro = {"vocab": vocab, "seq_len": args.seq_len}
            for spec in micro_specs(args, hidden, vocab, default_chunk):
                stamp(spec["name"])
                micro[spec["name"]] = {**run_spec(spec, args.in_process, log_dir), **spec}
        for group in [g for g in todo if g[0]["optional"]]:
            group = [spec for spec in group if spec.get("chunk_size") != default_chunk]  # else: rows above
            if group and (time.time() - started + max(wall, default=0.0) * len(group)) / 60 > args.budget_min:
                labels = " and ".join(spec["label"] for spec in group)
                notes.append(f"{labels} skipped: they would end the run after --budget-min {args.budget_min:g} min")
            elif group:
                run_group(group)
        if not args.no_micro:  # again at the end: the best of two is nearer the machine's real peak
            stamp("matmul peak")
            peaks.append(run_spec(matmul, args.in_process, log_dir)["matmul_flops"])
    text = report(args, results, micro, max(peaks, default=None), started, (load_before, _load()),
                  notes + run_notes(results))
    print("\n" + text)
    Path(args.out).write_text(text)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

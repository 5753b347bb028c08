"""Seconds per optimizer step, tokens per second and peak memory: our SFT / DPO / TDPO beside TRL's DPO.

    python bench/step.py                      # the full table (make bench); writes bench/results.md
    python bench/step.py --quick              # 1 measured step each, no TDPO naive, no chunk_size=1024 rows
    python bench/step.py --configs trl-dpo+dpo,sft --steps 5   # a+b: one interleaved group; groups in turn
    python bench/step.py --model /path/to/hf-model --seq-len 512 --optimizer AdamW
    python bench/step.py --workload short --optimizer AdamW --configs trl-dpo+dpo-loop+dpo   # short rows
    python bench/step.py --device cuda --dtype bf16 --model DIR --seq-len 1024   # on a GPU (bench/gpu_check.sh)

Every configuration runs in a fresh subprocess (its peak RSS is its own); the processes of a group
take turns step by step (see configs.py). Default: SmolLM2-135M at 4 pairs x 256 tokens, fp32 on CPU.
Ours go through `run_training` (the shipped config plus overrides, as `granular-po train` runs them);
TRL's `DPOTrainer` gets the same token ids, batch, optimizer, precision and no activation
checkpointing. bench/README.md says what is measured and how to read it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from configs import (  # noqa: E402
    CONFIGS,
    DEFAULT_GROUPS,
    MICRO_CHUNK,
    OPTIONAL_GROUPS,
    OTHER_LOAD_WARNING,
    QUICK_GROUPS,
)

_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="hub id, local HF dir, or smollm2-135m (the default)")
    p.add_argument("--steps", type=int, default=None, help="measured optimizer steps per configuration (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="optimizer steps run before timing starts")
    p.add_argument("--batch", type=int, default=4, help="pairs per optimizer step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row (prompt + response, no padding)")
    p.add_argument("--workload", choices=("full", "short"), default="full",
                   help="full: every row --seq-len tokens; short: prompts ~15 tokens, responses 40-70, padded "
                        "batches (the same batches for TRL: our seeded sampler)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: synchronised step times, peak CUDA memory (allocated, from the start of training)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (OMP_NUM_THREADS); on a machine shared with other work, 1 "
                        "avoids OpenMP barriers spinning against other processes (2-4x slower steps here)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast over fp32 weights for both (ours mixed_precision=bf16, TRL bf16=True)")
    p.add_argument("--optimizer", default="SGD", help="torch.optim class for ours and TRL (SGD: the config default)")
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--configs", default=None,
                   help=f"groups to run: 'a+b,c' runs a and b interleaved, then c; names: {', '.join(CONFIGS)}")
    p.add_argument("--quick", action="store_true", help="1 measured step each; no TDPO naive, no chunk_size=1024")
    p.add_argument("--budget-min", type=float, default=14.0,
                   help="the optional group is skipped when it would end the run after this many minutes")
    p.add_argument("--gib-per-process", type=float, default=4.5,
                   help="free memory a group wants per process; with less, its processes run one after another")
    p.add_argument("--matmul-size", type=int, default=4096, help="side of the square matmuls timed for the peak")
    p.add_argument("--no-micro", action="store_true", help="skip the logits-memory and matmul-peak micro-benchmarks")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="profile the first measured step of each configuration (torch.profiler) into DIR/<run>.txt")
    p.add_argument("--in-process", action="store_true",
                   help="run everything in this process, one after another (for tests: peak RSS accumulates)")
    p.add_argument("--out", default=str(HERE / "results.md"), help="where the markdown report is written")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: JSON spec of one run
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)  # internal: where the worker writes JSON
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.steps is None:
        args.steps = 1 if args.quick else 3
    return args


# ---------------------------------------------------------------- what to run


def group_names(args: argparse.Namespace) -> tuple[list[list[str]], list[list[str]]]:
    """(groups, optional groups) of configuration names."""
    if args.configs:
        return [g.split("+") for g in args.configs.split(",")], []
    return (QUICK_GROUPS, []) if args.quick else (DEFAULT_GROUPS, OPTIONAL_GROUPS)


def groups(args: argparse.Namespace) -> list[list[dict]]:
    """Worker specs, group by group. A configuration's second run (an anchor) is named "<config>@<group>"."""
    required, optional = group_names(args)
    unknown = [n for g in required + optional for n in g if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    common = {"model": args.model, "steps": args.steps, "warmup": args.warmup, "batch": args.batch,
              "seq_len": args.seq_len, "optimizer": args.optimizer, "lr": args.lr, "workload": args.workload,
              "device": args.device, "dtype": args.dtype, "threads": args.threads}
    out, seen = [], set()
    for index, group in enumerate(required + optional):
        specs = []
        for config in group:
            name = config if config not in seen else f"{config}@{index + 1}"
            seen.add(config)
            specs.append({**CONFIGS[config], **common, "name": name, "config": config, "group": index,
                          "optional": index >= len(required)})
            if args.profile:
                Path(args.profile).mkdir(parents=True, exist_ok=True)
                specs[-1]["profile_to"] = str(Path(args.profile).resolve() / f"{name}.txt")
        out.append(specs)
    return out


def micro_specs(args: argparse.Namespace, hidden: int, vocab: int, chunk_size: int) -> list[dict]:
    logits = {"kind": "logits", "rows": 2 * args.batch, "seq_len": args.seq_len, "hidden": hidden,
              "vocab": vocab, "need_kl": True, "chunk_size": chunk_size, "device": args.device, "dtype": args.dtype}
    out = [{**logits, "name": "logits-naive", "impl": "naive"}, {**logits, "name": "logits-chunked", "impl": "chunked"}]
    if chunk_size != MICRO_CHUNK:
        out.append({**logits, "name": f"logits-chunked-{MICRO_CHUNK}", "impl": "chunked", "chunk_size": MICRO_CHUNK})
    return out


def model_shape(model: str) -> tuple[int, int]:
    """(hidden_size, vocab_size) from the model's config.json, without loading the model."""
    from granular_po.models import resolve_model_path

    config = json.loads((Path(resolve_model_path(model)) / "config.json").read_text())
    config = config.get("text_config", config)
    return int(config["hidden_size"]), int(config["vocab_size"])


# ---------------------------------------------------------------- running workers


def _worker_command(spec: dict, result: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--result", str(result)]


def _failed(name: str, log: Path, why: str) -> RuntimeError:
    return RuntimeError(f"configuration {name} {why}; end of its log:\n{log.read_text()[-3000:]}")


def _worker_env(spec: dict) -> dict:
    """The worker's environment; a CPU run sees no GPU (our trainer and TRL's would take one)."""
    env = {**os.environ, **_ENV}
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = str(spec["threads"])
    if spec.get("device", "cpu") == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_spec(spec: dict, in_process: bool, log_dir: Path) -> dict:
    """Run one worker spec in a fresh Python process (or this one); returns its result dict."""
    if in_process:
        from workloads import run_worker

        return run_worker(spec)
    result, log = log_dir / f"{spec['name']}.json", log_dir / f"{spec['name']}.log"
    with open(log, "w") as handle:
        code = subprocess.call(_worker_command(spec, result), stdout=handle, stderr=subprocess.STDOUT,
                               env=_worker_env(spec))
    if code != 0 or not result.is_file():
        raise _failed(spec["name"], log, f"failed (exit {code})")
    return json.loads(result.read_text())


def run_interleaved(group: list[dict], log_dir: Path) -> dict[str, dict]:
    """Run training configurations side by side, one fresh process each, taking turns step by step.

    Every process loads its models at once; then the first runs one optimizer step while the others
    wait on a pipe, then the second, and so on, round after round (see `workloads.Baton`). Returns
    {run name: result}.
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
                    stderr=subprocess.STDOUT, env=_worker_env(spec), pass_fds=(go_read, done_write),
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


def _free_gib() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**30


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


# ---------------------------------------------------------------- the run


class Bench:
    """One invocation: groups in turn, the micro-benchmarks, then the report."""

    def __init__(self, args: argparse.Namespace, log_dir: Path):
        self.args, self.log_dir = args, log_dir
        self.started, self.load_before = time.time(), _load()
        self.results: dict[str, dict] = {}
        self.micro: dict[str, dict] = {}
        self.peaks: list[float] = []
        self.notes: list[str] = []
        self.per_config_s: list[float] = []

    def stamp(self, what: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}, {(time.time() - self.started) / 60:.1f} min] {what} ...", flush=True)

    def run_group(self, group: list[dict]) -> None:
        self.stamp(" + ".join(spec["name"] for spec in group))
        begin, free = time.time(), _free_gib()
        # one GPU: one process at a time (its steps are timed on a synchronised device, it owns the GPU)
        gpu = self.args.device == "cuda"
        sequential = (self.args.in_process or gpu or len(group) == 1
                      or free < self.args.gib_per_process * len(group))
        if sequential and len(group) > 1 and not self.args.in_process and not gpu:
            self.notes.append(f"{' + '.join(s['name'] for s in group)} ran one after another, not interleaved: "
                              f"{free:.0f} GiB free, {self.args.gib_per_process:g} GiB per process wanted")
        if sequential:
            done = {spec["name"]: run_spec(spec, self.args.in_process, self.log_dir) for spec in group}
        else:
            done = run_interleaved(group, self.log_dir)
        self.per_config_s += [(time.time() - begin) / len(group)] * len(group)
        for spec in group:
            r = self.results[spec["name"]] = {**done[spec["name"]], "config": spec["config"], "group": spec["group"]}
            cuda = f", peak CUDA {r['peak_cuda_mb']:.0f} MiB" if "peak_cuda_mb" in r else ""
            print(f"    {spec['name']}: {r['median_s']:.2f} s/step (steps {[round(x, 2) for x in r['step_s']]}), "
                  f"other load {r['other_load']:.1f}, peak RSS {r['peak_rss_mb']:.0f} MiB{cuda}, "
                  f"between steps {r['idle_rss_mb']:.0f} MiB", flush=True)

    def matmul_peak(self) -> None:
        self.stamp("matmul peak")
        spec = {"kind": "matmul", "name": "matmul", "sizes": [self.args.matmul_size // 2, self.args.matmul_size],
                "device": self.args.device, "dtype": self.args.dtype}
        self.peaks.append(run_spec(spec, self.args.in_process, self.log_dir)["matmul_flops"])

    def logits_memory(self, chunk_size: int) -> None:
        hidden, vocab = model_shape(self.args.model)
        for spec in micro_specs(self.args, hidden, vocab, chunk_size):
            self.stamp(spec["name"])
            self.micro[spec["name"]] = {**run_spec(spec, self.args.in_process, self.log_dir), **spec}

    def run(self) -> str:
        todo = groups(self.args)
        if not self.args.no_micro:
            self.matmul_peak()
        for group in [g for g in todo if not g[0]["optional"]]:
            self.run_group(group)
        default_chunk = next((r["chunk_size"] for r in self.results.values() if r.get("chunk_size")), 1024)
        if not self.args.no_micro:
            self.logits_memory(default_chunk)
        for group in [g for g in todo if g[0]["optional"]]:
            group = [spec for spec in group if spec.get("chunk_size") != default_chunk]  # else: rows above
            mean = sum(self.per_config_s) / max(len(self.per_config_s), 1)
            projected = time.time() - self.started + mean * len(group)
            if group and projected / 60 > self.args.budget_min:
                labels = " and ".join(spec["label"] for spec in group)
                self.notes.append(f"{labels} skipped: they would end the run after --budget-min "
                                  f"{self.args.budget_min:g} min")
            elif group:
                self.run_group(group)
        if not self.args.no_micro:  # again at the end: the best of two is nearer the machine's real peak
            self.matmul_peak()
        return self.report([[s["config"] for s in g] for g in todo])

    def report(self, ran: list[list[str]]) -> str:
        from report import report

        notes = list(self.notes)
        # (below half a second a step, the kernel's 10 ms CPU accounting makes the figure noise)
        busy = [n for n, r in self.results.items() if r["other_load"] > OTHER_LOAD_WARNING and r["median_s"] > 0.5]
        if busy:
            notes.append(f"other processes kept more than {OTHER_LOAD_WARNING:g} core busy during: {', '.join(busy)};"
                         " their times are inflated (ratios inside a group much less: its steps take turns)")
        for name, r in self.results.items():
            if CONFIGS[r["config"]].get("impl") == "chunked" and not r.get("hidden_path", True):
                notes.append(f"{name} took the full-logits route (supports_hidden_path was false)")
        ran = [g for g in ran if any(c in {r["config"] for r in self.results.values()} for c in g)]
        return report(self.args, self.results, self.micro, max(self.peaks, default=None), ran, self.started,
                      (self.load_before, _load()), notes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:  # inside a fresh subprocess: run one configuration, write its JSON
        from workloads import run_worker

        Path(args.result).write_text(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    with tempfile.TemporaryDirectory(prefix="granular-bench-logs-") as tmp:
        text = Bench(args, Path(tmp)).run()
    print("\n" + text)
    Path(args.out).write_text(text)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""SIGKILL at random moments, restart with the same command, and land where an uninterrupted run lands.

Each test trains a tiny random Llama in a subprocess (`python -u train.py ...`, checkpoints every
step), kills it with SIGKILL several times -- at a random moment during training, and while a
checkpoint is being written (as soon as a `.tmp-step-N` folder appears) -- restarts the very same
command until it exits 0, then compares with one uninterrupted run of the same command:
- every restart after a checkpoint says "resuming from step-N" for the newest complete checkpoint;
- the loss (and grad norm, learning rate) of every step, last record per step, is equal;
- the final `LATEST` weights and optimizer state are bitwise equal (CPU is deterministic).

The default suite runs a short SFT version; `-m slow` runs TDPO with a reference model, warmup,
gradient accumulation, two epochs and more kills.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_llama, tiny_tokenizer

from granular_po.training.checkpoints import complete_checkpoints

REPO = Path(__file__).resolve().parents[1]
WORDS = ["apple", "river", "stone", "cloud", "green", "music", "paper", "light", "sugar", "window", "tiger", "honey"]
COMPARED = ("loss/train", "grad_norm", "learning_rate")
# kill moments differ from run to run (set KILL_SEED to replay one); every failure message shows the seed
SEED = int(os.environ.get("KILL_SEED", time.time_ns() % 1_000_000))


def pairs(n: int) -> list[dict]:
    out = []
    for i in range(n):
        word = WORDS[i % len(WORDS)]
        incorrect = f"About {word}: the answer is no."
        start = incorrect.index("no.")
        out.append({"prompt": f"Is {word} number {i} good?", "correct_response": f"About {word}: the answer is yes.",
                    "incorrect_response": incorrect, "masked_region": [start, start + 2, -1]})
    return out


def make_workspace(root: Path, n_pairs: int) -> Path:
    tokenizer = tiny_tokenizer("byte_level")
    tiny_llama(len(tokenizer), hidden_size=32).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    (root / "train.json").write_text(json.dumps(pairs(n_pairs)))
    return root


def command(root: Path, exp: str, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-u", str(REPO / "train.py"),
        f"model.name_or_path={root / 'tiny'}", "datasets=[ours]", f"custom_train_path={root / 'train.json'}",
        f"exp_name={exp}", f"local_dirs=[{root / 'runs'}]", "prompt_format=raw", "optimizer=AdamW",
        "max_length=48", "max_prompt_length=24", "do_first_eval=false", "lr=1e-3", "minimum_log_interval_secs=0",
        *extra,
    ]


def subprocess_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


def newest_step(run_dir: Path) -> int | None:
    found = complete_checkpoints(run_dir)
    return found[-1][0] if found else None


@dataclass
class KillLog:
    """What happened to each launch: how it ended and what it said about resuming."""

    seed: int = 0  # of the kill moments: rerun with it to replay a failure
    events: list[str] = field(default_factory=list)
    resumed_from: list[str] = field(default_factory=list)
    half_written_seen: list[str] = field(default_factory=list)


def _wait_kill(proc: subprocess.Popen, run_dir: Path, mode: str, after_step: int, delay: float,
               timeout: float) -> str:
    """Once a checkpoint of step >= `after_step` exists, SIGKILL `proc`: in `checkpoint` mode as soon as
    the next `.tmp-step-N` folder appears, otherwise after `delay` seconds. Returns what happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (newest_step(run_dir) or 0) >= after_step:
            break
        time.sleep(0.002)
    if mode == "checkpoint":
        while time.monotonic() < deadline and proc.poll() is None:
            staged = [p.name for p in run_dir.glob(".tmp-step-*")] if run_dir.is_dir() else []
            if staged:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return f"killed while writing {staged[0]}"
            time.sleep(0.001)
    elif proc.poll() is None:
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return f"killed {delay:.2f} s after step-{after_step} (newest complete: step-{newest_step(run_dir)})"
    if proc.poll() is None:
        proc.kill()
        proc.wait()
        raise AssertionError(f"run did not reach the kill point within {timeout:.0f} s")
    return "exited"


def run_with_kills(cmd: list[str], run_dir: Path, kills: list[str], n_steps: int, seed: int,
                   timeout: float = 240) -> KillLog:
    """Launch `cmd`, SIGKILL it once per entry of `kills` (at a random step), relaunch until it exits 0."""
    rng = random.Random(seed)
    log = KillLog(seed=seed)
    launches = 0
    pending = list(kills)
    # steps after which the kills come, spread over the run (a kill never lands before progress)
    targets = sorted(rng.choices(range(0, max(1, n_steps - 2)), k=len(kills)))
    while True:
        launches += 1
        assert launches <= len(kills) + 3, f"too many launches: {log}"
        start_step = newest_step(run_dir)
        out_path = run_dir.parent / f"{run_dir.name}.launch{launches}.log"
        with open(out_path, "w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT)
            if pending:
                first = (start_step or 0) + (pending[0] != "checkpoint")  # a random kill after progress
                after = max(first, targets[len(kills) - len(pending)])
                outcome = _wait_kill(proc, run_dir, pending[0], after, rng.uniform(0.0, 0.4), timeout)
                if outcome != "exited":
                    pending.pop(0)
            else:
                proc.wait(timeout=timeout)
                outcome = "exited"
        text = out_path.read_text(errors="replace")
        if start_step is not None:
            expected = f"resuming from step-{start_step}"
            assert expected in text, f"launch {launches} did not say {expected!r} ({log}):\n{text[-3000:]}"
            log.resumed_from.append(f"step-{start_step}")
        if outcome.startswith("killed while writing"):
            log.half_written_seen += [p.name for p in run_dir.glob(".tmp-step-*")]
        log.events.append(outcome)
        if outcome == "exited":
            assert proc.returncode == 0, f"launch {launches} failed ({proc.returncode}):\n{text[-3000:]}"
            assert not pending, f"the run finished before kills {pending} landed: {log}"
            return log


def last_record_per_step(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl is appended to across launches: the last training record of each step wins."""
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss/train" in record:
            records[record["step"]] = record
    return records


def train_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss/train" in json.loads(line)]


def assert_same_run(killed: Path, clean: Path, n_steps: int) -> None:
    a, b = last_record_per_step(killed), last_record_per_step(clean)
    assert sorted(b) == list(range(1, n_steps + 1))
    assert sorted(a) == sorted(b)
    for step in b:
        for key in COMPARED:
            assert a[step][key] == b[step][key], f"step {step} {key}: {a[step][key]} vs {b[step][key]}"
    assert (killed / "LATEST").resolve().name == (clean / "LATEST").resolve().name == f"step-{n_steps}"
    wa, wb = load_file(killed / "LATEST" / "model.safetensors"), load_file(clean / "LATEST" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wb:
        assert torch.equal(wa[name], wb[name]), name
    oa = torch.load(killed / "LATEST" / "optimizer.pt", weights_only=True)
    ob = torch.load(clean / "LATEST" / "optimizer.pt", weights_only=True)
    for pid, state in ob["state"].items():
        for key, value in state.items():
            assert torch.equal(oa["state"][pid][key], value), (pid, key)
    assert not list(killed.glob(".tmp-step-*")), "a half-written checkpoint was left behind"


def _kill_resume_case(root: Path, extra: list[str], kills: list[str], n_steps: int, seed: int) -> KillLog:
    clean_cmd = command(root, "clean", extra)
    killed_cmd = command(root, "killed", extra)
    clean = subprocess.run(clean_cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stdout[-2000:] + clean.stderr[-3000:]
    log = run_with_kills(killed_cmd, root / "runs" / "killed", kills, n_steps, seed)
    assert "killed while writing" in " ".join(log.events), log
    assert log.half_written_seen, f"no kill landed inside a checkpoint write: {log}"
    assert_same_run(root / "runs" / "killed", root / "runs" / "clean", n_steps)
    # metrics.jsonl is cut back to the checkpoint on resume: each step logged exactly once, in order
    assert train_steps(root / "runs" / "killed") == list(range(1, n_steps + 1)), log
    return log


def test_sigkill_resume_matches_uninterrupted_run(tmp_path):
    """8 SFT steps with warmup, a checkpoint every step; killed mid-checkpoint, then at random."""
    root = make_workspace(tmp_path, n_pairs=16)
    extra = ["loss=sft", "batch_size=2", "save_every=2", "n_epochs=1", "warmup_steps=3"]
    log = _kill_resume_case(root, extra, ["checkpoint", "random"], n_steps=8, seed=SEED)
    print(log)


@pytest.mark.slow
def test_sigkill_resume_tdpo_accumulation_two_epochs(tmp_path):
    """TDPO2 with a reference model, accumulation 2, warmup 4, two epochs (epoch boundary crossed
    while resuming), five kills of both kinds."""
    root = make_workspace(tmp_path, n_pairs=32)
    extra = ["loss=tdpo", "loss.beta=0.5", "loss.alpha=0.5", "loss.if_tdpo2=true", "granular=true",
             "batch_size=4", "gradient_accumulation_steps=2", "save_every=4", "n_epochs=2", "warmup_steps=4"]
    kills = ["checkpoint", "random", "checkpoint", "random", "random"]
    log = _kill_resume_case(root, extra, kills, n_steps=16, seed=SEED)
    print(log)


# ---------------------------------------------------------------- in-process faults around checkpoints


def in_process_args(root: Path, exp: str, extra: list[str]) -> list[str]:
    return command(root, exp, extra)[3:]  # without `python -u train.py`


def test_truncate_metrics_drops_rerun_steps_and_a_torn_line(tmp_path):
    from granular_po.training.checkpoints import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss/train": float(s)}) for s in (0, 1, 2, 3, 4)]
    path.write_text("\n".join(lines) + '\n{"step": 5, "loss/tr')  # killed mid-append
    assert truncate_metrics(path, 2) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2]
    assert truncate_metrics(path, 2) == 0
    assert truncate_metrics(path, 0) == 3 and path.read_text() == ""  # from scratch: nothing kept
    assert truncate_metrics(tmp_path / "absent.jsonl", 3) == 0


def test_disk_full_during_a_checkpoint_leaves_the_previous_one_and_resumes(tmp_path, monkeypatch, capsys):
    """ENOSPC while writing step-2's optimizer state: the run stops, step-1 and LATEST stay intact, the
    half-written `.tmp-step-2` is removed by the next launch, which resumes from step-1 and finishes."""
    import errno

    from granular_po.apps.cli import train_main
    from granular_po.training.trainer import GranularTrainer

    root = make_workspace(tmp_path, n_pairs=8)
    args = in_process_args(root, "full", ["loss=sft", "batch_size=2", "save_every=2", "warmup_steps=0"])
    original = GranularTrainer._save_optimizer_and_scheduler

    def disk_full(self, output_dir):
        if self.state.global_step == 2:
            raise OSError(errno.ENOSPC, "No space left on device", output_dir)
        return original(self, output_dir)

    monkeypatch.setattr(GranularTrainer, "_save_optimizer_and_scheduler", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train_main(args)
    run_dir = root / "runs" / "full"
    assert (run_dir / "LATEST").resolve().name == "step-1"
    assert (run_dir / ".tmp-step-2").is_dir() and not (run_dir / "step-2").exists()
    assert not (run_dir / ".tmp-step-2" / "COMPLETE").exists()

    monkeypatch.setattr(GranularTrainer, "_save_optimizer_and_scheduler", original)
    capsys.readouterr()
    assert train_main(args) == 0
    out = capsys.readouterr().out
    assert "removed half-written checkpoint .tmp-step-2" in out and "resuming from step-1" in out
    assert (run_dir / "LATEST").resolve().name == "step-4"
    assert train_steps(run_dir) == [1, 2, 3, 4]


def test_stale_latest_is_repointed_on_resume(tmp_path, capsys):
    """A kill between renaming `.tmp-step-N` to `step-N` and swapping LATEST leaves LATEST one behind;
    the next launch (here after the last step: nothing left to train) points it at step-N."""
    from granular_po.apps.cli import train_main
    from granular_po.training.checkpoints import point_latest

    root = make_workspace(tmp_path, n_pairs=4)
    args = in_process_args(root, "stale", ["loss=sft", "batch_size=2", "save_every=2", "warmup_steps=0"])
    assert train_main(args) == 0
    run_dir = root / "runs" / "stale"
    point_latest(run_dir, "step-1")  # the state such a kill leaves
    assert train_main(args) == 0
    assert "resuming from step-2" in capsys.readouterr().out
    assert (run_dir / "LATEST").resolve().name == "step-2"
    assert train_steps(run_dir) == [1, 2]

"""Training and evaluation stages run as subprocesses of the train entry point, shared by `demo` and
`compare`: the command a user would type, resumable runs that refuse other settings, cached accuracies.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from granular_po.training import checkpoints

# ---------------------------------------------------------------- running the train entry point


def hydra_value(value: object) -> str:
    """A value as a Hydra override accepts it: quoted when it holds characters the grammar reads."""
    text = str(value)
    if re.fullmatch(r"[\w./+:-]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def train_command(overrides: list[str]) -> list[str]:
    """The train entry point as a subprocess command (same overrides as `python -u train.py`)."""
    return [sys.executable, "-u", "-m", "granular_po.apps.cli", "train", *overrides]


def shown_command(overrides: list[str]) -> str:
    """The command as a user would type it (train.py at the repository root is the same entry point)."""
    import shlex

    return "python -u -m granular_po.apps.cli train " + " ".join(shlex.quote(o) for o in overrides)


def finished(run_dir: Path, steps: int) -> bool:
    """The run has a complete checkpoint at `steps` or later.

    Checked here rather than left to the train command: re-running that command on a run already at its
    final step resumes from it and trains one step more (transformers 5.24, measured).
    """
    found = checkpoints.complete_checkpoints(run_dir)
    return bool(found) and found[-1][0] >= steps


def check_stamp(run_dir: Path, stamp: dict, what: str) -> None:
    """Refuse to resume a run made with other settings; record the settings of a new one."""
    path = run_dir / "granular_po_demo_stamp.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != stamp:
            was = [o for o in old.get("overrides", []) if o not in stamp["overrides"]]
            now = [o for o in stamp["overrides"] if o not in old.get("overrides", [])]
            changed = f"overrides were {was}, now {now}" if was or now else "its data or starting model changed"
            raise SystemExit(f"{what}: {run_dir} was made with other settings ({changed}); delete it to train "
                             "it again (--fresh does that for this command's own runs), or choose another --out")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamp, indent=1))


def passive_openmp() -> None:
    """OpenMP threads that sleep rather than spin while waiting (unless the user set OMP_WAIT_POLICY).

    Measured here on 2 busy cores: an SFT step 5 s instead of 15 s, greedy evaluation of 40 questions 26 s
    instead of minutes. Must run before torch is imported (the training subprocesses inherit it).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run_stage(command: list[str], what: str) -> float:
    """Run a train command (its progress bars go to this terminal); returns seconds; raises on failure."""
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{what} failed (exit {result.returncode}): {' '.join(command)}")
    return time.monotonic() - start


def data_fingerprint(*paths: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def train_stage(name: str, overrides: list[str], run_dir: Path, steps: int, fingerprint: str) -> dict:
    """Run (or reuse) one training run; returns what the report says about it.

    `fingerprint` identifies the data and starting weights: a finished run made from others is refused.
    """
    check_stamp(run_dir, {"overrides": overrides, "data": fingerprint}, name)
    info = {"name": name, "run_dir": run_dir, "overrides": overrides, "command": shown_command(overrides),
            "steps": steps}
    seconds_file = run_dir / "granular_po_demo_seconds.json"
    if finished(run_dir, steps):
        print(f"{name}: reusing {run_dir} (finished at step {steps})", flush=True)
        earlier = json.loads(seconds_file.read_text())["seconds"] if seconds_file.is_file() else None
        return {**info, "seconds": 0.0, "seconds_when_run": earlier, "reused": True}
    print(f"{name}: {shown_command(overrides)}", flush=True)
    seconds = run_stage(train_command(overrides), name)
    if not finished(run_dir, steps):
        raise SystemExit(f"{name}: the run ended without a checkpoint at step {steps} in {run_dir}")
    seconds_file.write_text(json.dumps({"seconds": seconds}))
    return {**info, "seconds": seconds, "seconds_when_run": seconds, "reused": False}


def checkpoint_key(model_dir: Path) -> str:
    """Identifies a model directory's weights: resolved path and the weights' size and mtime."""
    resolved = Path(model_dir).resolve()
    weights = sorted(resolved.glob("*.safetensors"))
    parts = [str(resolved)] + [f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights]
    return "|".join(parts)


def evaluate_model(model_dir: Path, questions: list[tuple[str, int]], cache: Path, max_new_tokens: int,
                   label: str, tokenizer_dir: Path | None = None, batch_size: int = 16) -> dict:
    """Task accuracy of one model directory by greedy generation, cached in `cache` (a JSON file).

    `batch_size` questions are generated together (larger batches: fewer decoding steps on a CPU)."""
    key = {"model": checkpoint_key(model_dir), "questions": questions, "max_new_tokens": max_new_tokens}
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("key") == json.loads(json.dumps(key)):
            print(f"task accuracy of {label}: {stored['accuracy']:.3f} (cached in {cache})", flush=True)
            return stored
    from granular_po.apps.eval import task_accuracy
    from granular_po.models import load_model, load_tokenizer

    print(f"task accuracy of {label} ({model_dir}) on {len(questions)} questions", flush=True)
    start = time.monotonic()
    tokenizer = load_tokenizer(str(tokenizer_dir or model_dir))
    model = load_model(str(model_dir))
    accuracy, rows = task_accuracy(model, tokenizer, questions, max_new_tokens=max_new_tokens, batch_size=batch_size)
    del model
    result = {"key": key, "label": label, "model": str(model_dir), "accuracy": accuracy,
              "n": len(rows), "correct": sum(r["correct"] for r in rows), "rows": rows,
              "seconds": time.monotonic() - start}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=1))
    print(f"task accuracy of {label}: {accuracy:.3f}", flush=True)
    return result

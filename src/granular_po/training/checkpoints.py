"""Crash-safe checkpoint directories: written beside their final name, renamed into place when complete.

A checkpoint `step-N/` exists only once every file is written and flushed (a `COMPLETE` marker is the
last file written, the rename the last act), and `LATEST` is a symlink swapped atomically. A process
killed at any moment leaves at worst a `.tmp-step-N` folder, which resume ignores and removes.
Transformers' own `checkpoint-N` folders are not atomic (a kill mid-save leaves one that breaks every
later resume), hence this module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

COMPLETE_MARKER = "COMPLETE"
LATEST = "LATEST"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step}"


def staging_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f".tmp-{step_dir_name(step)}"


def fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(path)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_staged(run_dir: Path, step: int) -> Path:
    """Mark the staged checkpoint complete, rename it into place and point LATEST at it."""
    staged = staging_dir(run_dir, step)
    (staged / COMPLETE_MARKER).write_text(f"{step}\n")
    fsync_tree(staged)
    final = run_dir / step_dir_name(step)
    if final.exists():  # a re-run reaching the same step: move the old one away first, atomically
        trash = run_dir / f".old-{step_dir_name(step)}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(staged, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staged, final)
    point_latest(run_dir, final.name)
    fsync_dir(run_dir)
    return final


def point_latest(run_dir: Path, target_name: str) -> None:
    """Swap the LATEST symlink to `target_name` atomically (a new link renamed over the old one)."""
    tmp_link = run_dir / f".{LATEST}.tmp"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(target_name, tmp_link)
    os.replace(tmp_link, run_dir / LATEST)


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file() and (path / "trainer_state.json").is_file()


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete `step-N` checkpoints of a run directory, oldest first."""
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_complete_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_stale_staging(run_dir: Path) -> list[str]:
    """Delete half-written checkpoints left by a killed run; returns their names."""
    removed = []
    if run_dir.is_dir():
        for child in run_dir.iterdir():
            if child.name.startswith((".tmp-step-", ".old-step-")):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child.name)
    return removed


# what a run writes into its directory (anything else there is left alone when it starts over)
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "samples.jsonl", "merged", LATEST)


def clear_run(run_dir: Path) -> list[str]:
    """Remove a run's outputs (checkpoints, LATEST, metrics, samples, merged model) to start it over;
    returns the names removed."""
    removed = []
    if not run_dir.is_dir():
        return removed
    for child in sorted(run_dir.iterdir()):
        ours = child.name in RUN_OUTPUTS or _STEP_DIR.match(child.name) or child.name.startswith(
            (".tmp-step-", ".old-step-", ".tmp-merged"))
        if not ours:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
        removed.append(child.name)
    return removed


def latest_target(run_dir: Path) -> str | None:
    """The name of the checkpoint `LATEST` points to (None without a LATEST link)."""
    link = run_dir / LATEST
    return os.readlink(link) if link.is_symlink() else None


def rotate(run_dir: Path, keep: int | None) -> list[str]:
    """Keep the checkpoint LATEST points to and the newest `keep` complete others (None: keep all);
    returns the names removed. Only complete `step-N` folders are candidates: a checkpoint being written
    (`.tmp-step-N`, or a `step-N` without its COMPLETE marker) is never touched. Each is renamed to
    `.old-step-N` before it is deleted, so a kill mid-delete leaves no half-deleted `step-N` that looks
    complete (resume removes `.old-*` folders)."""
    if keep is None:
        return []
    protected = latest_target(run_dir)
    others = [path for _step, path in complete_checkpoints(run_dir) if path.name != protected]
    removed = []
    for path in others[:max(0, len(others) - keep)]:
        trash = run_dir / f".old-{path.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(path.name)
    return removed


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the records a resumed run will log again (step > `step`; all of them for `step` 0), and a
    line torn by a kill. Rewritten beside the file and renamed over it; returns how many were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            record_step = None
        if record_step is not None and step > 0 and record_step <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped

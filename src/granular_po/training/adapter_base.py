"""`<run>/base/`: the model a LoRA run's adapters name when `model.archive` was applied in memory.

A research-code policy.pt (or a .safetensors, or a stage-1 LoRA adapter directory merged on load) gives
policy weights that no model directory holds. An adapter trained on them used to name
`model.name_or_path` as its base, so eval, chat, a stage 2's `model.archive` and peft's own
`AutoPeftModelForCausalLM` all loaded it on a different model, without an error. Such a run now writes its
starting weights once, as a plain Hugging Face directory (safetensors, config, tokenizer), and its adapters
name it: an adapter loads anywhere on exactly the model it was trained on, as long as `base/` exists.

Written as checkpoints are (`checkpoints.py`): into `.tmp-base` beside it, a COMPLETE marker last, fsynced,
renamed into place, so `base/` exists only complete. `BASE.json` records the sha256 of its weights: a
restart that resumes a checkpoint refuses when the archive now gives other weights (the checkpoints'
adapters were trained on the stored ones); a fresh start (resume=false, or no checkpoint yet) replaces a
base that differs, and reuses one that matches. Hashing costs about 3 s per GiB of weights on one CPU
core, so a restart whose archive file has the size and modification time recorded at the write skips it.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from granular_po.models import ModelLoadError, archive_applied_in_memory
from granular_po.settings import TrainConfig
from granular_po.training import checkpoints
from granular_po.training.config import existing_ancestor
from granular_po.training.reference_cache import weights_fingerprint
from granular_po.training.resources import ResourceError, format_bytes

BASE_DIR = "base"
INFO_FILE = "BASE.json"


def base_writer(cfg: TrainConfig, run_dir: Path, tokenizer: Any, is_main: bool) -> Callable[[nn.Module], Path] | None:
    """What `load_policy_and_reference(lora_base=...)` calls for this run (None: no LoRA, or a base on disk).
    Only the main process writes (the others need the path alone); a debug run writes nothing."""
    if not cfg.lora.enabled or not archive_applied_in_memory(cfg.model.archive):
        return None
    resuming = (not cfg.debug and str(cfg.resume).lower() != "false"
                and checkpoints.latest_complete_checkpoint(run_dir) is not None)
    return functools.partial(write_base, run_dir, tokenizer=tokenizer, source=str(cfg.model.archive),
                             resuming=resuming, write=is_main and not cfg.debug)


def stored_info(path: Path) -> dict:
    """What a complete base directory records (`sha256`, `archive_stamp`); {} when `path` is no complete base."""
    if not (path / checkpoints.COMPLETE_MARKER).is_file():
        return {}
    try:
        info = json.loads((path / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) and isinstance(info.get("sha256"), str) else {}


def stored_fingerprint(path: Path) -> str | None:
    """The sha256 a complete base directory records; None when `path` is no complete base."""
    return stored_info(path).get("sha256")


def archive_stamp(source: str) -> list[int] | None:
    """[size, mtime_ns] of an archive file; None for a directory (or anything unreadable): always hashed."""
    try:
        stat = os.stat(os.path.expanduser(source))
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns] if os.path.isfile(os.path.expanduser(source)) else None


def write_base(run_dir: Path, model: nn.Module, tokenizer: Any = None, *, source: str, resuming: bool,
               write: bool = True) -> Path:
    """`run_dir/base/` holding `model` (the policy before LoRA wraps it): written unless an identical one is
    there; returns its path. `resuming`: a checkpoint will be resumed, so a base that differs is refused."""
    final, staged, old = run_dir / BASE_DIR, run_dir / f".tmp-{BASE_DIR}", run_dir / f".old-{BASE_DIR}"
    if not write:
        return final
    shutil.rmtree(staged, ignore_errors=True)  # a write killed half-way
    if not final.exists() and stored_fingerprint(old):  # killed between the two renames of a replacement
        os.replace(old, final)
    shutil.rmtree(old, ignore_errors=True)
    stamp, info = archive_stamp(source), stored_info(final)
    if stamp is not None and info.get("archive_stamp") == stamp:  # the very file the base was written from
        return final
    fingerprint = weights_fingerprint(model)
    stored = info.get("sha256")
    if stored == fingerprint:
        if stamp is not None:  # the same weights from a touched or copied file: stamp it, hash no more
            tmp = final / f".{INFO_FILE}.tmp"
            tmp.write_text(json.dumps({**info, "archive_stamp": stamp}, indent=1) + "\n", encoding="utf-8")
            os.replace(tmp, final / INFO_FILE)
        return final
    if stored is not None and resuming:
        raise ModelLoadError(
            f"model.archive={source} now gives other weights than {final} (sha256 {fingerprint[:12]} against "
            f"{stored[:12]}), the base this run's adapters were trained on and its checkpoints name. Restore "
            "that archive, or start the run over with resume=false")
    _check_space(run_dir, model)
    model.save_pretrained(staged)  # safetensors; tied weights once
    if tokenizer is not None:
        tokenizer.save_pretrained(staged)
    info = {"sha256": fingerprint, "model.archive": source, "archive_stamp": stamp,
            "what": "the policy's starting weights (model.archive applied); this run's LoRA adapters name it"}
    (staged / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    (staged / checkpoints.COMPLETE_MARKER).write_text(f"{BASE_DIR}\n")
    checkpoints.fsync_tree(staged)
    if final.exists():  # a different base of an earlier start that resumed nothing: swapped out
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)
    checkpoints.fsync_dir(run_dir)
    return final


def _check_space(run_dir: Path, model: nn.Module) -> None:
    needed = sum(t.numel() * t.element_size() for t in {id(p): p for p in model.parameters()}.values())
    where = existing_ancestor(run_dir)
    free = shutil.disk_usage(where).free
    if needed > free:
        raise ResourceError(
            f"not enough disk space for {run_dir / BASE_DIR} (LoRA on model.archive: the adapters' base, "
            f"written once): it needs about {format_bytes(needed)}, {format_bytes(free)} free on the disk of "
            f"{where}. Free space there or point local_dirs elsewhere.")
    run_dir.mkdir(parents=True, exist_ok=True)

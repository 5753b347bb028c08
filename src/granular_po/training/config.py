"""Hydra configuration: research-code overrides in, a checked config and derived run settings out.

The config tree lives in `granular_po/config/` (the repository's `config/` links to it), so the same
overrides work for `python -u train.py ...`, `granular-po train ...` and Hydra multirun.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from granular_po.losses import LossType

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"

# `granular=true` (a bool in the research code) selects our `granular` node's `enabled` key, so that
# `granular.outside_weight=...` can sit beside it.
_GRANULAR_SWITCH = re.compile(r"^(\+{0,2})granular=(.*)$")

# Keys that only matter for some engines: accepted anywhere, with a one-line notice where unused.
_ENGINE_ONLY_KEYS = {
    "model.fsdp_policy_mp": "FSDPTrainer",
    "fsdp_port": "FSDPTrainer",
}

TRAINERS = ("BasicTrainer", "FSDPTrainer", "TensorParallelTrainer")
SECRET_PATTERN = re.compile(r"(token|secret|password|api[_-]?key)", re.IGNORECASE)


def normalize_overrides(overrides: list[str]) -> list[str]:
    """Rewrite research-code overrides to this config's spelling (`granular=x` -> `granular.enabled=x`)."""
    out = []
    for item in overrides:
        match = _GRANULAR_SWITCH.match(item)
        out.append(f"granular.enabled={match.group(2)}" if match else item)
    return out


def compose_config(overrides: list[str]) -> DictConfig:
    """Build the config from overrides without running Hydra's app machinery (for `granular-po train`)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="config", overrides=normalize_overrides(overrides))


@dataclass(frozen=True)
class RunSettings:
    """Numbers derived from the config once, checked, so the trainer never re-derives them."""

    loss: LossType
    world_size: int
    per_device_batch_size: int
    eval_steps: int
    save_steps: int | None
    max_steps: int  # -1: run n_epochs
    run_dir: Path


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _first_usable_dir(local_dirs) -> Path:
    for candidate in local_dirs:
        path = Path(os.path.expanduser(str(candidate)))
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(path, os.W_OK):
            return path
    raise ValueError(f"none of local_dirs={list(local_dirs)} exists or can be created")


def validate(cfg: DictConfig, n_train_examples: int | None = None) -> RunSettings:
    """Check the config and derive run settings; errors name the key, notices take one line."""
    try:
        loss = LossType(cfg.loss.name)
    except ValueError:
        raise ValueError(f"loss.name={cfg.loss.name!r}: expected one of {[t.value for t in LossType]}") from None
    if cfg.trainer not in TRAINERS:
        raise ValueError(f"trainer={cfg.trainer!r}: expected one of {TRAINERS}")
    if loss.is_preference and cfg.loss.get("beta") is None:
        raise ValueError(f"loss.beta must be set for loss={loss.value}")
    if loss.is_preference and not float(cfg.loss.beta) > 0:
        raise ValueError(f"loss.beta={cfg.loss.beta}: must be > 0 (it divides the implicit reward's scale)")
    if int(cfg.logprobs.chunk_size) < 1:
        raise ValueError(f"logprobs.chunk_size={cfg.logprobs.chunk_size}: must be >= 1")
    if cfg.on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid={cfg.on_invalid!r}: expected 'error' or 'skip'")
    if cfg.prompt_format not in ("auto", "raw", "chat"):
        raise ValueError(f"prompt_format={cfg.prompt_format!r}: expected auto, raw or chat")
    if cfg.logprobs.impl not in ("chunked", "naive"):
        raise ValueError(f"logprobs.impl={cfg.logprobs.impl!r}: expected chunked or naive")
    if cfg.truncation_mode not in ("keep_end", "keep_start"):
        raise ValueError(f"truncation_mode={cfg.truncation_mode!r}: expected keep_end or keep_start")
    if str(cfg.resume) not in ("auto", "True", "False", "true", "false"):
        raise ValueError(f"resume={cfg.resume!r}: expected auto, true or false")
    for key, engine in _ENGINE_ONLY_KEYS.items():
        if OmegaConf.select(cfg, key) is not None and cfg.trainer != engine:
            logger.warning("notice: %s=%s applies to trainer=%s only; ignored here", key, OmegaConf.select(cfg, key), engine)
    if cfg.precompute_ref_log_probs and loss is not LossType.DPO:
        logger.warning("notice: precompute_ref_log_probs applies to loss=dpo only (TDPO needs the live reference)")

    procs = world_size()
    per_step = cfg.gradient_accumulation_steps * procs
    if cfg.batch_size % per_step:
        raise ValueError(
            f"batch_size={cfg.batch_size} must be divisible by gradient_accumulation_steps x processes "
            f"= {cfg.gradient_accumulation_steps} x {procs}"
        )
    eval_steps = max(1, cfg.eval_every // cfg.batch_size)
    save_steps = None
    if not cfg.debug:
        save_steps = max(1, (cfg.save_every or cfg.eval_every) // cfg.batch_size)
    max_steps = -1
    if cfg.n_examples is not None:
        max_steps = max(1, -(-cfg.n_examples // cfg.batch_size))
    run_dir = _first_usable_dir(cfg.local_dirs) / cfg.exp_name
    return RunSettings(
        loss=loss,
        world_size=procs,
        per_device_batch_size=cfg.batch_size // per_step,
        eval_steps=eval_steps,
        save_steps=save_steps,
        max_steps=max_steps,
        run_dir=run_dir,
    )


def set_struct_defaults(cfg: DictConfig) -> None:
    """Fill keys that older configs (e.g. research-code config.yaml files) lack."""
    with open_dict(cfg):
        cfg.setdefault("cache_dir", None)


def redacted_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML, with any value whose key looks secret replaced (never written)."""
    data = OmegaConf.to_container(cfg, resolve=True)

    def scrub(node):
        if isinstance(node, dict):
            return {k: ("<redacted>" if SECRET_PATTERN.search(str(k)) and v else scrub(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node

    return OmegaConf.to_yaml(OmegaConf.create(scrub(data)))

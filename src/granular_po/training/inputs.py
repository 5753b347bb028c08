"""What a run reads, checked before anything is loaded: the model and tokenizer, the archive, the data.

`validate` (training/config.py) checks the values of the settings; `check_inputs` checks the world
they point at, in the first second too (no torch): a model that is neither an existing directory,
the embedded default, nor a hub id in a valid form; a missing archive or data file.
"""

from __future__ import annotations

import os

from granular_po.settings import DEFAULT_MODEL_NAME, TrainConfig
from granular_po.training.config import ConfigError, choose


def _check_model_path(key: str, value: str | None) -> None:
    """A model (or tokenizer) is an existing directory, the embedded default, or a hub id in a valid form."""
    if value is None or os.path.isdir(os.path.expanduser(value)):
        return
    if value == DEFAULT_MODEL_NAME:
        return
    looks_local = value.startswith(("/", "./", "../", "~")) or os.sep in value.strip("/").replace("/", "", 1)
    if looks_local or os.path.exists(value):
        what = "is a file, not a model directory" if os.path.isfile(value) else "no such directory"
        raise ConfigError(f"{key}={value}: {what} (a local Hugging Face model directory, a hub id like "
                          f"org/name, or {DEFAULT_MODEL_NAME})")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as error:
        raise ConfigError(f"{key}={value}: neither an existing directory nor a hub id "
                          f"({str(error).splitlines()[0]})") from None


def check_inputs(config: TrainConfig) -> None:
    """What the run reads, checked before anything is loaded: the model and tokenizer (an existing
    directory, the embedded default, or a hub id in a valid form), the archive, the data files.
    (`validate` checks the values; this, the world they point at.)"""
    _check_model_path("model.name_or_path", config.model.name_or_path)
    _check_model_path("model.tokenizer_name_or_path", config.model.tokenizer_name_or_path)
    archive = config.model.archive
    if archive and not os.path.exists(os.path.expanduser(archive)):
        raise ConfigError(f"model.archive={archive}: no such file or directory (a stage-1 run's LATEST, a model "
                          "directory, or a research-code policy.pt)")
    _check_data(config)


def _check_data(config: TrainConfig) -> None:
    """Dataset names known, and the data of datasets=[ours] present (or a hub id)."""
    from granular_po.data.hub import HUB_DATASETS

    for name in config.datasets:
        if name != "ours" and name not in HUB_DATASETS and name not in HUB_DATASETS.values():
            choose("datasets", name, ("ours", *HUB_DATASETS))
    if "ours" in config.datasets and not config.custom_train_path:
        raise ConfigError("datasets=[ours] needs custom_train_path=<a data file, save_to_disk directory or hub "
                          "id org/name:split>")
    from granular_po.data.formats import locate
    from granular_po.data.schema import DataError

    for key in ("custom_train_path", "custom_eval_path"):
        path = getattr(config, key)
        if "ours" in config.datasets and path:
            try:
                locate(path)  # the format from the path alone: no record read, no network
            except DataError as e:
                raise ConfigError(f"{key}={path}: {e.reason}") from None

"""The final model's card, and `push_to_hub`: what a run leaves for others to read and load.

At the end of every run that saves, `README.md` (a Hugging Face model card) is written into the final
model folder (`LATEST`'s checkpoint, or `merged/` with `lora.merge_on_save`): the base model, the data
(each source, records kept, regions), the loss and every one of its keys, the weighting keys, the
schedule and the final metrics. With `push_to_hub=true` that folder, less the training state
(optimizer, scheduler, RNG, counters), is uploaded to `hub_model_id` (default: `exp_name`); nothing
here touches the network otherwise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from granular_po.data.schema import LoadReport
from granular_po.losses import LossType
from granular_po.settings import TrainConfig

# a checkpoint's training state: resume needs it, a published model does not (the optimizer is the bulk)
TRAINING_STATE = ["optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "trainer_state.json",
                  "training_args.json", "granular_state.json", "COMPLETE"]
CARD_NAME = "README.md"


class PushError(ValueError):
    """The upload failed; the model and its card are intact on disk (the message says where)."""


def loss_title(cfg: TrainConfig, loss: LossType) -> str:
    if loss is LossType.TDPO:
        return "TDPO2" if getattr(cfg.loss, "if_tdpo2", False) else "TDPO1"
    return loss.value.upper()


def _keys(prefix: str, node) -> list[str]:
    return [f"{prefix}.{f.name}={getattr(node, f.name)}" for f in fields(node) if f.name != "name"]


def _is_hub_id(name: str) -> bool:
    return not os.path.exists(os.path.expanduser(name)) and name.count("/") == 1 and not name.startswith((".", "/", "~"))


def _hub_sources(reports: Sequence[LoadReport]) -> list[str]:
    from granular_po.data.hub import HUB_DATASETS

    return [r.source for r in reports if r.source in HUB_DATASETS.values()]


def _data_lines(reports: Sequence[LoadReport]) -> list[str]:
    hub = _hub_sources(reports)
    lines = []
    for report in reports:
        source = report.source
        name = f"`{source}` (hub dataset)" if source in hub else f"`{os.path.basename(source) or source}`"
        lines.append(f"- {name}: {report.n_kept} records kept of {report.n_read} read, {report.n_regions} regions"
                     + (f", {report.n_skipped} skipped" if report.n_skipped else ""))
    return lines or ["- (not recorded)"]


def model_card(cfg: TrainConfig, loss: LossType, train_reports: Sequence[LoadReport], step: int,
               metrics: dict | None = None, repo_id: str | None = None) -> str:
    """The model card (markdown with the Hub's YAML header) of a finished run."""
    from granular_po.training.config import redacted_yaml

    base = str(cfg.model.name_or_path)
    title = loss_title(cfg, loss)
    weighting = "granular" if cfg.granular.enabled else "response-level"
    header = ["---", "library_name: transformers", f"tags: [granular-po, {title.lower()}, {weighting}]"]
    if _is_hub_id(base):
        header.append(f"base_model: {base}")
    if hub := _hub_sources(train_reports):
        header.append(f"datasets: [{', '.join(hub)}]")
    header.append("---")
    start = f"`{base}`" + (f", weights from `model.archive={cfg.model.archive}`" if cfg.model.archive else "")
    lora = f" with LoRA (r={cfg.lora.r}, alpha={cfg.lora.alpha})" if cfg.lora.enabled else ""
    loss_keys = [f"loss={loss.value}", *_keys("loss", cfg.loss)]
    granular = [f"granular={str(cfg.granular.enabled).lower()}", *_keys("granular", cfg.granular)[1:]]
    length = f"n_examples={cfg.n_examples}" if cfg.n_examples is not None else f"n_epochs={cfg.n_epochs}"
    lines = [*header, "", f"# {repo_id or cfg.exp_name}", "",
             f"{title} ({weighting}) of {start}{lora}, trained with granular-po (token-weighted preference "
             f"optimisation on transformers' Trainer) for {step} optimizer steps.", "",
             "## Data", "", *_data_lines(train_reports),
             f"- eval: `{cfg.custom_eval_path}`" if cfg.custom_eval_path else "- eval: none", "",
             "## Loss", "", f"{title}: " + ", ".join(f"`{k}`" for k in loss_keys), "",
             "Token weights: " + ", ".join(f"`{k}`" for k in granular), "",
             "## Training", "",
             f"`optimizer={cfg.optimizer}`, `lr={cfg.lr:g}`, `warmup_steps={cfg.warmup_steps}`, `batch_size="
             f"{cfg.batch_size}`, `{length}`, `seed={cfg.seed}`, `max_length={cfg.max_length}`, `prompt_format="
             f"{cfg.prompt_format}`", ""]
    if metrics:
        lines += ["## Final metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {key} | {value:.6g} |" for key, value in metrics.items() if isinstance(value, (int, float))]
        lines.append("")
    lines += ["## Configuration", "", "The run's `config.yaml` (secrets redacted):", "", "```yaml",
              redacted_yaml(cfg).rstrip(), "```", ""]
    return "\n".join(lines)


def write_card(folder: Path, card: str) -> Path:
    """Write the card as `folder/README.md` (beside the weights: the Hub shows it as the model's page)."""
    path = Path(folder) / CARD_NAME
    tmp = path.with_name(CARD_NAME + ".tmp")
    tmp.write_text(card, encoding="utf-8")
    os.replace(tmp, path)
    return path


def push(folder: Path, repo_id: str) -> str:
    """Upload `folder` (its card included, its training state left out) to the Hub repository `repo_id`,
    creating it if needed; returns the repository's URL. Raises PushError naming the folder on failure."""
    from huggingface_hub import HfApi

    folder = Path(folder).resolve()
    try:
        api = HfApi()
        repo = api.create_repo(repo_id, exist_ok=True)
        target = getattr(repo, "repo_id", None) or repo_id
        api.upload_folder(repo_id=target, folder_path=str(folder), ignore_patterns=TRAINING_STATE,
                          commit_message=f"granular-po: {folder.name}")
    except Exception as err:  # offline, no login, no permission: the run itself is complete
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PushError(f"push_to_hub: could not upload {folder} to {repo_id}: {type(err).__name__}: {first}. The "
                        f"model and its card are there: upload them later with `hf upload {repo_id} {folder}`") from err
    return str(repo)


def adapter_local_base(folder: Path) -> str | None:
    """The local base a LoRA adapter in `folder` names (`adapter_config.json`'s `base_model_name_or_path`), or
    None (no adapter, or its base is a hub id). Such an adapter, pushed, loads on no other machine."""
    config = Path(folder) / "adapter_config.json"
    if not config.is_file():
        return None
    base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path") or ""
    return None if not base or _is_hub_id(base) else base


def write_final_card(cfg: TrainConfig, loss: LossType, run_dir: Path, latest: Path, reports: Sequence[LoadReport],
                     step: int, screen) -> tuple[Path, list[tuple[str, str]]]:
    """Write the final model's card (`model_card`) with the console's last metrics; returns the final model's
    folder (`merged/` with lora.merge_on_save, else `latest`) and the closing block's rows about it."""
    folder = run_dir / "merged" if cfg.lora.enabled and cfg.lora.merge_on_save else latest
    metrics = {**(screen.last_train or {}), **(screen.last_eval or {})}
    metrics = {k: v for k, v in metrics.items() if k not in ("step", "epoch")}
    repo = (cfg.hub_model_id or cfg.exp_name) if cfg.push_to_hub else None
    card = write_card(folder, model_card(cfg, loss, reports, step, metrics, repo))
    rows = [("model card", str(card))]
    if cfg.push_to_hub:
        rows.append(("hub", f"pushing {folder.name} (without its training state) to {repo}"))
        base = adapter_local_base(folder)
        if base:  # not silently unusable: the Hub copy would point at this machine's directory
            rows.append(("hub warning", f"the adapter's base is the local path {base}: others cannot load it from "
                         "the Hub. Push the merged model instead (lora.merge_on_save=true), or publish the base and "
                         "set base_model_name_or_path in the pushed adapter_config.json to its hub id"))
    return folder, rows

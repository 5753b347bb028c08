"""Issue 23.6: Trainer's own habits as keys: report_to, save_total_limit, push_to_hub / hub_model_id, and
a per-token NLL beside SFT's summed loss.

Push is tested with `HfApi`'s two calls replaced (the network boundary) or, unreplaced, offline, where
it must fail after the run is complete and say where the model is; without push_to_hub=true those calls
must never happen.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from tiny import tiny_tokenizer, tiny_workspace, toy_preference_pairs

from granular_po.apps.cli import train_main
from granular_po.data.encode import EncodeOptions, encode_record
from granular_po.data.masks import GranularOptions
from granular_po.data.records import load_records
from granular_po.training import checkpoints, publish
from granular_po.training.config import ConfigError, as_container, changed_keys, compose_config, validate
from granular_po.training.recipe import build_training_arguments

# ---------------------------------------------------------------- save_total_limit: the rotation


def fake_checkpoint(run_dir: Path, step: int, complete: bool = True) -> Path:
    path = run_dir / f"step-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x" * 10)
    if complete:
        (path / "trainer_state.json").write_text("{}")
        (path / checkpoints.COMPLETE_MARKER).write_text(f"{step}\n")
    return path


def names(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.iterdir() if p.name != "LATEST"}


def test_rotation_keeps_latest_target_and_never_touches_a_checkpoint_being_written(tmp_path):
    for step in range(1, 6):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 7, complete=False)  # renamed in place but not marked: never a candidate
    (tmp_path / ".tmp-step-6").mkdir()  # being written
    checkpoints.point_latest(tmp_path, "step-2")  # LATEST one behind the newest (a kill between the two)
    assert checkpoints.rotate(tmp_path, 2) == ["step-1", "step-3"]
    assert names(tmp_path) == {"step-2", "step-4", "step-5", "step-7", ".tmp-step-6"}
    assert (tmp_path / "LATEST").resolve().name == "step-2"
    checkpoints.point_latest(tmp_path, "step-5")
    assert checkpoints.rotate(tmp_path, 0) == ["step-2", "step-4"]  # 0: LATEST's only
    assert names(tmp_path) == {"step-5", "step-7", ".tmp-step-6"}
    assert checkpoints.rotate(tmp_path, None) == []  # null: keep all


# ---------------------------------------------------------------- keys: validation and resume


def config(tmp_path, *overrides):
    return compose_config([f"local_dirs=[{tmp_path}]", *overrides])


def test_report_to_is_passed_to_trainer_and_reconciled_with_wandb_enabled(tmp_path):
    assert validate(config(tmp_path)).report_to == ()
    assert validate(config(tmp_path, "report_to=none")).report_to == ()
    with pytest.raises(ConfigError, match=r"wandb.enabled=true but report_to=none leaves wandb out: add it "
                                          r"\(report_to=\[none,wandb\]\)|wandb.enabled=true but report_to=none"):
        validate(config(tmp_path, "wandb.enabled=true", "report_to=none"))
    with pytest.raises(ConfigError, match=r"report_to=\[tensorboard,wandb\]"):
        validate(config(tmp_path, "wandb.enabled=true", "report_to=tensorboard"))
    with pytest.raises(ConfigError, match="report_to=tensorboard needs the tensorboard package: pip install tensorboard"):
        validate(config(tmp_path, "report_to=tensorboard"))  # (tensorboard is not installed here)
    with pytest.raises(ConfigError, match="did you mean tensorboard"):
        validate(config(tmp_path, "report_to=tensorbord"))
    with pytest.raises(ConfigError, match="'none' cannot be combined"):
        validate(config(tmp_path, "report_to=[none,wandb]"))
    cfg = config(tmp_path)
    settings = dataclasses.replace(validate(cfg), report_to=("tensorboard", "mlflow"))
    assert build_training_arguments(cfg, settings).report_to == ["tensorboard", "mlflow"]


def test_checkpoint_and_hub_keys_are_checked_and_free_on_resume(tmp_path):
    for bad, message in (("save_total_limit=-1", "must be >= 0"),
                         ("hub_model_id=org/a/b", "expected `name` or `org/name`")):
        with pytest.raises(ConfigError, match=message):
            validate(config(tmp_path, bad, "push_to_hub=true"))
    with pytest.raises(ConfigError, match="push_to_hub=true with debug=true"):
        validate(config(tmp_path, "push_to_hub=true", "debug=true"))
    stored = as_container(config(tmp_path))
    changed = config(tmp_path, "save_total_limit=null", "report_to=none", "push_to_hub=true", "hub_model_id=me/x")
    assert changed_keys(stored, changed) == []  # none of them changes the numbers


# ---------------------------------------------------------------- a run: rotation, card, push, NLL

N_PAIRS = 10


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("habits"), toy_preference_pairs(N_PAIRS))


def run_argv(root, exp, *extra):
    return [f"model.name_or_path={root / 'tiny'}", "datasets=[ours]", f"custom_train_path={root / 'train.json'}",
            f"local_dirs=[{root / 'runs'}]", f"cache_dir={root / 'cache'}", f"exp_name={exp}", "prompt_format=raw",
            "max_length=64", "max_prompt_length=32", "loss=sft", "batch_size=2", "save_every=2", "warmup_steps=0",
            "do_first_eval=false", "optimizer=AdamW", "lr=1e-3", *extra]


@pytest.fixture
def hub_calls(monkeypatch):
    """HfApi's two network calls, recorded instead of made."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs["repo_id"], kwargs))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_sft_run_rotates_writes_its_card_logs_nll_per_token_and_stays_offline(root, hub_calls, capsys):
    assert train_main(run_argv(root, "sft")) == 0
    out = capsys.readouterr().out
    run_dir = root / "runs" / "sft"
    assert hub_calls == []  # push_to_hub=false: nothing reaches the hub
    # 5 steps, one checkpoint each: LATEST's and the newest two others kept
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-3", "step-4", "step-5"]
    assert (run_dir / "LATEST").resolve().name == "step-5"
    assert "checkpoints" in out and "LATEST's and the newest 2 others kept (save_total_limit=2)" in out

    card = (run_dir / "LATEST" / "README.md").read_text()
    assert f"model card   {run_dir / 'step-5' / 'README.md'}" in out
    assert "`train.json`: 10 records kept of 10 read, 10 regions" in card
    assert "SFT (response-level)" in card and "`loss=sft`" in card and "`granular=false`" in card
    assert "`granular.unannotated_weight=0.0`" in card and "`optimizer=AdamW`" in card and "5 optimizer steps" in card
    assert "tags: [granular-po, sft, response-level]" in card and "nll_per_token/train" in card

    # nll_per_token: summed NLL over all tokens / tokens; loss/train is the per-sequence mean of the sums
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in metrics if "loss/train" in m)
    assert "nll_train/_sum" not in first and "nll_train/_weight" not in first
    records, _ = load_records(root / "train.json")
    tokenizer = tiny_tokenizer("byte_level")
    enc = EncodeOptions(max_length=64, max_prompt_length=32, prompt_format="raw")
    lengths = {r.index: len(encode_record(r, tokenizer, enc, GranularOptions())["chosen_ids"]) for r in records}
    per_token = [m["nll_per_token/train"] for m in metrics if "nll_per_token/train" in m]
    assert len(per_token) == 5
    ratios = {first["loss/train"] * 2 / (lengths[a] + lengths[b]) for a in lengths for b in lengths if a < b}
    assert min(abs(per_token[0] - r) for r in ratios) < 1e-5 * per_token[0]  # the step's pair, whichever it was
    assert "nll/token" in out

    # save_total_limit=null on a new run: every checkpoint stays
    assert train_main(run_argv(root, "keep_all", "save_total_limit=null", "n_examples=6")) == 0
    assert sorted(p.name for p in (root / "runs" / "keep_all").glob("step-*")) == ["step-1", "step-2", "step-3"]


def test_push_to_hub_uploads_the_final_model_and_card_without_training_state(root, hub_calls, capsys):
    assert train_main(run_argv(root, "pushed", "push_to_hub=true", "hub_model_id=me/tiny-sft", "n_examples=4")) == 0
    run_dir = root / "runs" / "pushed"
    final = (run_dir / "LATEST").resolve()
    assert [c[:2] for c in hub_calls] == [("create_repo", "me/tiny-sft"), ("upload_folder", "me/tiny-sft")]
    upload = hub_calls[1][2]
    assert Path(upload["folder_path"]) == final and (final / "optimizer.pt").is_file()
    assert {"optimizer.pt", "scheduler.pt", "rng_state*.pth", "trainer_state.json"} <= set(upload["ignore_patterns"])
    assert (final / "README.md").read_text().splitlines()[5] == "# me/tiny-sft"
    assert "pushed to https://huggingface.co/me/tiny-sft" in capsys.readouterr().out


def test_pushing_a_lora_adapter_with_a_local_base_says_it_loads_nowhere_else(root, hub_calls, capsys):
    assert train_main(run_argv(root, "pushed_lora", "push_to_hub=true", "hub_model_id=me/tiny-lora", "n_examples=2",
                               "lora.enabled=true", "lora.r=4", "lora.alpha=8")) == 0
    out = capsys.readouterr().out
    base = str((root / "tiny").resolve())
    assert "hub warning" in out and f"the adapter's base is the local path {base}" in out
    assert "lora.merge_on_save=true" in out and [c[0] for c in hub_calls] == ["create_repo", "upload_folder"]
    # a full model (no adapter) or an adapter on a hub base: nothing to warn about
    assert publish.adapter_local_base((root / "runs" / "pushed_lora" / "LATEST").resolve()) == base
    adapter = (root / "runs" / "pushed_lora" / "LATEST").resolve() / "adapter_config.json"
    adapter.write_text(json.dumps({**json.loads(adapter.read_text()), "base_model_name_or_path": "org/model"}))
    assert publish.adapter_local_base(adapter.parent) is None
    assert publish.adapter_local_base(root / "tiny") is None


def test_a_failed_push_keeps_the_run_and_says_where_the_model_is(root, capsys):
    """Offline (HF_HUB_OFFLINE=1, the real HfApi): the run completes, then the push fails in one line."""
    assert train_main(run_argv(root, "offline", "push_to_hub=true", "n_examples=2")) == 2
    err = capsys.readouterr().err
    final = (root / "runs" / "offline" / "LATEST").resolve()
    assert "push_to_hub: could not upload" in err and str(final) in err and "hf upload offline" in err
    assert (final / "README.md").is_file() and (final / "COMPLETE").is_file()

"""LoRA on top of `model.archive`: the saved adapter must name the weights it was trained on.

A research-code `policy.pt` archive (or a stage-1 LoRA adapter directory) is applied on top of
`model.name_or_path` in memory; the adapter trained there used to record `base_model_name_or_path` =
`model.name_or_path`, so every loader (eval, chat, stage 2's `model.archive`, peft's
`AutoPeftModelForCausalLM`) put it on a different model, without a word. A LoRA run now writes the
archive-applied base once, as `<run>/base/` (safetensors, staged and renamed like a checkpoint), and its
adapters name that directory.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer, toy_preference_pairs
from transformers import AutoModelForCausalLM

from granular_po.apps import chat as chat_cmd
from granular_po.apps import eval as eval_cmd
from granular_po.apps.cli import train_main
from granular_po.models import load_model, load_policy_and_reference
from granular_po.settings import ModelSettings

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def _close(a, b) -> bool:
    return torch.allclose(_logits(a), _logits(b), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """`tiny/` (random weights, seed 0), `policy.pt` (a research-code archive holding other weights, seed 1)."""
    root = tmp_path_factory.mktemp("lora_archive")
    tokenizer = tiny_tokenizer("byte_level")
    tiny_llama(len(tokenizer), seed=0).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    archive = tiny_llama(len(tokenizer), seed=1)
    torch.save({"step_idx": 7, "state": archive.state_dict(), "metrics": {}}, root / "policy.pt")
    (root / "train.json").write_text(json.dumps(toy_preference_pairs(8)))
    return root


def _argv(root, exp: str, *extra: str) -> list[str]:
    return [f"model.name_or_path={root / 'tiny'}", "datasets=[ours]", f"custom_train_path={root / 'train.json'}",
            f"exp_name={exp}", f"local_dirs=[{root / 'runs'}]", "prompt_format=raw", "optimizer=AdamW",
            "warmup_steps=0", "max_length=64", "max_prompt_length=32", "batch_size=4", "n_examples=8",
            "lr=1e-2", "lora.enabled=true", "lora.r=4", "lora.alpha=8", "lora.merge_on_save=true",
            "sample_during_eval=false", *extra]


@pytest.fixture(scope="module")
def stage1(workspace):
    """Two LoRA SFT steps on `tiny` + `policy.pt`; `merged/` is the in-memory trained policy, folded."""
    assert train_main(_argv(workspace, "stage1", "loss=sft", f"model.archive={workspace / 'policy.pt'}")) == 0
    return workspace / "runs" / "stage1"


def test_every_loader_of_the_adapter_gives_the_trained_model(workspace, stage1):
    from peft import AutoPeftModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(stage1 / "merged")  # the trained policy, adapter folded in
    base_only = AutoModelForCausalLM.from_pretrained(workspace / "tiny")
    assert not _close(trained, base_only)
    latest = stage1 / "LATEST"
    loaded = {
        "models.load_model": load_model(str(latest), device="cpu"),
        "eval": eval_cmd._load(str(latest), eval_cmd.build_parser().parse_args(["--data", "x", "--model", "x"]))[1],
        "chat": chat_cmd.load_chat_model(str(latest), device="cpu")[1],
        "stage-2 model.archive": load_policy_and_reference(
            ModelSettings(name_or_path=str(workspace / "tiny"), archive=str(latest)), False, device="cpu")[0],
        "peft AutoPeftModelForCausalLM": AutoPeftModelForCausalLM.from_pretrained(str(latest)),
    }
    wrong = [name for name, model in loaded.items() if not _close(model, trained)]
    assert not wrong, f"loaded on the wrong base: {wrong}"


def test_the_adapter_names_the_run_base_a_complete_hf_directory(workspace, stage1):
    """`base/` is the archive applied (not `tiny`), as safetensors with its tokenizer, written complete."""
    base = stage1 / "base"
    adapter = json.loads((stage1 / "LATEST" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base.resolve())
    assert (base / "model.safetensors").is_file() and (base / "tokenizer.json").is_file()
    assert (base / "COMPLETE").is_file() and not (stage1 / ".tmp-base").exists()
    archived = torch.load(workspace / "policy.pt", weights_only=True)["state"]
    stored = AutoModelForCausalLM.from_pretrained(base).state_dict()
    assert all(torch.equal(stored[k], v) for k, v in archived.items())


def test_a_stage_one_adapter_as_stage_two_archive_with_lora(workspace):
    """A stage-1 LoRA output (an adapter directory) as stage 2's `model.archive`: stage 2 starts from base +
    stage-1 adapter, and its own adapter names that merged model (it named stage 1's base, dropping the
    stage-1 adapter)."""
    assert train_main(_argv(workspace, "plain1", "loss=sft")) == 0
    plain1 = workspace / "runs" / "plain1"
    assert train_main(_argv(workspace, "plain2", "loss=dpo", "loss.beta=0.5", "granular=true",
                            f"model.archive={plain1 / 'LATEST'}")) == 0
    plain2 = workspace / "runs" / "plain2"
    stage1_trained = AutoModelForCausalLM.from_pretrained(plain1 / "merged")
    start = load_policy_and_reference(ModelSettings(name_or_path=str(workspace / "tiny"),
                                                    archive=str(plain1 / "LATEST")), False, device="cpu")[0]
    assert _close(start, stage1_trained)  # the adapter applied when loaded as an archive
    trained = AutoModelForCausalLM.from_pretrained(plain2 / "merged")
    assert not _close(trained, stage1_trained)
    assert _close(load_model(str(plain2 / "LATEST"), device="cpu"), trained)
    assert _close(AutoModelForCausalLM.from_pretrained(plain2 / "base"), stage1_trained)


def _adapter(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_resume_continues_on_the_same_base_as_one_uninterrupted_run(workspace, stage1):
    """2 steps then 2 more (resumed) give the adapter of 4 steps in one go; base/ is written once."""
    base_file = stage1 / "base" / "model.safetensors"
    written = base_file.stat().st_mtime_ns
    (stage1 / ".tmp-base").mkdir()  # a write of base/ killed half-way: removed, never read
    (stage1 / ".tmp-base" / "config.json").write_text("{")
    archive = f"model.archive={workspace / 'policy.pt'}"
    assert train_main(_argv(workspace, "stage1", "loss=sft", archive, "n_examples=16")) == 0
    assert (stage1 / "LATEST").resolve().name == "step-4" and not (stage1 / ".tmp-base").exists()
    assert base_file.stat().st_mtime_ns == written
    assert train_main(_argv(workspace, "straight", "loss=sft", archive, "n_examples=16")) == 0
    straight = workspace / "runs" / "straight"
    resumed, once = _adapter(stage1 / "LATEST"), _adapter(straight / "LATEST")
    assert resumed.keys() == once.keys()
    assert all(torch.equal(resumed[k], once[k]) for k in once)
    trained = AutoModelForCausalLM.from_pretrained(stage1 / "merged")
    assert _close(load_model(str(stage1 / "LATEST"), device="cpu"), trained)


def test_a_changed_archive_stops_a_resume_and_resume_false_replaces_the_base(workspace, tmp_path, capsys):
    """The checkpoints' adapters were trained on base/: resuming on other archive weights is refused, naming
    the archive and base/; starting over (resume=false) writes the new base."""
    archive = tmp_path / "policy.pt"
    tokenizer = tiny_tokenizer("byte_level")
    torch.save({"state": tiny_llama(len(tokenizer), seed=2).state_dict()}, archive)
    argv = _argv(workspace, "changed", "loss=sft", f"model.archive={archive}", "lora.merge_on_save=false")
    assert train_main(argv) == 0
    run = workspace / "runs" / "changed"
    torch.save({"state": tiny_llama(len(tokenizer), seed=3).state_dict()}, archive)
    assert train_main(argv + ["n_examples=16"]) != 0
    assert f"model.archive={archive} now gives other weights than {run / 'base'}" in capsys.readouterr().err
    assert (run / "LATEST").resolve().name == "step-2"
    assert train_main(argv + ["resume=false"]) == 0
    stored = AutoModelForCausalLM.from_pretrained(run / "base").state_dict()
    now = torch.load(archive, weights_only=True)["state"]
    assert all(torch.equal(stored[k], v) for k, v in now.items())
    assert not (run / ".old-base").exists()


def test_lora_on_an_in_memory_archive_without_a_base_writer_is_refused(workspace):
    from granular_po.models import ModelLoadError
    from granular_po.settings import LoraSettings

    cfg = ModelSettings(name_or_path=str(workspace / "tiny"), archive=str(workspace / "policy.pt"))
    with pytest.raises(ModelLoadError, match="policy.pt with LoRA: the archive's weights exist only in memory"):
        load_policy_and_reference(cfg, False, lora_cfg=LoraSettings(enabled=True, r=4), device="cpu")


def test_which_archives_are_applied_in_memory(workspace, stage1):
    """Files and adapter directories are; a model directory (or a run's `merged/` parent) is named as it is."""
    from granular_po.models import archive_applied_in_memory

    assert archive_applied_in_memory(str(workspace / "policy.pt"))
    assert archive_applied_in_memory(str(stage1 / "LATEST"))  # an adapter directory, merged on load
    assert not archive_applied_in_memory(str(workspace / "tiny"))
    assert not archive_applied_in_memory(str(stage1 / "base"))
    assert not archive_applied_in_memory(None)


def test_write_base_is_staged_and_survives_a_kill_between_its_renames(tmp_path):
    """A replacement moves the old base to `.old-base` and the staged one into place: killed between the two,
    the next start puts the old one back (it is complete) before comparing; a half-written `.tmp-base` goes."""
    from granular_po.training.adapter_base import stored_fingerprint, write_base
    from granular_po.training.reference_cache import weights_fingerprint

    model = tiny_llama(len(tiny_tokenizer("byte_level")), seed=4)
    run = tmp_path / "run"
    base = write_base(run, model, source="policy.pt", resuming=False)
    assert base == run / "base" and stored_fingerprint(base) == weights_fingerprint(model)
    assert write_base(run, model, source="policy.pt", resuming=False, write=False) == base
    base.rename(run / ".old-base")  # the kill: the old base moved away, the new one not yet in place
    (run / ".tmp-base").mkdir()
    stamp = (run / ".old-base" / "model.safetensors").stat().st_mtime_ns
    assert write_base(run, model, source="policy.pt", resuming=True) == base
    assert (base / "model.safetensors").stat().st_mtime_ns == stamp  # restored, not rewritten
    assert not (run / ".old-base").exists() and not (run / ".tmp-base").exists()
    other = tiny_llama(len(tiny_tokenizer("byte_level")), seed=5)
    with pytest.raises(Exception, match="now gives other weights"):
        write_base(run, other, source="policy.pt", resuming=True)
    assert stored_fingerprint(base) == weights_fingerprint(model)  # refused: nothing touched


def test_the_start_block_says_where_the_adapters_base_is(workspace):
    from granular_po.losses import LossType
    from granular_po.settings import TrainConfig
    from granular_po.training.briefing import model_rows

    cfg = TrainConfig(model=ModelSettings(name_or_path="tiny", archive=str(workspace / "policy.pt")))
    cfg.lora.enabled = True
    rows = dict(model_rows(cfg, LossType.SFT, reference_loaded=False, precomputed=False))
    assert rows["policy"].endswith("+ LoRA (r=16); the adapters name the run's base/ (these starting weights, "
                                   "written once)")


def test_a_restart_from_the_untouched_archive_file_skips_hashing(tmp_path):
    """The size and modification time of the archive file recorded at the write stand for its weights (a
    restart hashes nothing); a touched file is hashed again: same weights reused and re-stamped, other ones
    refused when resuming."""
    import os

    from granular_po.training.adapter_base import stored_info, write_base

    tokenizer = tiny_tokenizer("byte_level")
    model, other = tiny_llama(len(tokenizer), seed=4), tiny_llama(len(tokenizer), seed=5)
    archive = tmp_path / "policy.pt"
    torch.save({"state": model.state_dict()}, archive)
    run = tmp_path / "run"
    base = write_base(run, model, source=str(archive), resuming=False)
    stamp = stored_info(base)["archive_stamp"]
    assert stamp == [archive.stat().st_size, archive.stat().st_mtime_ns]
    assert write_base(run, other, source=str(archive), resuming=True) == base  # trusted: not hashed
    os.utime(archive, ns=(archive.stat().st_atime_ns, archive.stat().st_mtime_ns + 10**9))
    assert write_base(run, model, source=str(archive), resuming=True) == base
    assert stored_info(base)["archive_stamp"] == [archive.stat().st_size, archive.stat().st_mtime_ns] != stamp
    os.utime(archive, ns=(archive.stat().st_atime_ns, archive.stat().st_mtime_ns + 10**9))
    with pytest.raises(Exception, match="now gives other weights"):
        write_base(run, other, source=str(archive), resuming=True)

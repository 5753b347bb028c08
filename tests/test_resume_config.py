"""Issue 11.10: a run directory is continued only under the configuration that wrote it.

A change to a key that alters the numbers stops before any work, listing the changed keys and the ways
out; keys that cannot change them (logging, evaluation cadence, n_epochs / n_examples) stay allowed.
"""

import json
from pathlib import Path

import pytest

from granular_po import models
from granular_po.apps.cli import train_main
from granular_po.training.config import RESUME_FREE_KEYS, ConfigError, compose_config, redacted_yaml, validate


def fake_run(root: Path, argv: list[str]) -> Path:
    """A run directory as a finished run leaves it: config.yaml and a complete step-2."""
    run_dir = root / "runs" / "sft"
    step = run_dir / "step-2"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text("2\n")
    (step / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (run_dir / "config.yaml").write_text(redacted_yaml(compose_config(argv)))
    return run_dir


def base(root: Path) -> list[str]:
    return ["loss=sft", "exp_name=sft", f"local_dirs=[{root / 'runs'}]", "custom_train_path=t.json"]


def test_changed_numbers_stop_before_any_work_naming_keys_and_ways_out(tmp_path, monkeypatch, capsys):
    run_dir = fake_run(tmp_path, base(tmp_path))
    stored = (run_dir / "config.yaml").read_text()
    touched = []
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: touched.append("tokenizer"))
    assert train_main(base(tmp_path) + ["loss=dpo", "lr=1e-4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("config error: ")  # one line
    assert "loss.name: 'sft' -> 'dpo'" in err and "lr: 5e-06 -> 0.0001" in err and "step-2" in err
    assert "another exp_name" in err and "resume=false" in err
    assert touched == [] and (run_dir / "config.yaml").read_text() == stored  # nothing done, nothing rewritten


@pytest.mark.parametrize("change", ["n_epochs=3", "n_examples=40", "eval_every=8", "minimum_log_interval_secs=5",
                                    "wandb.project=other", "do_first_eval=false", "logprobs.chunk_size=64",
                                    "save_every=4", "resume=true"])
def test_keys_that_cannot_change_the_numbers_may_change(tmp_path, change):
    fake_run(tmp_path, base(tmp_path))
    validate(compose_config(base(tmp_path) + [change]))


@pytest.mark.parametrize("change", ["seed=1", "batch_size=8", "optimizer=AdamW", "warmup_steps=0", "granular.enabled=true",
                                    "granular.outside_weight=0.1", "model.archive=x", "max_length=300",
                                    "custom_train_path=other.json", "gradient_accumulation_steps=2",
                                    "lora.enabled=true", "group_by_length=false"])
def test_keys_that_change_the_numbers_are_refused(tmp_path, change):
    fake_run(tmp_path, base(tmp_path))
    with pytest.raises(ConfigError, match=change.split("=")[0].replace(".", r"\.") + ": "):
        validate(compose_config(base(tmp_path) + [change]))
    validate(compose_config(base(tmp_path) + [change, "exp_name=other"]))  # a new run: fine
    validate(compose_config(base(tmp_path) + [change, "resume=false"]))  # starting over: fine


def test_free_keys_exist():
    names = {f"{k}" for k in RESUME_FREE_KEYS}
    cfg = compose_config([])
    for name in names:  # each entry names a key or group of the settings (no typo hides a refusal)
        node = cfg
        for part in name.split("."):
            assert hasattr(node, part), name
            node = getattr(node, part)

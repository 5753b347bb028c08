"""The shipped config tree: every file composes, research-code commands parse, bad keys are named."""

import sys
import types
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from granular_po.losses import LossType
from granular_po.training.config import (
    CONFIG_DIR,
    as_container,
    compose_config,
    normalize_overrides,
    redacted_yaml,
    validate,
)

MODELS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
LOSSES = sorted(p.stem for p in (CONFIG_DIR / "loss").glob("*.yaml"))

SFT_COMMAND = (
    "model=smollm2-135m datasets=[ours] loss=sft granular=false custom_train_path=t.json "
    "custom_eval_path=e.json exp_name=x gradient_accumulation_steps=2 eval_every=8 batch_size=4 "
    "eval_batch_size=4 n_epochs=1 trainer=BasicTrainer sample_during_eval=false model.fsdp_policy_mp=bfloat16"
).split()
TDPO_COMMAND = (
    "model=smollm2-135m datasets=[ours] loss=tdpo loss.alpha=0.5 loss.beta=0.1 granular=true "
    "custom_train_path=t.json custom_eval_path=e.json exp_name=y model.archive=runs/x/LATEST"
).split()


def test_repository_config_links_to_package_config():
    assert (Path(__file__).resolve().parents[1] / "config" / "config.yaml").resolve() == CONFIG_DIR / "config.yaml"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("loss", LOSSES)
def test_every_shipped_config_composes_and_validates(model, loss, tmp_path):
    cfg = compose_config([f"model={model}", f"loss={loss}", f"local_dirs=[{tmp_path}]"])
    settings = validate(cfg)
    assert settings.loss == LossType(loss)
    assert cfg.model.name_or_path


def test_model_configs_of_the_research_code_are_shipped():
    for name in ("llama8b-fine-tuned", "gpt2-large", "gpt2-xl", "gptj", "llama7b", "pythia28", "pythia69", "smollm2-135m"):
        assert name in MODELS
    assert compose_config(["model=llama8b-fine-tuned"]).model.name_or_path == "meta-llama/Meta-Llama-3.1-8B-Instruct"


def test_granular_fork_defaults():
    cfg = compose_config([])
    assert (cfg.optimizer, cfg.lr, cfg.warmup_steps, cfg.max_grad_norm) == ("SGD", 5e-6, 150, 10.0)
    assert (cfg.max_length, cfg.max_prompt_length, cfg.batch_size, cfg.eval_batch_size) == (512, 256, 4, 16)
    assert (cfg.n_eval_examples, cfg.eval_every) == (256, 20000)
    assert cfg.wandb.enabled is False  # offline machines: the research code had it on
    assert cfg.model.name_or_path == "smollm2-135m"  # research code's `blank_model_fp32` never existed
    assert cfg.loss.name == "sft"
    assert compose_config(["loss=tdpo"]).loss.if_tdpo2 is False


def test_research_commands_compose(tmp_path):
    sft = compose_config([*SFT_COMMAND, f"local_dirs=[{tmp_path}]"])
    assert sft.granular.enabled is False and sft.gradient_accumulation_steps == 2
    settings = validate(sft)
    assert settings.per_device_batch_size == 2 and settings.eval_steps == 2
    tdpo = compose_config([*TDPO_COMMAND, f"local_dirs=[{tmp_path}]"])
    assert tdpo.granular.enabled is True
    assert (tdpo.loss.name, tdpo.loss.alpha, tdpo.loss.beta) == ("tdpo", 0.5, 0.1)
    assert tdpo.model.archive == "runs/x/LATEST"
    assert validate(tdpo).run_dir == tmp_path / "y"


def test_granular_switch_and_options_coexist():
    assert normalize_overrides(["granular=true", "granular.outside_weight=0.1", "x=granular=1"]) == [
        "granular.enabled=true", "granular.outside_weight=0.1", "x=granular=1"]
    cfg = compose_config(["granular=true", "granular.outside_weight=0.25"])
    assert cfg.granular.enabled is True and cfg.granular.outside_weight == 0.25


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(Exception, match="no_such_key"):
        compose_config(["no_such_key=1"])
    with pytest.raises(Exception, match="alphaa"):
        compose_config(["loss=tdpo", "loss.alphaa=1"])


def test_not_applicable_key_is_a_notice(tmp_path, caplog):
    cfg = compose_config(["model.fsdp_policy_mp=bfloat16", f"local_dirs=[{tmp_path}]"])
    validate(cfg)
    assert any("fsdp_policy_mp" in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "override, message",
    [
        ("batch_size=3", "batch_size=3 must be divisible"),
        ("trainer=Nope", "trainer='Nope'"),
        ("on_invalid=maybe", "on_invalid='maybe'"),
        ("logprobs.impl=fast", "logprobs.impl='fast'"),
        ("logprobs.chunk_size=0", "logprobs.chunk_size=0: must be >= 1"),
        ("loss=dpo loss.beta=0", r"loss.beta=0(\.0)?: must be > 0"),  # once silently turned into 0.1
    ],
)
def test_bad_values_name_the_key(override, message, tmp_path):
    cfg = compose_config(["gradient_accumulation_steps=2", *override.split(), f"local_dirs=[{tmp_path}]"])
    with pytest.raises(ValueError, match=message):
        validate(cfg)


def test_secrets_are_never_written(monkeypatch):
    # the typed settings have no secret key today; the guard stays for any that is added
    cfg = OmegaConf.create(as_container(compose_config(["wandb.entity=me"])))
    cfg = OmegaConf.merge(cfg, {"wandb": {"api_key": "sk-very-secret"}, "hf_token": "hf_abc"})
    text = redacted_yaml(cfg)
    assert "sk-very-secret" not in text and "hf_abc" not in text and "entity: me" in text


# Every key of the research code's config/config.yaml and config/loss/*.yaml, with its value there.
RESEARCH_TOP_LEVEL = [
    "seed=0", "granular=false", "custom_train_path=null", "custom_eval_path=null", "exp_name=x", "batch_size=4",
    "eval_batch_size=16", "debug=false", "fsdp_port=null", "datasets=[hh]", "wandb.enabled=true",
    "wandb.entity=null", "wandb.project=token-level-direct-preference-optimization",
    "local_dirs=[/scr-ssd,/scr,.cache]", "local_run_dir=.cache/x", "sample_during_eval=true",
    "n_eval_model_samples=16", "do_first_eval=true", "lr=5e-6", "gradient_accumulation_steps=1",
    "max_grad_norm=10.0", "max_length=512", "max_prompt_length=256", "n_epochs=1", "n_examples=null",
    "n_eval_examples=256", "trainer=BasicTrainer", "optimizer=SGD", "warmup_steps=150",
    "activation_checkpointing=false", "eval_every=20000", "minimum_log_interval_secs=1.0",
]
RESEARCH_LOSS_KEYS = {
    "sft": ["loss.name=sft"],
    "dpo": ["loss.name=dpo", "loss.alpha=0.5", "loss.beta=0.1"],
    "tdpo": ["loss.name=tdpo", "loss.if_tdpo2=false", "loss.alpha=0.5", "loss.beta=0.1", "loss.reference_free=false"],
}


@pytest.mark.parametrize("loss", sorted(RESEARCH_LOSS_KEYS))
def test_every_key_of_the_research_config_is_accepted(loss, tmp_path, caplog, monkeypatch):
    wandb = types.ModuleType("wandb")  # wandb.enabled=true needs the package: a stand-in
    wandb.__spec__ = ModuleSpec("wandb", None)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    cfg = compose_config([*RESEARCH_TOP_LEVEL, f"loss={loss}", *RESEARCH_LOSS_KEYS[loss]])
    assert cfg.local_run_dir == ".cache/x" and validate(cfg).run_dir == Path(".cache/x")  # the run dir itself
    assert cfg.granular.enabled is False and cfg.wandb.project == "token-level-direct-preference-optimization"
    alpha_notices = [r for r in caplog.records if "loss.alpha" in r.getMessage()]
    assert len(alpha_notices) == (loss == "dpo")  # a key with no effect for that loss: one notice line

"""The optimizer's implementation (issue 14, item 5): torch's fused kernel where it has one for the
class, device and dtype, else foreach, else the loop; the same update as the loop, to rounding."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer, toy_preference_pairs

from granular_po.apps.cli import train_main
from granular_po.training.optimizer import describe, optimizer_kwargs
from granular_po.training.trainer import GranularTrainer


def test_the_fastest_implementation_torch_has_is_chosen():
    cpu = torch.device("cpu")
    assert optimizer_kwargs(torch.optim.AdamW, 1e-3, cpu) == {"lr": 1e-3, "fused": True}
    assert optimizer_kwargs(torch.optim.SGD, 1e-3, cpu, torch.bfloat16) == {"lr": 1e-3, "fused": True}
    assert optimizer_kwargs(torch.optim.RMSprop, 1e-3, cpu) == {"lr": 1e-3, "foreach": True}  # no fused one
    assert optimizer_kwargs(torch.optim.LBFGS, 1e-3, cpu) == {"lr": 1e-3}  # neither
    # FSDP2's DTensor parameters: foreach (torch 2.13 has no DTensor rule for fused SGD)
    assert optimizer_kwargs(torch.optim.SGD, 1e-3, cpu, sharded=True) == {"lr": 1e-3, "foreach": True}
    assert describe(torch.optim.AdamW, {"fused": True}) == "AdamW (fused)"
    assert describe(torch.optim.LBFGS, {}) == "LBFGS"


def _train(optimizer_cls, kwargs: dict, steps: int = 3) -> dict[str, torch.Tensor]:
    model = tiny_llama(120, hidden_size=32, tie_word_embeddings=False)
    optimizer = optimizer_cls(model.parameters(), **kwargs)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 120, (4, 16), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("name, extra", [("AdamW", {"weight_decay": 0.01}), ("SGD", {"momentum": 0.9}),
                                         ("RMSprop", {})])
def test_same_update_as_the_loop(name, extra):
    optimizer_cls = getattr(torch.optim, name)
    chosen = optimizer_kwargs(optimizer_cls, 1e-2, torch.device("cpu"))
    assert chosen.keys() - {"lr"}  # a faster implementation was found
    fast = _train(optimizer_cls, {**chosen, **extra})
    loop = _train(optimizer_cls, {"lr": 1e-2, "foreach": False, **extra})
    initial = _train(optimizer_cls, {"lr": 0.0, **extra}, steps=0)
    moved = max((loop[k] - initial[k]).abs().max().item() for k in loop)
    assert moved > 1e-3  # the steps moved the weights (1000x the tolerance below)
    for key in loop:
        torch.testing.assert_close(fast[key], loop[key], rtol=1e-5, atol=1e-6, msg=key)


def test_training_builds_the_fused_optimizer(tmp_path, monkeypatch):
    tokenizer = tiny_tokenizer("byte_level")
    tiny_llama(len(tokenizer), hidden_size=32).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    (tmp_path / "train.json").write_text(json.dumps(toy_preference_pairs(2)))
    built = {}
    original = GranularTrainer.create_optimizer

    def create_optimizer(self, *args, **kwargs):
        optimizer = original(self, *args, **kwargs)
        built.update(cls=type(optimizer), fused=optimizer.defaults.get("fused"), lr=optimizer.defaults["lr"])
        return optimizer

    monkeypatch.setattr(GranularTrainer, "create_optimizer", create_optimizer)
    argv = [f"model.name_or_path={tmp_path / 'tiny'}", "datasets=[ours]", f"custom_train_path={tmp_path / 'train.json'}",
            f"local_dirs=[{tmp_path / 'runs'}]", "prompt_format=raw", "loss=sft", "optimizer=AdamW", "lr=1e-3",
            "batch_size=2", "n_epochs=1", "do_first_eval=false", "debug=true", "max_length=48", "max_prompt_length=24"]
    assert train_main(argv) == 0
    assert built == {"cls": torch.optim.AdamW, "fused": True, "lr": 1e-3}


# ---------------------------------------------------------------- weight decay (issue 20, item 7)


@pytest.fixture(scope="module")
def decay_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("decay")
    tokenizer = tiny_tokenizer("byte_level")
    tiny_llama(len(tokenizer), hidden_size=32).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    (root / "train.json").write_text(json.dumps(toy_preference_pairs(2)))
    return root


def saved_groups(root, exp: str, extra: list[str]) -> list[dict]:
    """The param groups of the optimizer one step of SFT trained with (its checkpoint's optimizer.pt)."""
    argv = [f"model.name_or_path={root / 'tiny'}", "datasets=[ours]", f"custom_train_path={root / 'train.json'}",
            f"local_dirs=[{root / 'runs'}]", f"exp_name={exp}", "prompt_format=raw", "loss=sft", "lr=1e-3",
            "warmup_steps=0", "batch_size=2", "n_epochs=1", "do_first_eval=false", "max_length=48",
            "max_prompt_length=24", *extra]
    assert train_main(argv) == 0
    state = torch.load(root / "runs" / exp / "LATEST" / "optimizer.pt", map_location="cpu", weights_only=True)
    return state["param_groups"]


@pytest.mark.parametrize("extra, decay", [
    (["optimizer=AdamW"], 0.01),  # torch.optim.AdamW's own default: the research code's AdamW(params, lr=lr)
    (["optimizer=SGD"], 0.0),  # torch.optim.SGD's own default
    (["optimizer=AdamW", "weight_decay=0.05"], 0.05),  # an explicit value wins
    (["optimizer=SGD", "weight_decay=0.05"], 0.05),
])
def test_weight_decay_defaults_to_the_optimizer_class_default_on_every_parameter(decay_root, extra, decay):
    groups = saved_groups(decay_root, "_".join(extra).replace("=", "-"), extra)
    trained = [g for g in groups if g["params"]]
    # every parameter decays, biases and norms included, as in the research code's one parameter group
    n_params = sum(1 for _ in tiny_llama(len(tiny_tokenizer("byte_level")), hidden_size=32).parameters())
    assert sum(len(g["params"]) for g in trained) == n_params
    assert all(g["weight_decay"] == decay for g in trained)


def test_weight_decay_is_checked(tmp_path):
    from granular_po.training.config import ConfigError, as_container, changed_keys, compose_config, validate

    base = [f"local_dirs=[{tmp_path}]", "optimizer=AdamW"]
    with pytest.raises(ConfigError, match="weight_decay=-0.1"):
        validate(compose_config([*base, "weight_decay=-0.1"]))
    with pytest.raises(ConfigError, match="optimizer=LBFGS has no weight decay"):
        validate(compose_config([f"local_dirs=[{tmp_path}]", "optimizer=LBFGS", "weight_decay=0.1"]))
    # it changes the numbers: a resumed run may not change it
    stored = as_container(compose_config(base))
    assert changed_keys(stored, compose_config([*base, "weight_decay=0.1"])) == ["weight_decay: None -> 0.1"]

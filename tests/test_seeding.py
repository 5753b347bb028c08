"""`seed` fixes a run's initialisation too: the LoRA matrices are drawn from it, bit for bit.

torch seeds itself at random at import and the models are built before Trainer seeds, so without an
explicit seed two runs with the same `seed` started from different `lora_A` (a max difference of 0.35).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_workspace, toy_preference_pairs

from granular_po.apps.cli import train_main
from granular_po.models import load_policy_and_reference
from granular_po.settings import LoraSettings, ModelSettings


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("seeding"), toy_preference_pairs(4))


def lora_a(policy) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in policy.named_parameters() if "lora_A" in name}


def test_the_same_seed_builds_the_same_adapters(root):
    def build(seed: int):
        torch.manual_seed(1234 + seed * 7)  # whatever the global generator holds: the seed decides
        policy, _ = load_policy_and_reference(ModelSettings(name_or_path=str(root / "tiny")), True,
                                              lora_cfg=LoraSettings(enabled=True, r=4), device="cpu", seed=seed)
        return lora_a(policy)

    first, again, other = build(0), build(0), build(1)
    assert first and first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)  # bit for bit
    assert all(not torch.equal(first[k], other[k]) for k in first)


def adapter_after_run(root, exp: str, seed: int) -> dict[str, torch.Tensor]:
    argv = [
        f"model.name_or_path={root / 'tiny'}", "datasets=[ours]", f"custom_train_path={root / 'train.json'}",
        f"exp_name={exp}", f"local_dirs=[{root / 'runs'}]", "prompt_format=raw", "loss=dpo", "lora.enabled=true",
        "lora.r=4", f"seed={seed}", "optimizer=SGD", "lr=1e-3", "warmup_steps=0", "batch_size=4", "n_examples=4",
        "do_first_eval=false", "max_length=64", "max_prompt_length=32",
    ]
    assert train_main(argv) == 0
    weights = load_file(str(root / "runs" / exp / "LATEST" / "adapter_model.safetensors"))
    return {k: v for k, v in weights.items() if "lora_A" in k}


def test_two_runs_with_the_same_seed_train_the_same_adapters(root):
    first = adapter_after_run(root, "seed0", 0)
    again = adapter_after_run(root, "seed0_again", 0)  # the global generator has moved on since
    other = adapter_after_run(root, "seed1", 1)
    assert first and all(torch.equal(first[k], again[k]) for k in first)
    assert all(not torch.equal(first[k], other[k]) for k in first)

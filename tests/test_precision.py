"""Precision (`training.precision`): fp32 master weights + autocast by default on CUDA, fp32 on CPU, pure
bf16 weights only when asked for, with a warning naming the lost-update problem.

The decision is a pure function of the config and the device's capabilities, so every branch runs here
without a GPU. The reason for the default is pinned on a real tiny run: one AdamW step at lr 5e-6 leaves
pure-bf16 weights where they were (each update is below half a bf16 step of its weight), while bf16
autocast over fp32 master weights moves them.
"""

from __future__ import annotations

import json
import logging
import math
import re

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_workspace, toy_preference_pairs

from granular_po.apps.cli import train_main
from granular_po.training import briefing
from granular_po.training.config import compose_config, validate
from granular_po.training.precision import DeviceCaps, choose_precision
from granular_po.training.recipe import build_training_arguments

H100 = DeviceCaps("cuda", bf16=True)
V100 = DeviceCaps("cuda", bf16=False)
CPU = DeviceCaps("cpu", bf16=False)


def test_default_on_a_bf16_gpu_is_fp32_master_weights_with_bf16_autocast():
    p = choose_precision("float32", None, "auto", H100)
    # the reference is the starting policy: fp32 weights under the same autocast
    assert (p.policy_dtype, p.reference_dtype, p.autocast, p.pure) == (torch.float32, torch.float32, "bf16", False)
    assert p.training_arguments == {"bf16": True, "fp16": False}
    assert p.describe() == "precision: fp32 weights, bf16 autocast; reference in fp32"
    # a bf16 reference (half its memory) only when asked for
    assert choose_precision("float32", "bfloat16", "auto", H100).reference_dtype == torch.bfloat16


def test_without_bf16_the_gpu_default_is_fp16_autocast_with_loss_scaling():
    p = choose_precision(None, None, "auto", V100)
    assert (p.policy_dtype, p.reference_dtype, p.autocast) == (torch.float32, torch.float32, "fp16")
    assert p.training_arguments == {"bf16": False, "fp16": True}
    assert "loss scaling" in p.describe()
    with pytest.raises(ValueError, match="no bf16 support"):
        choose_precision("float32", None, "bf16", V100)


def test_cpu_stays_fp32_unless_asked():
    p = choose_precision("float32", None, "auto", CPU)
    assert (p.policy_dtype, p.reference_dtype, p.autocast) == (torch.float32, torch.float32, None)
    assert choose_precision("float32", None, "bf16", CPU).autocast == "bf16"  # asked for: honoured
    with pytest.raises(ValueError, match="needs a CUDA device"):
        choose_precision("float32", None, "fp16", CPU)


def test_explicit_choices_win():
    assert choose_precision("float32", "float16", "auto", V100).reference_dtype == torch.float16
    off = choose_precision("float32", None, "no", H100)
    assert (off.autocast, off.reference_dtype) == (None, torch.float32)
    # the research code's FSDP key means the same, where FSDP runs; a contradiction is refused
    assert choose_precision("float32", None, "auto", V100, fsdp_policy_mp="float16").autocast == "fp16"
    assert choose_precision("float32", None, "auto", H100, fsdp_policy_mp="float32").autocast is None
    with pytest.raises(ValueError, match="set one of them"):
        choose_precision("float32", None, "no", H100, fsdp_policy_mp="bfloat16")
    with pytest.raises(ValueError, match="mixed_precision='half'"):
        choose_precision("float32", None, "half", H100)
    with pytest.raises(ValueError, match="model.policy_dtype='fp8'"):
        choose_precision("fp8", None, "auto", H100)


def test_pure_bf16_only_when_asked_and_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="granular_po.training.precision"):
        p = choose_precision("bfloat16", None, "auto", H100)
    assert (p.policy_dtype, p.reference_dtype, p.autocast, p.pure) == (torch.bfloat16, torch.bfloat16, None, True)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "no fp32 master copy" in warning and "update" in warning and "lost" in warning
    assert "policy_dtype=float32" in warning  # the way out
    with pytest.raises(ValueError, match="loss scaling"):  # pure fp16 weights cannot train
        choose_precision("float16", None, "auto", H100)
    assert choose_precision("bfloat16", None, "auto", V100).policy_dtype == torch.float32  # cannot run it


def test_training_arguments_follow_the_decision(tmp_path):
    cfg = compose_config([f"local_dirs=[{tmp_path}]"])
    settings = validate(cfg)
    mixed = choose_precision("float32", None, "auto", H100)
    args = build_training_arguments(cfg, settings, choose_precision("float32", None, "bf16", CPU))
    assert args.bf16 and not args.fp16
    assert mixed.training_arguments["bf16"]
    args = build_training_arguments(cfg, settings)  # this machine: CPU, fp32
    assert not args.bf16 and not args.fp16
    with pytest.raises(ValueError, match="mixed_precision"):
        validate(compose_config([f"local_dirs=[{tmp_path}]", "mixed_precision=half"]))


# ---------------------------------------------------------------- the reason for the default


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("precision"), toy_preference_pairs(4))


def one_step(root, exp: str, extra: list[str]) -> tuple[dict, dict]:
    """One AdamW step of DPO at lr 5e-6 (the config's default lr); (initial, final) body weights."""
    argv = [
        f"model.name_or_path={root / 'tiny'}", "datasets=[ours]", f"custom_train_path={root / 'train.json'}",
        f"exp_name={exp}", f"local_dirs=[{root / 'runs'}]", "prompt_format=raw", "loss=dpo", "loss.beta=0.1",
        "optimizer=AdamW", "lr=5e-6", "warmup_steps=0", "batch_size=4", "n_examples=4", "do_first_eval=false",
        "max_length=64", "max_prompt_length=32", *extra,
    ]
    assert train_main(argv) == 0
    initial = load_file(str(root / "tiny" / "model.safetensors"))
    final = load_file(str(root / "runs" / exp / "LATEST" / "model.safetensors"))
    body = [k for k in final if ".layers." in k and k.endswith("proj.weight")]  # every token's gradient reaches these
    return {k: initial[k] for k in body}, {k: final[k] for k in body}


def changed_share(initial: dict, final: dict, at_least: float) -> float:
    """The share of weights with |w| >= `at_least` that the step changed."""
    changed = total = 0
    for key, after in final.items():
        before = initial[key].to(after.dtype)
        big = before.float().abs() >= at_least
        changed += int((after != before)[big].sum())
        total += int(big.sum())
    return changed / total


# from |w| = 2^-8 (3.9e-3) up, a bf16 step is >= 3e-5: half of it is 3x the first Adam update (lr = 5e-6)
BF16_LOSES_5E6 = 2.0**-8


def test_one_small_step_moves_fp32_master_weights_but_not_pure_bf16_weights(tiny_dir):
    initial, mixed = one_step(tiny_dir, "mixed", ["mixed_precision=bf16"])
    assert all(v.dtype == torch.float32 for v in mixed.values())  # the master copy stays fp32
    assert changed_share(initial, mixed, BF16_LOSES_5E6) > 0.99
    initial, pure = one_step(tiny_dir, "pure", ["model.policy_dtype=bfloat16"])
    assert all(v.dtype == torch.bfloat16 for v in pure.values())
    assert changed_share(initial, pure, BF16_LOSES_5E6) == 0.0  # every update rounded away
    assert changed_share(initial, pure, 0.0) < 0.15  # only weights near zero have a fine enough grid


# ---------------------------------------------------------------- the reference is the starting policy


def first_eval(root, exp: str, extra: list[str]) -> dict:
    """The first evaluation (before any update) of one TDPO2 step on the toy pairs, under `extra`."""
    argv = [
        f"model.name_or_path={root / 'tiny'}", "datasets=[ours]", f"custom_train_path={root / 'train.json'}",
        f"custom_eval_path={root / 'train.json'}", f"exp_name={exp}", f"local_dirs=[{root / 'runs'}]",
        "prompt_format=raw", "loss=tdpo", "loss.if_tdpo2=true", "loss.beta=0.1", "optimizer=AdamW",
        "warmup_steps=0", "batch_size=4", "eval_batch_size=4", "n_examples=4", "do_first_eval=true",
        "max_length=64", "max_prompt_length=32", *extra,
    ]
    assert train_main(argv) == 0
    logs = [json.loads(line) for line in (root / "runs" / exp / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in logs if "rewards_eval/margins" in r)


# every precision this project offers on CPU: fp32, bf16 autocast over fp32 weights, pure bf16 weights
CPU_PRECISIONS = {"fp32": ["mixed_precision=no"], "bf16_autocast": ["mixed_precision=bf16"],
                  "pure_bf16": ["model.policy_dtype=bfloat16"]}


@pytest.mark.parametrize("name", list(CPU_PRECISIONS))
def test_at_step_0_the_reference_computes_what_the_policy_computes(tiny_dir, name):
    """Before any update the policy and the reference hold the same weights; run the same way, their
    log-probs agree, so every log-ratio, reward and KL is 0 and the loss is log 2 (bf16 autocast once
    loaded the reference in bf16 against fp32 policy weights: a margin of -0.035 on SmolLM2)."""
    first = first_eval(tiny_dir, f"start_{name}", CPU_PRECISIONS[name])
    for key in ("rewards_eval/margins", "rewards_eval/chosen", "rewards_eval/rejected", "kl_eval/chosen",
                "kl_eval/rejected"):
        assert abs(first[key]) <= 1e-6, (key, first[key])
    assert first["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_a_bf16_reference_only_when_asked_and_its_offset_measured_at_start_up(tiny_dir, caplog):
    """model.reference_dtype=bfloat16 (half the reference's memory) is honoured, and its cost said in one
    line: the first batch's mean |log-ratio| against the fp32 policy, which the first eval then shows."""
    with caplog.at_level(logging.WARNING, logger="granular_po"):
        first = first_eval(tiny_dir, "bf16_reference", ["mixed_precision=bf16", "model.reference_dtype=bfloat16"])
    (notice,) = [r.getMessage() for r in caplog.records if "model.reference_dtype" in r.getMessage()]
    assert notice.startswith("notice: model.reference_dtype=bfloat16 with float32 policy weights")
    measured = float(re.search(r"mean \|log-ratio\| of (\S+) nats", notice).group(1))
    assert measured > 1e-4  # a real offset, measured, not a description
    assert abs(first["rewards_eval/chosen"]) > 1e-6  # and the first eval is off zero, as the notice says
    assert "\n" not in notice and "model.reference_dtype=null gives an exact reference" in notice


def test_the_offset_notice_is_silent_for_an_exact_reference_and_describes_an_unmeasured_one(tmp_path):
    cfg = compose_config([f"local_dirs=[{tmp_path}]", "loss=dpo"])
    exact = choose_precision("float32", None, "bf16", H100)
    assert briefing.reference_offset_notice(cfg, exact, (0.0, 0.0)) is None
    rounded = choose_precision("float32", "bfloat16", "bf16", H100)
    assert "rounding error (not measured" in briefing.reference_offset_notice(cfg, rounded, None)
    assert "rewards 0.002," in briefing.reference_offset_notice(cfg, rounded, (0.02, 0.001))  # beta 0.1 x 0.02

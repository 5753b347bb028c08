"""`bench/flops.py`: the matmul-FLOP ceiling of our step against TRL's, checked against a real model."""

import importlib.util
from pathlib import Path

import pytest
from tiny import tiny_llama

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def flops():
    spec = importlib.util.spec_from_file_location("bench_flops", BENCH / "flops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parameter_counts_are_the_models_matmul_weights(flops):
    model = tiny_llama(300, hidden_size=32, layers=3)  # 4 query heads, 2 key/value heads
    body, head = flops.parameter_counts(model.config.to_dict())
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if type(m).__name__ == "Linear" and name != "lm_head")
    assert body == linear and head == model.lm_head.weight.numel() == 300 * 32


def test_ceiling_on_closed_form_cases(flops):
    config = {"hidden_size": 4, "num_hidden_layers": 1, "vocab_size": 10, "num_attention_heads": 2,
              "num_key_value_heads": 2, "intermediate_size": 8}
    body, head = flops.parameter_counts(config)  # 4 * 16 + 3 * 32 = 160; 40
    assert (body, head) == (160, 40)
    # no prompt: both run the same tokens through body and head
    assert flops.ceiling(config, 0, 7)[2] == pytest.approx(1.0)
    # prompt 10, responses 5: TRL 2*(160+40)*30 = 12000; ours 2*160*20 + 2*40*10 = 7200
    trl, ours, ratio = flops.ceiling(config, 10, 5)
    assert (trl * 1e9, ours * 1e9, ratio) == pytest.approx((12000, 7200, 12000 / 7200))

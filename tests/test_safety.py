"""Untrusted files and secrets: nothing runs that the user did not ask for, nothing leaks into a run.

- A research-code `policy.pt` whose pickle would run code is refused (weights_only=True), naming the file.
- A model directory whose config points at custom code (`auto_map`) trains on the built-in class with
  `trust_remote_code` off (the default); an unknown architecture is refused; `trust_remote_code=true`
  reaches transformers (the custom code then runs: that is what the flag means).
- A tiny run, then its resume, with every socket connect failing: no connection attempt; fake tokens
  in the environment and in config keys appear in no file of the run directory; weights are written
  as safetensors only; every `torch.load` of the resume uses `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer
from transformers.trainer_pt_utils import safe_globals

from granular_po import models
from granular_po.apps.cli import train_main
from granular_po.models import ModelLoadError
from granular_po.settings import ModelSettings
from granular_po.training.config import compose_config

SECRETS = {
    "HF_TOKEN": "hf_FAKEtokenDoNotLeak0123456789abcd",
    "WANDB_API_KEY": "wandbFAKEkeyDoNotLeak0123456789abcdef0123",
    "OPENAI_API_KEY": "sk-FAKEopenaiDoNotLeak0123456789abcdef",
}
CONFIG_SECRETS = {"+wandb.api_key": "wandbCONFIGsecretDoNotLeak42", "+hub_token": "hf_CONFIGtokenDoNotLeak42"}
# files the Trainer writes with torch.save beside the safetensors weights (state, not weights)
TRAINER_STATE_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth"}


class RunCode:
    """A pickle payload: unpickling it calls `exec(source)` (what a hostile policy.pt does)."""

    def __init__(self, source: str):
        self.source = source

    def __reduce__(self):
        return (exec, (self.source,))


def marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('pwned')"


def records(n: int = 8) -> list[dict]:
    out = []
    for i in range(n):
        incorrect = f"Item {i}: no."
        start = incorrect.index("no")
        out.append({"prompt": f"Is item {i} good?", "correct_response": f"Item {i}: yes.",
                    "incorrect_response": incorrect, "masked_region": [start, start + 2, -1]})
    return out


def save_tiny(path: Path, **config_extra) -> Path:
    tokenizer = tiny_tokenizer("byte_level")
    tiny_llama(len(tokenizer), hidden_size=32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    if config_extra:
        config = json.loads((path / "config.json").read_text())
        config.update(config_extra)
        (path / "config.json").write_text(json.dumps(config))
    return path


def argv(tmp: Path, model_dir: Path, exp: str, extra: list[str]) -> list[str]:
    (tmp / "train.json").write_text(json.dumps(records()))
    return [
        f"model.name_or_path={model_dir}", "datasets=[ours]", f"custom_train_path={tmp / 'train.json'}",
        f"exp_name={exp}", f"local_dirs=[{tmp / 'runs'}]", "prompt_format=raw", "optimizer=AdamW",
        "warmup_steps=0", "max_length=48", "max_prompt_length=24", "do_first_eval=false", "batch_size=2",
        "save_every=2", "n_epochs=1", "lr=1e-3", *extra,
    ]


# ---------------------------------------------------------------- hostile archive


def test_malicious_policy_archive_is_refused_not_executed(tmp_path, capsys):
    marker = tmp_path / "pwned"
    archive = tmp_path / "policy.pt"
    torch.save({"step_idx": 0, "state": RunCode(marker_code(marker)), "metrics": {}}, archive)
    # the payload is live: a plain unpickle would run it
    control = tmp_path / "control-pwned"
    torch.load(_save(tmp_path / "control.pt", RunCode(marker_code(control))), weights_only=False)
    assert control.read_text() == "pwned"

    model_dir = save_tiny(tmp_path / "tiny")
    capsys.readouterr()
    assert train_main(argv(tmp_path, model_dir, "evil", ["loss=sft", f"model.archive={archive}"])) == 2
    message = capsys.readouterr().err
    assert str(archive) in message and "refused" in message and "arbitrary code" in message
    assert not marker.exists(), "the archive's code ran"
    assert not (tmp_path / "runs" / "evil" / "LATEST").exists()


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_policy_archive_is_refused(tmp_path):
    """Not a torch zip at all: a bare pickle stream (torch.load falls back to the legacy reader)."""
    marker = tmp_path / "pwned"
    archive = tmp_path / "policy.pt"
    archive.write_bytes(pickle.dumps({"state": RunCode(marker_code(marker))}))
    with pytest.raises(ModelLoadError, match="refused"):
        models.load_archive_state(archive)
    assert not marker.exists()


# ---------------------------------------------------------------- custom code in a model directory


def _remote_code_model(tmp_path: Path, model_type: str) -> tuple[Path, Path]:
    """A tiny Llama directory whose config.json points at code that writes a marker when imported."""
    marker = tmp_path / f"remote-code-ran-{model_type}"
    model_dir = save_tiny(tmp_path / f"remote-{model_type}", model_type=model_type, auto_map={
        "AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (model_dir / "configuration_evil.py").write_text(
        f"{marker_code(marker)}\nfrom transformers import LlamaConfig\n\n\n"
        f"class EvilConfig(LlamaConfig):\n    model_type = {model_type!r}\n")
    (model_dir / "modeling_evil.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_evil import EvilConfig\n\n\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    return model_dir, marker


def test_trust_remote_code_is_off_by_default():
    assert compose_config([]).trust_remote_code is False


def test_custom_code_of_an_unknown_architecture_is_refused(tmp_path, capsys):
    model_dir, marker = _remote_code_model(tmp_path, "evil_arch")
    assert train_main(argv(tmp_path, model_dir, "remote", ["loss=sft"])) == 2
    err = capsys.readouterr().err
    assert "custom code" in err and "trust_remote_code=True" in err, err
    assert not marker.exists()


def test_trust_remote_code_true_reaches_transformers(tmp_path, monkeypatch):
    """With the flag on, transformers imports the directory's code (the marker appears): the flag is
    passed through. Its modules go to a temporary HF_MODULES_CACHE; the run stops once models load."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    model_dir, marker = _remote_code_model(tmp_path, "evil_trusted")
    seen = {}

    class Stop(Exception):
        pass

    def load(*args, **kwargs):
        seen["trust_remote_code"] = kwargs.get("trust_remote_code")
        policy, _ = original(*args, **kwargs)
        seen["class"] = type(policy).__name__
        raise Stop

    original = models.load_policy_and_reference
    monkeypatch.setattr(models, "load_policy_and_reference", load)
    with pytest.raises(Stop):
        train_main(argv(tmp_path, model_dir, "trusted", ["loss=sft", "trust_remote_code=true"]))
    assert seen == {"trust_remote_code": True, "class": "EvilForCausalLM"}
    assert marker.read_text() == "pwned"


# ---------------------------------------------------------------- network, secrets, file formats


class NoNetwork:
    """Every inet connect / DNS lookup fails and is recorded (unix sockets still work)."""

    def __init__(self, monkeypatch):
        self.attempts: list[str] = []
        connect = socket.socket.connect

        def guarded_connect(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                self.attempts.append(f"connect {address}")
                raise OSError(f"network access in a test: {address}")
            return connect(sock, address)

        def guarded_getaddrinfo(host, *args, **kwargs):
            self.attempts.append(f"getaddrinfo {host}")
            raise socket.gaierror(f"network access in a test: {host}")

        monkeypatch.setattr(socket.socket, "connect", guarded_connect)
        monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect)
        monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)


def test_offline_run_leaks_no_secret_writes_safetensors_and_resumes_weights_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    network = NoNetwork(monkeypatch)
    # auto_map to custom code: with trust_remote_code off the built-in Llama is used, the code never runs
    model_dir, marker = _remote_code_model(tmp_path, "llama")
    base = argv(tmp_path, model_dir, "safe", ["loss=dpo", "loss.beta=0.5", "granular=true"])
    # a secret appended to the config is an unknown key: refused, its value never echoed nor written
    for key, value in CONFIG_SECRETS.items():
        assert train_main(base + [f"{key}={value}"]) == 2
        assert value not in "".join(capsys.readouterr())
    assert not (tmp_path / "runs" / "safe").exists()
    assert train_main(base + ["n_examples=4"]) == 0  # steps 1-2

    loads = []
    original_load = torch.load

    def spy_load(f, *args, **kwargs):
        loads.append((os.path.basename(str(f)), kwargs.get("weights_only")))
        return original_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy_load)
    assert train_main(base) == 0  # resumes from step-2, trains steps 3-4
    monkeypatch.setattr(torch, "load", original_load)
    output = capsys.readouterr()
    assert "resuming from step-2" in output.out

    assert network.attempts == []
    assert not marker.exists()
    run_dir = tmp_path / "runs" / "safe"
    assert (run_dir / "LATEST").resolve().name == "step-4"

    # every torch.load of the resume is weights_only; no training_args.bin (a full pickle) is read
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {name for name, _ in loads}, loads
    assert all(weights_only is True for _, weights_only in loads), loads
    assert "training_args.bin" not in {name for name, _ in loads}

    secrets = [*SECRETS.values(), *CONFIG_SECRETS.values()]
    files = [Path(root) / name for root, _dirs, names in os.walk(run_dir) for name in names]
    assert len(files) > 10
    for path in files:
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, f"{secret[:6]}... written to {path.relative_to(run_dir)}"
    for secret in secrets:
        assert secret not in output.out and secret not in output.err

    # weights only as safetensors; the other torch.save files are the Trainer's own state
    for path in files:
        if path.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"):
            assert path.name in TRAINER_STATE_FILES, path
    for step_dir in sorted(run_dir.glob("step-*")):
        assert (step_dir / "model.safetensors").is_file()
        for name in ("optimizer.pt", "scheduler.pt"):  # plain tensors and containers
            torch.load(step_dir / name, weights_only=True)
        with safe_globals():  # numpy's RNG state: transformers allowlists numpy arrays and dtypes only
            torch.load(step_dir / "rng_state.pth", weights_only=True)
        # Trainer's pickled TrainingArguments is replaced by JSON (loading a pickle needs trust)
        assert not (step_dir / "training_args.bin").exists()
        assert json.loads((step_dir / "training_args.json").read_text())["seed"] == 0


def test_default_model_loads_from_cache_without_network(monkeypatch):
    """Converted once from the installed GGUF (here if no earlier test or run did it), then loaded with
    every network connection refused."""
    models.resolve_model_path(models.DEFAULT_MODEL_NAME)  # converts when the cache is empty (~20 s)
    cached = models.default_cache_dir() / "models" / "smollm2-135m-instruct" / "granular_po_conversion.json"
    assert cached.is_file()
    network = NoNetwork(monkeypatch)
    tokenizer = models.load_tokenizer("smollm2-135m")
    policy, reference = models.load_policy_and_reference(
        ModelSettings(name_or_path="smollm2-135m"), loss_needs_reference=False, device="cpu")
    assert reference is None and tokenizer.eos_token == "<|im_end|>"
    assert sum(p.numel() for p in policy.parameters()) > 100_000_000
    assert network.attempts == []

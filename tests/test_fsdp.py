"""FSDP2 through Accelerate on two CPU processes (gloo) equals one process (issue 14, item 3).

`trainer=FSDPTrainer` builds Trainer's FSDP2 config (`fsdp_config={"version": 2, ...}`); Accelerate's
own `fsdp2_prepare_model` then shards the policy (`fully_shard` on every decoder block, a tail unit of
final norm + lm_head, the root). Accelerate 1.15 enables its FSDP plugin only for GPU-like distributed
types: on CPU it silently runs DDP instead (the recipe says so in a notice). The launch script below
flips the CPU process group's distributed type to FSDP right after Accelerate decides it, and nothing
else: sharding, gathering and the reduce-scatter of gradients are Accelerate's and torch's own.

TDPO2 with granular weights, 2 processes x 2 micro-batches x 2 pairs against 1 process x 8 pairs: the
same loss at every step and the same final weights (gathered from the shards), to 1e-5.
Checkpoints too: each rank joins the gather of the full state dict (Accelerate's FSDP2 `get_state_dict`),
rank 0 writes `step-N/` atomically, and the final checkpoint equals the one-process run's. Resume too: a
run of one epoch extended to two resumes from its FSDP checkpoint (SGD without momentum, which torch's
optimizer loading refuses, so the trainer restores the schedule alone) and ends where one process does.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_llama, tiny_tokenizer, toy_preference_pairs

REPO = Path(__file__).resolve().parents[1]

LAUNCH = """
import json, os, sys
import accelerate.state
from accelerate.utils import DistributedType
from safetensors.torch import save_file

original_state_init = accelerate.state.AcceleratorState.__init__

def state_init(self, *args, fsdp_plugin=None, **kwargs):
    original_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin  # as for GPUs
        # AcceleratorState copies PartialState's fields in again each time it is built: flip both, as
        # Accelerate itself does on GPUs
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

accelerate.state.AcceleratorState.__init__ = state_init

from granular_po.apps.cli import train_main
from granular_po.training.trainer import GranularTrainer

OUT = os.environ["FSDP_OUT"]
original_train = GranularTrainer.train

def train(self, *args, **kwargs):
    out = original_train(self, *args, **kwargs)
    rank = self.args.process_index
    weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()
               for k, v in self.model.state_dict().items()}  # every rank gathers (a collective)
    sharded = type(next(self.model.parameters())).__name__
    save_file(weights, os.path.join(OUT, f"rank{rank}.safetensors"))
    losses = {h["step"]: h["loss/train"] for h in self.state.log_history if "loss/train" in h}
    with open(os.path.join(OUT, f"rank{rank}.json"), "w") as handle:
        json.dump({"fsdp": self.is_fsdp_enabled, "param_type": sharded, "fused_head": self.fused_head,
                   "losses": losses}, handle)
    return out

GranularTrainer.train = train
sys.exit(train_main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(out: Path) -> dict:
    # the launched processes run this checkout's package (a relative PYTHONPATH=src would not resolve there)
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "FSDP_OUT": str(out), "PYTHONPATH": path}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fsdp2_on_two_cpu_processes_equals_one_process(tmp_path):
    """(Slow: 85-150 s on two cores beside one or two one-thread jobs: four launches of the tiny model.)"""
    tokenizer = tiny_tokenizer("byte_level")
    tiny_llama(len(tokenizer), hidden_size=32).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    (tmp_path / "train.json").write_text(json.dumps(toy_preference_pairs(16, filler_cycle=3)))
    script = tmp_path / "launch.py"
    script.write_text(LAUNCH)
    common = [
        f"model.name_or_path={tmp_path / 'tiny'}", "model.block_name=LlamaDecoderLayer", "datasets=[ours]",
        f"custom_train_path={tmp_path / 'train.json'}", f"local_dirs=[{tmp_path / 'runs'}]", "prompt_format=raw",
        "max_length=64", "max_prompt_length=32", "loss=tdpo", "loss.beta=0.5", "loss.if_tdpo2=true",
        "granular=true", "batch_size=8", "optimizer=SGD", "lr=0.5", "warmup_steps=3",
        "do_first_eval=false", "seed=3",
    ]
    def accelerate_launch() -> list[str]:
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]

    fsdp_keys = ["trainer=FSDPTrainer", "gradient_accumulation_steps=2"]
    runs, outputs = {}, {}
    for name, launch, extra in (
        ("fsdp", accelerate_launch(), [*fsdp_keys, "exp_name=fsdp", "n_epochs=2"]),
        ("one", [sys.executable], ["exp_name=one", "n_epochs=2"]),
        # the first epoch, then the run extended to two: resumes from the FSDP checkpoint of step 2
        ("resumed-1", accelerate_launch(), [*fsdp_keys, "exp_name=resumed", "n_epochs=1"]),
        ("resumed", accelerate_launch(), [*fsdp_keys, "exp_name=resumed", "n_epochs=2"]),
    ):
        out = tmp_path / name
        out.mkdir()
        done = subprocess.run([*launch, str(script), *common, *extra], env=_env(out),
                              cwd=tmp_path, capture_output=True, text=True, timeout=280)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        runs[name], outputs[name] = out, done.stdout + done.stderr
    assert "resuming from step-2" in outputs["resumed"], outputs["resumed"][-3000:]  # not trained over again

    fsdp = [json.loads((runs["fsdp"] / f"rank{r}.json").read_text()) for r in (0, 1)]
    one = json.loads((runs["one"] / "rank0.json").read_text())
    assert [r["fsdp"] for r in fsdp] == [True, True] and fsdp[0]["param_type"] == "DTensor"  # really sharded
    assert fsdp[0]["fused_head"] and one["fsdp"] is False
    assert sorted(one["losses"]) == ["1", "2", "3", "4"]
    for step, loss in one["losses"].items():
        assert fsdp[0]["losses"][step] == pytest.approx(loss, rel=1e-5), step
    assert one["losses"]["4"] < one["losses"]["1"] - 1e-2  # it learned

    initial = load_file(str(tmp_path / "tiny" / "model.safetensors"))
    w_one = load_file(str(runs["one"] / "rank0.safetensors"))
    assert max((w_one[k] - initial[k]).abs().max().item() for k in initial) > 1e-2
    for rank in (0, 1):
        w_fsdp = load_file(str(runs["fsdp"] / f"rank{rank}.safetensors"))
        for key in w_one:
            torch.testing.assert_close(w_fsdp[key], w_one[key], rtol=1e-5, atol=1e-5, msg=f"rank {rank} {key}")

    resumed = json.loads((runs["resumed"] / "rank0.json").read_text())
    assert sorted(resumed["losses"]) == ["1", "2", "3", "4"]  # 1-2 from the checkpoint's history, 3-4 trained
    for step in ("1", "2", "3", "4"):
        assert resumed["losses"][step] == pytest.approx(one["losses"][step], rel=1e-5), step
    w_resumed = load_file(str(runs["resumed"] / "rank0.safetensors"))
    for key in w_one:
        torch.testing.assert_close(w_resumed[key], w_one[key], rtol=1e-5, atol=1e-5, msg=f"resumed {key}")

    # the checkpoints: written once (rank 0) from the gathered weights, complete, equal to one process's
    saved = {name: tmp_path / "runs" / name / "LATEST" / "model.safetensors" for name in ("fsdp", "one", "resumed")}
    assert all(path.is_file() for path in saved.values()), sorted(str(p) for p in (tmp_path / "runs").rglob("*"))
    ckpt_fsdp, ckpt_one, ckpt_resumed = (load_file(str(path)) for path in saved.values())
    assert sorted(ckpt_resumed) == sorted(ckpt_one)
    assert sorted(ckpt_fsdp) == sorted(ckpt_one) and "model.layers.1.mlp.down_proj.weight" in ckpt_fsdp
    for key, value in ckpt_one.items():
        assert type(ckpt_fsdp[key]) is torch.Tensor
        torch.testing.assert_close(ckpt_fsdp[key], value, rtol=1e-5, atol=1e-5, msg=f"checkpoint {key}")
        torch.testing.assert_close(value, w_one[key])


def test_a_gathered_state_dict_is_written_without_the_tied_alias(tmp_path):
    """Gathered (FSDP / DeepSpeed) weights are copies: the tied lm_head must still be written once."""
    from granular_po.training.trainer import drop_tied_aliases

    model = tiny_llama(300, hidden_size=16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    gathered = {name: value.clone() for name, value in model.state_dict().items()}  # no storage shared
    kept = drop_tied_aliases(model, gathered)
    assert "lm_head.weight" in gathered and "lm_head.weight" not in kept
    assert sorted(kept) == sorted(set(gathered) - {"lm_head.weight"})
    model.save_pretrained(tmp_path / "plain")
    assert sorted(load_file(str(tmp_path / "plain" / "model.safetensors"))) == sorted(kept)
    untied = tiny_llama(300, hidden_size=16, tie_word_embeddings=False)
    assert drop_tied_aliases(untied, dict(untied.state_dict())).keys() == untied.state_dict().keys()

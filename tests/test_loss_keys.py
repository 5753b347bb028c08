"""Each loss key, changed through the config, changes the training loss as its formula says.

The trainer is built by the real recipe from `compose_config` overrides (`run_training`, with
`GranularTrainer.train` replaced by a capture), so a key dropped or hard-coded anywhere between the
command line and the loss is caught: the research code's `run.py` once hard-coded `alpha=0.5,
if_tdpo2=False, label_smoothing=0.0` and every earlier test stayed green. The policy is then moved
off the reference (a fixed random perturbation), so no log-ratio is 0, and the per-pair losses are
checked against the formulas written out here from the trainer's own token statistics.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import mixed_preference_pairs, tiny_workspace

from granular_po.training.config import compose_config
from granular_po.training.recipe import run_training
from granular_po.training.trainer import GranularTrainer


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    pairs = mixed_preference_pairs()
    return tiny_workspace(tmp_path_factory.mktemp("loss_keys"), pairs, eval=pairs)


_BUILT: dict[tuple[str, ...], dict] = {}


def built(root, *overrides: str) -> dict:
    """The recipe's trainer for these overrides; its eval batch's per-pair losses and token statistics."""
    if overrides in _BUILT:
        return _BUILT[overrides]
    argv = [
        f"model.name_or_path={root / 'tiny'}", "datasets=[ours]", f"custom_train_path={root / 'train.json'}",
        f"custom_eval_path={root / 'eval.json'}", f"local_dirs=[{root / 'runs'}]", f"cache_dir={root / 'cache'}",
        "prompt_format=raw", "max_length=64", "max_prompt_length=32", "granular=true", "debug=true",
        "eval_batch_size=8", *overrides,
    ]
    captured = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GranularTrainer, "train", lambda self, **kwargs: captured.setdefault("trainer", self))
        run_training(compose_config(argv))
    trainer = captured["trainer"]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in trainer.model.parameters():  # the same move in every build: policy != reference
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        batch = trainer._prepare_inputs(next(iter(trainer.get_eval_dataloader())))
        _, metrics = trainer.loss_and_metrics(trainer.model, batch, "eval")
        stats = trainer.token_stats(trainer.model, batch, need_reference=trainer.loss_settings.needs_reference)
    n = batch["input_ids"].shape[0] // 2
    out = {"loss": metrics["loss/eval"].double(), "stats": stats, "n": n, "trainer": trainer,
           "margin": (stats.logratio[:n] - stats.logratio[n:]).double()}
    if stats.position_kl is not None:  # delta / beta = KL(rejected) - KL(chosen)
        out["kl_gap"] = (stats.position_kl[n:] - stats.position_kl[:n]).double()
    _BUILT[overrides] = out
    return out


def dpo(margin, beta, eps=0.0):
    """-(1 - eps) log sigma(beta m) - eps log sigma(-beta m) (DPO Eq. 7; cDPO with label smoothing eps)."""
    return -(1 - eps) * F.logsigmoid(beta * margin) - eps * F.logsigmoid(-beta * margin)


def tdpo(margin, kl_gap, beta, alpha=None):
    """TDPO1: -log sigma(beta (m - kl_gap)); TDPO2: -log sigma(beta (m - alpha kl_gap))."""
    return -F.logsigmoid(beta * (margin - (kl_gap if alpha is None else alpha * kl_gap)))


def check(run, expected):
    torch.testing.assert_close(run["loss"], expected, rtol=1e-5, atol=1e-6)


def differ(a, b):
    assert (a["loss"] - b["loss"]).abs().max() > 1e-4


def test_loss_beta(root):
    default, changed = built(root, "loss=dpo"), built(root, "loss=dpo", "loss.beta=0.7")
    assert changed["margin"].abs().min() > 1e-3
    check(default, dpo(default["margin"], 0.1))
    check(changed, dpo(changed["margin"], 0.7))
    differ(default, changed)


def test_loss_label_smoothing(root):
    default, changed = built(root, "loss=dpo"), built(root, "loss=dpo", "loss.label_smoothing=0.3")
    check(changed, dpo(changed["margin"], 0.1, eps=0.3))
    differ(default, changed)


def test_loss_alpha(root):
    default = built(root, "loss=tdpo", "loss.if_tdpo2=true")
    changed = built(root, "loss=tdpo", "loss.if_tdpo2=true", "loss.alpha=0.1")
    assert changed["kl_gap"].abs().min() > 1e-4
    check(default, tdpo(default["margin"], default["kl_gap"], 0.1, alpha=0.5))
    check(changed, tdpo(changed["margin"], changed["kl_gap"], 0.1, alpha=0.1))
    differ(default, changed)


def test_loss_if_tdpo2(root):
    tdpo1, tdpo2 = built(root, "loss=tdpo"), built(root, "loss=tdpo", "loss.if_tdpo2=true")
    check(tdpo1, tdpo(tdpo1["margin"], tdpo1["kl_gap"], 0.1))  # the default: TDPO1, as the research code
    check(tdpo2, tdpo(tdpo2["margin"], tdpo2["kl_gap"], 0.1, alpha=0.5))
    differ(tdpo1, tdpo2)


@pytest.mark.parametrize("loss", ["dpo", "tdpo"])
def test_loss_reference_free(root, loss):
    """No reference model is loaded; the reference log-ratio is 0, so the margin is the policy's."""
    with_ref, free = built(root, f"loss={loss}"), built(root, f"loss={loss}", "loss.reference_free=true")
    assert free["trainer"].ref_model is None and with_ref["trainer"].ref_model is not None
    stats, n = free["stats"], free["n"]
    policy_margin = (stats.policy_logps[:n] - stats.policy_logps[n:]).double()
    torch.testing.assert_close(free["margin"], policy_margin)
    if loss == "dpo":
        check(free, dpo(policy_margin, 0.1))
    else:
        check(free, tdpo(policy_margin, free["kl_gap"], 0.1))
    differ(with_ref, free)


def test_loss_average_log_prob(root):
    """Weighted means: each sequence's statistics divided by its weight sum, and the loss on those."""
    summed, mean = built(root, "loss=dpo"), built(root, "loss=dpo", "loss.average_log_prob=true")
    s, m = summed["stats"], mean["stats"]
    assert (m.weight_sum != 1).any()  # otherwise a sum would equal a mean
    torch.testing.assert_close(m.policy_logps * m.weight_sum, s.policy_logps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.logratio * m.weight_sum, s.logratio, rtol=1e-5, atol=1e-6)
    check(mean, dpo(mean["margin"], 0.1))
    differ(summed, mean)

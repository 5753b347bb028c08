"""Loss functions against hand-worked values, plus the properties every loss must keep.

Each closed-form test works its expected numbers out in the docstring first (torchtune style).
Useful identity: -log sigmoid(x) = log(1 + e^-x) = softplus(-x).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from granular_po.losses import LossType, dpo_loss, sequential_kl, sft_loss, tdpo_loss, weighted_sum


def t(*values, requires_grad=False, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype, requires_grad=requires_grad)


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual.detach(), expected, atol=atol, rtol=0)


# ---- LossType ----


def test_loss_type_properties():
    assert [str(x) for x in LossType] == ["sft", "dpo", "tdpo"]
    assert LossType("tdpo") is LossType.TDPO and LossType.DPO == "dpo"
    assert [x.needs_reference for x in LossType] == [False, True, True]
    assert [x.needs_kl for x in LossType] == [False, False, True]
    assert [x.is_preference for x in LossType] == [False, True, True]
    with pytest.raises(ValueError):
        LossType("ipo")


# ---- SFT ----


def test_sft_loss_is_negative_logps():
    """losses = -logps: [-2.5, 0, -0.1] -> [2.5, 0, 0.1]."""
    close(sft_loss(t(-2.5, 0.0, -0.1)), [2.5, 0.0, 0.1])


# ---- DPO ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dpo_loss_closed_form(dtype):
    """beta = 0.5; chosen margins (1, 0, -2), rejected margins (-1, 0, 2).

    beta * (chosen - rejected) = (1, 0, -2), so losses = log(1 + e^-z) = (log(1 + e^-1), log 2,
    log(1 + e^2)) = (0.3132617, 0.6931472, 2.1269280). Rewards = beta * margins: chosen (0.5, 0, -1),
    rejected (-0.5, 0, 1).
    """
    losses, chosen_r, rejected_r = dpo_loss(
        t(1.0, 0.0, -2.0, dtype=dtype), t(-1.0, 0.0, 2.0, dtype=dtype), 0.5
    )
    atol = 1e-6 if dtype == torch.float32 else 2e-2
    close(losses, [0.3132617, 0.6931472, 2.1269280], atol)
    close(losses, [math.log1p(math.exp(-1)), math.log(2), math.log1p(math.exp(2))], atol)
    close(chosen_r, [0.5, 0.0, -1.0], atol)
    close(rejected_r, [-0.5, 0.0, 1.0], atol)


def test_dpo_label_smoothing_closed_form():
    """beta = 0.5, margin 2 (z = 1), label_smoothing 0.1.

    losses = 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1); since log(1 + e^x) - log(1 + e^-x) = x this is
    log(1 + e^-1) + 0.1 * 1 = 0.3132617 + 0.1 = 0.4132617.
    """
    losses, _, _ = dpo_loss(t(1.0), t(-1.0), 0.5, label_smoothing=0.1)
    close(losses, [0.4132617])


def test_dpo_swap_flips_margin():
    """Swapping chosen and rejected negates z = beta * margin: loss(c, r) - loss(r, c) = -z."""
    c, r, beta = t(0.3, -1.2, 2.0), t(-0.4, 0.5, 2.0), 0.1
    loss_cr, chosen_cr, rejected_cr = dpo_loss(c, r, beta)
    loss_rc, chosen_rc, rejected_rc = dpo_loss(r, c, beta)
    close(loss_cr - loss_rc, -beta * (c - r))
    close(chosen_cr, rejected_rc)
    close(rejected_cr, chosen_rc)
    assert bool(loss_cr[0] < loss_rc[0]) and bool(loss_cr[1] > loss_rc[1]) and bool(loss_cr[2] == loss_rc[2])


def test_dpo_rewards_detached_and_gradient():
    """d/d chosen_margin of -log sigmoid(beta * m) = -beta * sigmoid(-beta * m); rejected: the opposite."""
    c, r = t(1.0, requires_grad=True), t(-1.0, requires_grad=True)
    losses, chosen_r, rejected_r = dpo_loss(c, r, 0.5)
    assert losses.requires_grad and not chosen_r.requires_grad and not rejected_r.requires_grad
    losses.sum().backward()
    close(c.grad, [-0.5 * torch.sigmoid(t(-1.0)).item()])
    close(r.grad, [0.5 * torch.sigmoid(t(-1.0)).item()])


# ---- TDPO ----


def test_tdpo_closed_form():
    """beta = 0.5; margins chosen 1, rejected -1; position KL chosen 0.5, rejected 1.5.

    TDPO1: logits = (1 - -1) - (1.5 - 0.5) = 1; loss = log(1 + e^-0.5) = 0.4740770.
    TDPO2 (alpha 0.5): logits = 2 - 0.5 * 1 = 1.5; loss = log(1 + e^-0.75) = 0.3868706.
    Rewards (both): beta * (margin + KL): chosen 0.5 * 1.5 = 0.75, rejected 0.5 * 0.5 = 0.25.
    """
    args = (t(1.0), t(-1.0), t(0.5), t(1.5), 0.5)
    losses1, chosen1, rejected1 = tdpo_loss(*args)
    losses2, chosen2, rejected2 = tdpo_loss(*args, alpha=0.5, if_tdpo2=True)
    close(losses1, [0.4740770])
    close(losses1, [math.log1p(math.exp(-0.5))])
    close(losses2, [0.3868706])
    close(losses2, [math.log1p(math.exp(-0.75))])
    for chosen, rejected in ((chosen1, rejected1), (chosen2, rejected2)):
        close(chosen, [0.75])
        close(rejected, [0.25])


def test_tdpo_defaults_to_tdpo1():
    """The research code's default (kept): if_tdpo2=False, so alpha has no effect."""
    args = (t(0.2), t(-0.3), t(0.1), t(0.7), 0.1)
    close(tdpo_loss(*args)[0], tdpo_loss(*args, alpha=0.9, if_tdpo2=False)[0])
    assert not torch.equal(tdpo_loss(*args)[0], tdpo_loss(*args, if_tdpo2=True)[0])


def test_tdpo_with_zero_kl_is_dpo():
    """With both sequential KLs 0 TDPO1's logits are DPO's margin: same losses, same rewards."""
    c, r, zero = t(0.4, -2.0), t(-0.1, 1.0), t(0.0, 0.0)
    for got, want in zip(tdpo_loss(c, r, zero, zero, 0.3), dpo_loss(c, r, 0.3)):
        close(got, want)


def test_tdpo_swap_flips_logits():
    """Swapping the responses (margins and KLs) negates TDPO1's logits z: loss(c, r) - loss(r, c) = -beta z."""
    c, r, kc, kr, beta = t(0.5, -1.0), t(-0.2, 0.4), t(0.3, 0.1), t(0.9, 0.05), 0.2
    z = (c - r) - (kr - kc)
    close(tdpo_loss(c, r, kc, kr, beta)[0] - tdpo_loss(r, c, kr, kc, beta)[0], -beta * z)


def test_tdpo_gradients_tdpo1_vs_tdpo2():
    """L = -log sigmoid(beta z), so dL/dz = -beta sigmoid(-beta z).

    TDPO1, z = mc - mr - (kr - kc): dL/dkc = -beta s, dL/dkr = +beta s, dL/dmc = -beta s.
    TDPO2, z = mc - mr - alpha (kr - sg(kc)): dL/dkc = 0 (no path at all), dL/dkr = +alpha beta s2.
    With alpha = 1 both have the same value and differ only in the chosen-KL gradient.
    """
    beta, values = 0.5, (0.7, -0.2, 0.4, 1.1)

    def grads(**kwargs):
        mc, mr, kc, kr = (t(v, requires_grad=True) for v in values)
        losses, chosen_r, rejected_r = tdpo_loss(mc, mr, kc, kr, beta, **kwargs)
        assert not chosen_r.requires_grad and not rejected_r.requires_grad
        losses.sum().backward()
        # no gradient path at all (TDPO2's chosen KL) reads as a zero gradient
        return losses.detach(), *(torch.zeros(1) if x.grad is None else x.grad for x in (mc, mr, kc, kr))

    mc, mr, kc, kr = values
    z1 = mc - mr - (kr - kc)
    s1 = torch.sigmoid(t(-beta * z1)).item()
    loss1, g_mc, g_mr, g_kc, g_kr = grads()
    close(g_mc, [-beta * s1]), close(g_mr, [beta * s1]), close(g_kc, [-beta * s1]), close(g_kr, [beta * s1])

    alpha = 0.5
    z2 = mc - mr - alpha * (kr - kc)
    s2 = torch.sigmoid(t(-beta * z2)).item()
    _, g_mc, _, g_kc, g_kr = grads(alpha=alpha, if_tdpo2=True)
    close(g_mc, [-beta * s2]), close(g_kc, [0.0]), close(g_kr, [alpha * beta * s2])

    loss2a, g2_mc, g2_mr, g2_kc, g2_kr = grads(alpha=1.0, if_tdpo2=True)
    close(loss2a, loss1)
    _, g1_mc, g1_mr, g1_kc, g1_kr = grads()
    close(g2_mc, g1_mc), close(g2_mr, g1_mr), close(g2_kr, g1_kr)
    close(g1_kc - g2_kc, [-beta * s1])  # exactly the detached term's gradient


# ---- sequential KL ----


def test_sequential_kl_two_token_closed_form():
    """p_ref = (1/4, 3/4), p_theta = (1/2, 1/2).

    KL = 1/4 ln(1/2) + 3/4 ln(3/2) = -0.1732868 + 0.3040988 = 0.1308120.
    """
    ref = torch.log(t(0.25, 0.75))
    pol = torch.log(t(0.5, 0.5))
    close(sequential_kl(ref, pol), 0.1308120)
    close(sequential_kl(ref, pol), 0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    close(sequential_kl(ref, ref), 0.0)


def test_sequential_kl_matches_torch_kl_div_and_is_nonnegative():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 5, 11, generator=g).log_softmax(-1)
    pol = torch.randn(3, 5, 11, generator=g).log_softmax(-1)
    kl = sequential_kl(ref, pol)
    assert kl.shape == (3, 5) and bool((kl >= 0).all())
    close(kl, F.kl_div(pol, ref, log_target=True, reduction="none").sum(-1), atol=1e-6)


def test_sequential_kl_finite_when_reference_underflows():
    """p_ref = (1, 0): KL = 1 * (0 - ln 1/2) = ln 2, whether log p_ref(1) is -inf or -1e4.

    The research code's softmax().log() gives 0 * -inf = NaN here (defect #5); we give ln 2, and
    finite gradients for both arguments.
    """
    ref_logits = t(0.0, -1e4)
    research = (ref_logits.softmax(-1) * (ref_logits.softmax(-1).log() - torch.log(t(0.5, 0.5)))).sum(-1)
    assert torch.isnan(research)
    for ref_lp in (ref_logits.log_softmax(-1), t(0.0, -math.inf)):
        ref = ref_lp.clone().requires_grad_(True)
        pol = torch.log(t(0.5, 0.5)).requires_grad_(True)
        kl = sequential_kl(ref, pol)
        close(kl, math.log(2))
        kl.backward()
        assert torch.isfinite(ref.grad).all() and torch.isfinite(pol.grad).all()
        close(pol.grad, [-1.0, 0.0])  # d/d log p_theta(v) of -sum p_ref log p_theta = -p_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequential_kl_finite_on_extreme_logits(dtype):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 50, generator=g) * 200  # most probabilities underflow to exactly 0
    ref = logits.to(dtype).log_softmax(-1)
    pol = torch.randn(4, 50, generator=g).to(dtype).log_softmax(-1)
    assert bool((ref.exp() == 0).any())
    assert torch.isfinite(sequential_kl(ref, pol)).all()


# ---- weighted sums ----


def test_weighted_sum_closed_form():
    """values (1, 3, 5), weights (0.2, 0.2, 0): sum 0.2 + 0.6 = 0.8; mean 0.8 / 0.4 = 2.

    The mean divides by 0.4 itself: a clamp at 1 (fine for 0/1 masks) would give 0.8.
    """
    values, weights = t(1.0, 3.0, 5.0).unsqueeze(0), t(0.2, 0.2, 0.0).unsqueeze(0)
    close(weighted_sum(values, weights, average=False), [0.8])
    close(weighted_sum(values, weights, average=True), [2.0])


@pytest.mark.parametrize("average", [False, True])
def test_weighted_sum_all_zero_row_gives_zero(average):
    values = torch.tensor([[1.0, -2.0], [4.0, float("nan")]], requires_grad=True)
    weights = torch.tensor([[0.0, 0.0], [0.5, 0.0]])
    out = weighted_sum(values, weights, average=average)
    close(out, [0.0, 4.0 if average else 2.0])
    out.sum().backward()
    assert torch.isfinite(values.grad).all()
    close(values.grad, [[0.0, 0.0], [1.0 if average else 0.5, 0.0]])

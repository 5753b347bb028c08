"""`loss.reference_free`: the reference log-ratio is 0 (DPO's reference implementation, TRL); TDPO's
KL term is taken against the uniform distribution over the vocabulary.

One hand-made batch: at every position the policy's distribution over V = 4 tokens is
p = (1/2, 1/4, 1/8, 1/8). The chosen response weighs 2 tokens of probability 1/2, the rejected one
1 token of probability 1/8, so W_c = 2 and W_r = 1 weigh differently, as granular pairs do.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from granular_po.losses import LossType
from granular_po.stats import compute_token_stats
from granular_po.training.objectives import LossSettings, compute_objective

LN2 = math.log(2.0)
PROBS = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
IDS = torch.tensor([[0, 0, 0], [0, 2, 0]])  # row 0 chosen, row 1 rejected; position 0 is never predicted
WEIGHTS = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)


def stats_of(route: str, impl: str, need_kl: bool):
    """The batch's statistics, reference-free, through logits or through hidden states and a head."""
    if route == "logits":
        logits = PROBS.log().expand(2, 3, 4).clone().requires_grad_(True)
        return compute_token_stats(None, None, None, None, IDS, WEIGHTS, need_kl, policy_logits=logits,
                                   reference_free=True, impl=impl)
    # hidden e_0 and a head whose first column is log p: the same logits, through the fused head
    head = nn.Linear(4, 4, bias=False).double()
    with torch.no_grad():
        head.weight.zero_()
        head.weight[:, 0] = PROBS.log()
    hidden = torch.zeros(2, 3, 4, dtype=torch.float64)
    hidden[..., 0] = 1.0
    return compute_token_stats(hidden.requires_grad_(True), head, None, None, IDS, WEIGHTS, need_kl,
                               reference_free=True, impl=impl)


ROUTES = [("logits", "naive"), ("logits", "chunked"), ("hidden", "naive"), ("hidden", "chunked")]


@pytest.mark.parametrize("route,impl", ROUTES)
def test_dpo_reference_free_log_ratio_is_the_policy_log_prob(route, impl):
    """log pi(y_w) = 2 ln(1/2) = -2 ln 2, log pi(y_l) = ln(1/8) = -3 ln 2; reference log-ratio 0, so
    the logit is beta * (-2 ln 2 + 3 ln 2) = 0.1 ln 2 = 0.0693147 and the loss log(1 + e^-0.0693147)
    = 0.6590903. Rewards: beta * log pi = -0.2 ln 2 = -0.1386294 and -0.3 ln 2 = -0.2079442.
    (A per-token uniform reference would add beta (W_c - W_r) ln 4 = 0.2 ln 2 to the logit: loss 0.5945705.)
    """
    stats = stats_of(route, impl, need_kl=False)
    settings = LossSettings(loss=LossType.DPO, beta=0.1, reference_free=True)
    losses, metrics = compute_objective(settings, stats, 1, "train")
    torch.testing.assert_close(stats.logratio, torch.tensor([-2 * LN2, -3 * LN2], dtype=torch.float64))
    torch.testing.assert_close(stats.reference_logps, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(losses, torch.tensor([0.6590902676], dtype=torch.float64))
    torch.testing.assert_close(metrics["rewards_train/chosen"], torch.tensor([-0.1386294361], dtype=torch.float64))
    torch.testing.assert_close(metrics["rewards_train/rejected"], torch.tensor([-0.2079441542], dtype=torch.float64))


@pytest.mark.parametrize("route,impl", ROUTES)
@pytest.mark.parametrize("if_tdpo2,expected_loss", [(False, 0.6507635732), (True, 0.6549175508)])
def test_tdpo_reference_free_kl_is_against_the_uniform_distribution(route, impl, if_tdpo2, expected_loss):
    """KL(U || p) per position = -ln 4 - (1/4)(ln 1/2 + ln 1/4 + 2 ln 1/8) = -2 ln 2 + (9/4) ln 2
    = 0.25 ln 2, so the sequential KLs are 0.5 ln 2 (chosen, 2 tokens) and 0.25 ln 2 (rejected).
    Log-ratios as for DPO: -2 ln 2 and -3 ln 2 (difference ln 2).
    TDPO1: beta (ln 2 - (0.25 - 0.5) ln 2) = 0.125 ln 2 = 0.0866434, loss log(1 + e^-z) = 0.6507636.
    TDPO2, alpha 0.5: beta (ln 2 - 0.5 (0.25 - 0.5) ln 2) = 0.1125 ln 2 = 0.0779791, loss 0.6549176.
    Rewards beta (log-ratio + KL): -0.15 ln 2 = -0.1039721 and -0.275 ln 2 = -0.1906155.
    """
    stats = stats_of(route, impl, need_kl=True)
    settings = LossSettings(loss=LossType.TDPO, beta=0.1, alpha=0.5, if_tdpo2=if_tdpo2, reference_free=True)
    losses, metrics = compute_objective(settings, stats, 1, "train")
    torch.testing.assert_close(stats.position_kl, torch.tensor([0.5 * LN2, 0.25 * LN2], dtype=torch.float64))
    torch.testing.assert_close(losses, torch.tensor([expected_loss], dtype=torch.float64))
    torch.testing.assert_close(metrics["rewards_train/chosen"], torch.tensor([-0.15 * LN2], dtype=torch.float64))
    torch.testing.assert_close(metrics["rewards_train/rejected"], torch.tensor([-0.275 * LN2], dtype=torch.float64))


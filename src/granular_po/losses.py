"""Pure loss functions: SFT, DPO and TDPO (TDPO1 / TDPO2), plus the sequential KL and weighted sums.

Everything here is tensor maths on per-sequence or per-token tensors; nothing touches a model. The
preference losses take the research code's tensors (`chosen_logps_margin` = policy minus reference
log-prob of the chosen response, ...) and return `(losses, chosen_rewards, rejected_rewards)`, one
value per pair, so results can be compared with the research code number for number. The caller
takes the mean over the batch.

References:
    DPO:  Rafailov et al. 2023, arXiv 2305.18290 (Eq. 7); conservative DPO (label smoothing):
          Mitchell 2023, "A note on DPO with noisy preferences" (Eq. 3).
    TDPO: Zeng et al. 2024, arXiv 2404.11999, Sec. 4 (u, delta, L_TDPO1, L_TDPO2).
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F

try:
    from enum import StrEnum
except ImportError:  # Python 3.10: the same behaviour, spelled out

    class StrEnum(str, enum.Enum):  # type: ignore[no-redef]
        def __str__(self) -> str:
            return str(self.value)


class LossType(StrEnum):
    """The training objective; its properties replace string checks in the trainer."""

    SFT = "sft"
    DPO = "dpo"
    TDPO = "tdpo"

    @property
    def needs_reference(self) -> bool:
        """Whether the loss compares the policy with a reference model (or a uniform one)."""
        return self in (LossType.DPO, LossType.TDPO)

    @property
    def needs_kl(self) -> bool:
        """Whether the loss needs the per-position KL(reference || policy) over the vocabulary."""
        return self is LossType.TDPO

    @property
    def is_preference(self) -> bool:
        """Whether a batch holds (chosen, rejected) pairs rather than single responses."""
        return self in (LossType.DPO, LossType.TDPO)


def sft_loss(policy_logps: torch.Tensor) -> torch.Tensor:
    """Negative (weighted) log-likelihood of each sequence.

    Shape: policy_logps (B,) -> losses (B,).
    """
    return -policy_logps


def dpo_loss(
    chosen_logps_margin: torch.Tensor,
    rejected_logps_margin: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss per pair; `*_logps_margin` is log pi_theta(y|x) - log pi_ref(y|x) of one response.

    Shape: chosen_logps_margin (B,), rejected_logps_margin (B,) -> losses, chosen_rewards,
    rejected_rewards, each (B,). Rewards are detached.
    """
    margin = chosen_logps_margin - rejected_logps_margin
    # DPO Eq. 7; with label_smoothing = eps the preference label is flipped with probability eps (cDPO Eq. 3)
    losses = (
        -F.logsigmoid(beta * margin) * (1.0 - label_smoothing)
        - F.logsigmoid(-beta * margin) * label_smoothing
    )
    # implicit reward r(x, y) = beta * log pi_theta(y|x) / pi_ref(y|x) (DPO Eq. 5)
    chosen_rewards = beta * chosen_logps_margin.detach()
    rejected_rewards = beta * rejected_logps_margin.detach()
    return losses, chosen_rewards, rejected_rewards


def tdpo_loss(
    chosen_logps_margin: torch.Tensor,
    rejected_logps_margin: torch.Tensor,
    chosen_position_kl: torch.Tensor,
    rejected_position_kl: torch.Tensor,
    beta: float,
    alpha: float = 0.5,
    if_tdpo2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TDPO loss per pair (TDPO1 by default, as the research code; `if_tdpo2=True` for TDPO2).

    `*_position_kl` is the sequential KL D_SeqKL(x, y; pi_ref || pi_theta) of one response: the sum
    over its positions of KL(pi_ref(.|x, y_<t) || pi_theta(.|x, y_<t)).
    Shape: every input (B,) -> losses, chosen_rewards, rejected_rewards, each (B,). Rewards are detached.
    """
    # the research code's "values": log-ratio plus the sequential KL of the same response
    chosen_values = chosen_logps_margin + chosen_position_kl
    rejected_values = rejected_logps_margin + rejected_position_kl
    # u / beta = log pi_theta(y_w)/pi_ref(y_w) - log pi_theta(y_l)/pi_ref(y_l) (Sec. 4, the DPO term u)
    chosen_rejected_logps_margin = chosen_logps_margin - rejected_logps_margin
    if not if_tdpo2:
        # L_TDPO1 = -log sigma(u - delta), delta = beta * (D_SeqKL(y_l) - D_SeqKL(y_w))
        logits = chosen_rejected_logps_margin - (rejected_position_kl - chosen_position_kl)
    else:
        # L_TDPO2 = -log sigma(u - alpha * delta_2), delta_2 = beta * D_SeqKL(y_l) - sg(beta * D_SeqKL(y_w)):
        # the stop-gradient keeps the chosen response's KL from being pushed up
        logits = chosen_rejected_logps_margin - alpha * (rejected_position_kl - chosen_position_kl.detach())
    losses = -F.logsigmoid(beta * logits)
    chosen_rewards = beta * chosen_values.detach()
    rejected_rewards = beta * rejected_values.detach()
    return losses, chosen_rewards, rejected_rewards


def with_chosen_nll(losses: torch.Tensor, chosen_nll: torch.Tensor, alpha: float) -> torch.Tensor:
    """A preference loss plus alpha x the chosen response's NLL, per pair (RPO, Pang et al. 2024, arXiv
    2404.19733: L_DPO + alpha * L_NLL, the form of TRL's `rpo_alpha`; `chosen_nll` is the mean
    per-token negative log-likelihood of the chosen response).
    Shape: losses (B,), chosen_nll (B,) -> (B,).
    """
    return losses + alpha * chosen_nll


def sequential_kl(ref_logprobs: torch.Tensor, policy_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(pi_ref || pi_theta) at each position, from log-probabilities (outputs of `log_softmax`).

    sum_v p_ref(v) * (log p_ref(v) - log p_theta(v)), with p_ref = exp(log p_ref). Terms where p_ref
    is exactly 0 (underflow, or a -inf log-prob) count 0, as 0 * log 0 = 0 in the limit; the research
    code's `softmax().log()` made them 0 * -inf = NaN (its defect #5).
    Shape: ref_logprobs (..., V), policy_logprobs (..., V) -> (...).
    """
    ref_probs = ref_logprobs.exp()
    # mask the difference, not the product, so no NaN reaches the backward pass either
    diff = torch.where(ref_probs > 0, ref_logprobs - policy_logprobs, torch.zeros_like(ref_logprobs))
    return (ref_probs * diff).sum(-1)


def weighted_sum(values: torch.Tensor, weights: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum over positions of values * weights, or the weighted mean when `average`.

    A position of weight 0 contributes exactly 0, even where its value is inf or NaN. The mean
    divides by the weight sum itself, never clamped to 1 (weights are floats, a row may weigh 0.3 in
    all); a row whose weights sum to <= 0 gives exactly 0, not NaN.
    Shape: values (N, T), weights (N, T) -> (N,).
    """
    weighted = torch.where(weights != 0, values * weights, torch.zeros_like(values))
    total = weighted.sum(-1)
    if not average:
        return total
    weight_sum = weights.sum(-1)
    has_weight = weight_sum > 0
    # divide by 1 where there is no weight, so neither the value nor its gradient can be inf or NaN
    safe_sum = torch.where(has_weight, weight_sum, torch.ones_like(weight_sum))
    return torch.where(has_weight, total / safe_sum, torch.zeros_like(total))

"""Each training objective in one place: what it needs (a reference, the KL) and what it logs.

The trainer asks the objective, never `if loss == ...`: `objective.needs_reference`,
`objective.needs_kl`, `objective(stats, n_pairs, split) -> (losses, metrics)`. Metrics carry the
research code's names, definitions and signs, one value per example (pair):

- `rewards_{split}/chosen`, `/rejected`: the loss's implicit rewards (DPO: beta * log-ratio; TDPO:
  beta * (log-ratio + sequential KL)); `/accuracies`: 1 where chosen > rejected; `/margins`: chosen - rejected.
- `kl_{split}/chosen`, `/rejected`: the sequential KL(reference || policy) of each response, logged for DPO
  too, as the research code did (not when the reference's log-probs were precomputed: no reference
  runs); `/margin`: chosen - rejected.
- `logps_{split}/chosen`, `/rejected`: the policy's weighted log-probs; `loss/{split}`: the per-pair loss.
- `nll_{split}/chosen`: with `loss.nll_alpha` > 0, the chosen response's mean per-token NLL (RPO's term).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from granular_po.data.masks import GranularOptions
from granular_po.losses import LossType, dpo_loss, sft_loss, tdpo_loss, with_chosen_nll
from granular_po.settings import DPOLoss, LogprobsSettings, PreferenceLoss, TDPOLoss, TrainConfig
from granular_po.stats import TokenStats


@dataclass(frozen=True)
class LossSettings:
    """The loss and how token statistics are computed (from `loss.*`, `logprobs.*`, `skip_nonfinite`),
    flat for the trainer. Defaults are the typed settings' (`granular_po.settings`), not repeated here."""

    loss: LossType
    beta: float = PreferenceLoss.beta
    alpha: float = TDPOLoss.alpha
    if_tdpo2: bool = TDPOLoss.if_tdpo2
    label_smoothing: float = DPOLoss.label_smoothing
    reference_free: bool = PreferenceLoss.reference_free
    average_log_prob: bool = PreferenceLoss.average_log_prob
    logprobs_impl: str = LogprobsSettings.impl
    chunk_size: int = LogprobsSettings.chunk_size
    skip_nonfinite: bool = TrainConfig.skip_nonfinite
    kl_weights: str = GranularOptions.kl_weights
    nll_alpha: float = PreferenceLoss.nll_alpha

    @classmethod
    def from_config(cls, config: TrainConfig, loss: LossType) -> LossSettings:
        """The run's loss keys (a key the chosen loss does not have keeps its default, unused)."""
        outside = {"loss", "logprobs_impl", "chunk_size", "skip_nonfinite", "kl_weights"}
        keys = {f.name for f in fields(cls)} - outside
        given = {k: getattr(config.loss, k) for k in keys if getattr(config.loss, k, None) is not None}
        return cls(loss=loss, logprobs_impl=config.logprobs.impl, chunk_size=config.logprobs.chunk_size,
                   skip_nonfinite=config.skip_nonfinite, kl_weights=config.granular.kl_weights, **given)

    @property
    def needs_reference(self) -> bool:
        """Whether a live reference model runs (not for SFT, nor reference-free preference losses)."""
        return self.loss.needs_reference and not self.reference_free

    @property
    def kl_over_all_tokens(self) -> bool:
        """Whether TDPO's KL weighs every response token 1 (`granular.kl_weights=all`); DPO's KL is only
        logged and keeps the margin's weights (no head on extra positions for a metric)."""
        return self.kl_weights == "all" and self.loss.needs_kl

    @property
    def adds_nll(self) -> bool:
        """Whether the chosen response's NLL joins the preference loss (`loss.nll_alpha` > 0)."""
        return self.nll_alpha > 0 and self.loss.is_preference

    def statistic_weights(self, batch: dict) -> dict[str, torch.Tensor]:
        """The weights beyond the margin's that the statistics need (`kl_weights`, `nll_weights`: 1 on every
        response token, the NLL's on the chosen rows [0:B] only), from the batch's `response_mask`; {} with
        the defaults. Shape: each (N, T) float."""
        if not (self.kl_over_all_tokens or self.adds_nll):
            return {}
        if "response_mask" not in batch:
            raise ValueError("granular.kl_weights=all and loss.nll_alpha need the batch's response_mask "
                             "(PreferenceCollator)")
        response = batch["response_mask"].to(batch["loss_weights"].dtype)  # (2B, T)
        out = {"kl_weights": response} if self.kl_over_all_tokens else {}
        if self.adds_nll:
            chosen = torch.arange(response.shape[0], device=response.device) < response.shape[0] // 2
            out["nll_weights"] = response * chosen[:, None]
        return out


Metrics = dict[str, torch.Tensor]


def _reward_metrics(chosen_r: torch.Tensor, rejected_r: torch.Tensor, stats: TokenStats, n: int,
                    split: str) -> Metrics:
    return {
        f"rewards_{split}/chosen": chosen_r,
        f"rewards_{split}/rejected": rejected_r,
        f"rewards_{split}/accuracies": (chosen_r > rejected_r).float(),
        f"rewards_{split}/margins": chosen_r - rejected_r,
        f"logps_{split}/chosen": stats.policy_logps[:n].detach(),
        f"logps_{split}/rejected": stats.policy_logps[n:].detach(),
    }


def sft_objective(settings: LossSettings, stats: TokenStats, n: int, split: str) -> tuple[torch.Tensor, Metrics]:
    """Negative weighted log-likelihood of the correct responses. Shape: stats fields (B,). Also the two
    parts of the per-token NLL (`per_token_nll`), the figure TRL's SFT loss reports."""
    logps = stats.policy_logps.detach()
    summed = logps * stats.weight_sum if settings.average_log_prob else logps  # (B,) weighted sums
    return sft_loss(stats.policy_logps), {f"logps_{split}/chosen": logps, f"nll_{split}/_sum": -summed,
                                          f"nll_{split}/_weight": stats.weight_sum.detach().float()}


def per_token_nll(logs: dict[str, float], split: str) -> dict[str, float]:
    """`nll_per_token/{split}`: the NLL summed over the logged examples' weighted tokens over their weight
    (TRL's SFT loss: a mean over tokens, not over sequences), from the means of its two parts, which are
    removed from `logs` (their means are over the same examples, so their ratio is the ratio of sums)."""
    total, weight = logs.pop(f"nll_{split}/_sum", None), logs.pop(f"nll_{split}/_weight", None)
    if total is None or weight is None:
        return {}
    return {f"nll_per_token/{split}": total / weight if weight > 0 else float("nan")}


def _kl_metrics(kl: torch.Tensor | None, n: int, split: str) -> Metrics:
    if kl is None:
        return {}
    kl = kl.detach()
    return {f"kl_{split}/chosen": kl[:n], f"kl_{split}/rejected": kl[n:], f"kl_{split}/margin": kl[:n] - kl[n:]}


def dpo_objective(settings: LossSettings, stats: TokenStats, n: int, split: str) -> tuple[torch.Tensor, Metrics]:
    """DPO on weighted sequence log-ratios. Rows [0:n] chosen, [n:2n] rejected. The KL, when there is
    one, is only logged."""
    margin = stats.logratio
    losses, chosen_r, rejected_r = dpo_loss(margin[:n], margin[n:], settings.beta, settings.label_smoothing)
    return losses, {**_reward_metrics(chosen_r, rejected_r, stats, n, split),
                    **_kl_metrics(stats.position_kl, n, split)}


def tdpo_objective(settings: LossSettings, stats: TokenStats, n: int, split: str) -> tuple[torch.Tensor, Metrics]:
    """TDPO1 / TDPO2 (`if_tdpo2`) on weighted log-ratios and sequential KL."""
    margin, kl = stats.logratio, stats.position_kl
    losses, chosen_r, rejected_r = tdpo_loss(margin[:n], margin[n:], kl[:n], kl[n:], settings.beta,
                                             settings.alpha, settings.if_tdpo2)
    return losses, {**_reward_metrics(chosen_r, rejected_r, stats, n, split), **_kl_metrics(kl, n, split)}


OBJECTIVES = {LossType.SFT: sft_objective, LossType.DPO: dpo_objective, LossType.TDPO: tdpo_objective}


def compute_objective(settings: LossSettings, stats: TokenStats, n_pairs: int, split: str
                      ) -> tuple[torch.Tensor, Metrics]:
    """Per-example losses (B,) and metrics of the configured objective (plus RPO's NLL term when asked)."""
    losses, metrics = OBJECTIVES[settings.loss](settings, stats, n_pairs, split)
    if settings.adds_nll:
        chosen_nll = stats.nll[:n_pairs]
        losses = with_chosen_nll(losses, chosen_nll, settings.nll_alpha)
        metrics[f"nll_{split}/chosen"] = chosen_nll.detach()
    return losses, metrics

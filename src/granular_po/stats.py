"""Per-sequence token statistics: weighted log-probs, log-ratios and TDPO's sequential KL.

The target at position t is `input_ids[:, t]`, predicted from `hidden[:, t - 1]`, and weighs
`loss_weights[:, t]` (so `loss_weights[:, 0]` is never used: nothing predicts the first token).
Two implementations give the same numbers:

- "naive":   the lm_head on every position, a full (N, T, V) log_softmax, gather. The reference.
- "chunked": only positions with a non-zero weight go through the lm_head, `chunk_size` rows at a
             time: no (N, T, V) tensor is ever built and no chunk's (rows, V) logits outlive it.
             With a plain `nn.Linear` head a custom autograd function (`_FusedHeadStats`) keeps
             only each row's log-normaliser and, in backward, recomputes the chunk's logits once
             and forms their gradient in place; other heads (or `fused=False`, for weights sharded
             by FSDP / DeepSpeed) run each chunk under activation checkpointing instead.

The module is longer than most (about 440 lines) on purpose: the naive, chunked and fused paths must
give the same numbers, and reading them side by side is how that is kept true.

Log-probabilities are computed in float32 (float64 stays float64) whatever the model dtype, as the
research code did.
Models whose logits are not just `head(last_hidden_state)` (soft-capping, logit scales) take the
`compute_token_stats_from_logits` route instead: see `forward.hidden.supports_hidden_path`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from granular_po.losses import sequential_kl, weighted_sum
from granular_po.settings import LogprobsSettings

Head = Callable[[torch.Tensor], torch.Tensor]
Impl = Literal["chunked", "naive"]


@dataclass
class TokenStats:
    """Weighted per-sequence statistics (sums, or weighted means when `average`), in float32 or wider.

    Shape: every field (N,). `reference_logps` and `logratio` are None without a reference (and
    not reference-free); `position_kl` is None unless asked for (`need_kl`), reduced with the KL's own
    weights where given (`kl_weights`), else with the margin's; `nll` is None unless `nll_weights` are
    given: the weighted mean negative log-likelihood under them (RPO's term). Reference-free, the
    reference gives every response the same probability: `reference_logps` is 0 and `logratio` is
    `policy_logps` (DPO's reference implementation, TRL); `position_kl` is against the uniform
    distribution over the vocabulary, the only per-token reference that assigns no preference.
    """

    policy_logps: torch.Tensor
    reference_logps: torch.Tensor | None
    logratio: torch.Tensor | None
    position_kl: torch.Tensor | None
    weight_sum: torch.Tensor
    nll: torch.Tensor | None = None


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 (and integer weights) to float32; float32 and float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _row_stats(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor | None,
    targets: torch.Tensor,
    need_kl: bool,
    reference_free: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Target log-probs under policy and reference, and KL(ref || policy), for independent rows.

    Shape: policy_logits (R, V), ref_logits (R, V) or None, targets (R,) -> three (R,) or None.
    """
    policy_lp = _upcast(policy_logits).log_softmax(-1)  # (R, V)
    # drop the (R, V) logits as soon as they are used: with the KL this chunk otherwise holds two more
    # vocabulary-sized tensors at its peak (the callers pass them without keeping a reference)
    del policy_logits
    policy_tok = policy_lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ref_tok = kl = None
    if reference_free:
        # no per-token reference log-prob (the response-level one is 0, see `_finish`); the KL is
        # against the uniform distribution: sum_v (1/V) (-log V - log p_theta(v))
        if need_kl:
            kl = -math.log(policy_lp.shape[-1]) - policy_lp.mean(-1)
    elif ref_logits is not None:
        ref_lp = _upcast(ref_logits).log_softmax(-1)
        del ref_logits
        ref_tok = ref_lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if need_kl:
            kl = sequential_kl(ref_lp, policy_lp)
    return policy_tok, ref_tok, kl


def _check_inputs(policy_hidden, ref_hidden, input_ids, loss_weights, need_kl, reference_free, impl,
                  extra_weights=()):
    if impl not in ("chunked", "naive"):
        raise ValueError(f"impl must be 'chunked' or 'naive', got {impl!r}")
    if policy_hidden.shape[:2] != input_ids.shape or loss_weights.shape != input_ids.shape:
        raise ValueError(
            f"shape mismatch: hidden {tuple(policy_hidden.shape)}, input_ids {tuple(input_ids.shape)}, "
            f"loss_weights {tuple(loss_weights.shape)}"
        )
    for name, extra in extra_weights:
        if extra is not None and extra.shape != input_ids.shape:
            raise ValueError(f"{name} {tuple(extra.shape)} does not match input_ids {tuple(input_ids.shape)}")
    if ref_hidden is not None and ref_hidden.shape[:2] != input_ids.shape:
        raise ValueError(
            f"ref_hidden {tuple(ref_hidden.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    if need_kl and ref_hidden is None and not reference_free:
        raise ValueError("need_kl needs a reference (ref_hidden) or reference_free=True")


def _finish(per_pos: dict[str, torch.Tensor | None], weights: torch.Tensor, average: bool,
            reference_free: bool = False, kl_weights: torch.Tensor | None = None,
            nll_weights: torch.Tensor | None = None) -> TokenStats:
    """Weighted reduction of per-position values: the margin's weights, the KL's (`kl_weights`, else the
    margin's) and the NLL's (a weighted mean, always). Shape: each value and weights (N, T-1)."""
    reduce = functools.partial(weighted_sum, weights=weights, average=average)
    policy = reduce(per_pos["policy"])
    ref = None if per_pos["ref"] is None else reduce(per_pos["ref"])
    if reference_free:  # every response equally likely: a reference log-ratio of 0 (DPO reference code, TRL)
        ref = torch.zeros_like(policy)
    kl_w = weights if kl_weights is None else kl_weights
    kl = None if per_pos["kl"] is None else weighted_sum(per_pos["kl"], kl_w, average=average)
    nll = None if nll_weights is None else -weighted_sum(per_pos["policy"], nll_weights, average=True)
    return TokenStats(
        policy_logps=policy,
        reference_logps=ref,
        logratio=None if ref is None else policy - ref,
        position_kl=kl,
        weight_sum=weights.sum(-1),
        nll=nll,
    )


def _naive(policy_hidden, policy_head, ref_hidden, ref_head, input_ids, weights, need_kl, reference_free):
    """Full logits on every position; the textbook computation the fast path is tested against."""
    n, t1 = weights.shape
    logits = policy_head(policy_hidden[:, :-1])  # (N, T-1, V)
    ref_logits = None
    if ref_hidden is not None and not reference_free:
        with torch.no_grad():
            ref_logits = ref_head(ref_hidden[:, :-1])
            ref_logits = ref_logits.reshape(n * t1, -1)
    policy, ref, kl = _row_stats(
        logits.reshape(n * t1, -1), ref_logits, input_ids[:, 1:].reshape(-1), need_kl, reference_free
    )
    per_pos = {
        "policy": policy.view(n, t1),
        "ref": None if ref is None else ref.view(n, t1),
        "kl": None if kl is None else kl.view(n, t1),
    }
    return per_pos


def _chunk_stats(policy_rows, ref_rows, targets, *, policy_head, ref_head, need_kl, reference_free):
    """One chunk: head, log_softmax, gather (and KL). Run under checkpoint, so recomputed in backward."""
    # no local name holds the logits, so `_row_stats` can free each (R, V) tensor once it is used
    return _row_stats(
        policy_head(policy_rows),
        None if ref_rows is None else _constant_head(ref_head, ref_rows),
        targets,
        need_kl,
        reference_free,
    )


def _constant_head(head: Head, rows: torch.Tensor) -> torch.Tensor:
    """The reference's logits, a constant even when it shares the policy's head module. Shape: (R, V)."""
    with torch.no_grad():
        return head(rows)


def _ref_target_logps(ref_rows, ref_head, targets) -> torch.Tensor:
    """Reference log-prob of each target (no KL needed, so no grad and no checkpoint). Shape: (R,)."""
    with torch.no_grad():
        lp = _upcast(ref_head(ref_rows)).log_softmax(-1)
        return lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product without an (R, V) temporary, in the inputs' dtype (float32): under autocast
    `bmm` would run in bf16 and round each of the V products. Shape: (R, V), (R, V) -> (R,)."""
    try:
        guard = torch.autocast(a.device.type, enabled=False)
    except (RuntimeError, ValueError):  # a device type autocast does not know: nothing to switch off
        guard = contextlib.nullcontext()
    with guard:
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def fusable_head(head: Head | None) -> bool:
    """Whether `head` is a plain `nn.Linear` with ordinary (not sharded / distributed) weights."""
    if not isinstance(head, nn.Linear):
        return False
    return all(type(p) in (nn.Parameter, torch.Tensor) and not hasattr(p, "ds_id")
               for p in (head.weight, head.bias) if p is not None)


def _autocast_state(device: str) -> tuple[str, bool, torch.dtype | None]:
    """(device type, autocast on?, its dtype); off for device types autocast does not know."""
    try:
        return device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    except (RuntimeError, ValueError):
        return device, False, None


class _FusedHeadStats(torch.autograd.Function):
    """Target log-probs and KL(ref || policy) of a chunk of rows, straight from hidden rows and the
    head's weights. Nothing vocabulary-sized is kept between forward and backward (only each row's
    log-normaliser): backward recomputes the chunk's logits once and builds their gradient in place,
    d/dz = g_tok (onehot - softmax) + g_kl (softmax - p_ref), rather than replaying the whole forward
    under autograd as activation checkpointing does (fewer (R, V) passes and allocations).
    Shape: rows (R, H), weight (V, H), bias (V,) or None, targets (R,) -> token, kl, ref_token (R,)
    (kl and ref_token zeros unless need_kl with a reference; ref_token is a constant).
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, ref_rows, ref_weight, ref_bias, need_kl, uniform_ref):
        # backward recomputes the logits under the same autocast state (as torch.amp.custom_bwd does)
        ctx.autocast = _autocast_state(rows.device.type)
        logits = _upcast(nn.functional.linear(rows, weight, bias))  # (R, V)
        target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        log_probs = logits.log_softmax(-1)
        del logits
        token = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (R,)
        kl = torch.zeros_like(token)
        ref_token = torch.zeros_like(token)
        if need_kl and uniform_ref:
            kl = -math.log(log_probs.shape[-1]) - log_probs.mean(-1)
        elif need_kl:
            ref_lp = _upcast(nn.functional.linear(ref_rows, ref_weight, ref_bias)).log_softmax(-1)
            ref_token = ref_lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            # sum_v p_ref (log p_ref - log p): log p_ref is finite for finite logits, so 0 * it is 0
            kl = _rowdot(ref_lp.exp(), ref_lp.sub_(log_probs))
            del ref_lp
        del log_probs
        ctx.need_kl, ctx.uniform_ref = need_kl, uniform_ref
        # an output the loss does not use (DPO logs the KL only) gets None, not zeros: its terms are skipped
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(rows, weight, bias, targets, ref_rows, ref_weight, ref_bias, target_logit - token)
        ctx.mark_non_differentiable(ref_token)
        return token, kl, ref_token

    @staticmethod
    def backward(ctx, grad_token, grad_kl, _grad_ref_token):
        device, enabled, dtype = ctx.autocast
        try:
            guard = torch.autocast(device, dtype=dtype, enabled=True) if enabled else torch.autocast(device, enabled=False)
        except (RuntimeError, ValueError):  # a device type autocast does not know: nothing to restore
            guard = contextlib.nullcontext()
        with guard:
            return _FusedHeadStats._backward(ctx, grad_token, grad_kl)

    @staticmethod
    def _backward(ctx, grad_token, grad_kl):
        rows, weight, bias, targets, ref_rows, ref_weight, ref_bias, lse = ctx.saved_tensors
        _device, autocast_on, dtype = ctx.autocast
        kl_used = ctx.need_kl and grad_kl is not None
        grad_token = torch.zeros_like(lse) if grad_token is None else grad_token.to(lse.dtype)
        grad_kl = grad_kl.to(lse.dtype) if kl_used else torch.zeros_like(lse)
        # softmax of the recomputed logits, in place: exp(z - lse)
        grad_logits = _upcast(nn.functional.linear(rows, weight, bias)).sub_(lse.unsqueeze(-1)).exp_()
        grad_logits.mul_((grad_kl - grad_token).unsqueeze(-1))  # softmax x (g_kl - g_tok)
        if kl_used and ctx.uniform_ref:
            grad_logits.sub_((grad_kl / grad_logits.shape[-1]).unsqueeze(-1))
        elif kl_used:
            ref_probs = _upcast(nn.functional.linear(ref_rows, ref_weight, ref_bias)).softmax(-1)
            grad_logits.addcmul_(ref_probs, grad_kl.unsqueeze(-1), value=-1.0)
            del ref_probs
        grad_logits.scatter_add_(-1, targets.unsqueeze(-1), grad_token.unsqueeze(-1))
        # the matmuls in the forward's precision (under autocast: the autocast dtype)
        grad_logits = grad_logits.to(dtype if autocast_on else rows.dtype)
        grad_rows = (grad_logits @ weight).to(rows.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad_logits.t() @ rows).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_bias = grad_logits.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_rows, grad_weight, grad_bias, None, None, None, None, None, None


def _chunked(
    policy_hidden, policy_head, ref_hidden, ref_head, input_ids, weights, need_kl, reference_free, chunk_size,
    fused=True, weighted_positions=None,
):
    """Only weighted positions, `chunk_size` rows at a time: through `_FusedHeadStats` where the heads
    are plain linear layers (and `fused`), otherwise each chunk under activation checkpointing.
    `weights` is the (N, T-1) mask of positions any statistic weighs (margin, KL or NLL)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n, t1 = weights.shape
    t = t1 + 1
    if weighted_positions is None:  # a data-dependent shape: the device reports the count (a sync)
        seq, pos = torch.nonzero(weights, as_tuple=True)  # target at (seq, pos + 1)
    else:
        seq, pos = weighted_positions[0], weighted_positions[1]
    hidden_rows = seq * t + pos  # row of hidden[:, :-1] predicting it, in the flattened (N*T, H) view
    targets = input_ids[:, 1:][seq, pos]
    policy_flat = policy_hidden.reshape(n * t, -1)
    policy_rows = policy_flat.index_select(0, hidden_rows)  # (R, H): only the weighted positions
    ref_rows = None
    if ref_hidden is not None and not reference_free:
        ref_rows = ref_hidden.detach().reshape(n * t, -1).index_select(0, hidden_rows)

    fn = functools.partial(
        _chunk_stats,
        policy_head=policy_head,
        ref_head=ref_head,
        need_kl=need_kl,
        reference_free=reference_free,
    )
    use_ckpt = torch.is_grad_enabled()
    kl_ref = need_kl and ref_rows is not None
    fuse = fused and fusable_head(policy_head) and (not kl_ref or fusable_head(ref_head))
    outs: list[tuple] = []
    # with no weighted position at all, one empty chunk still ties the (zero) result to the graph
    for start in range(0, max(targets.shape[0], 1), chunk_size):
        sl = slice(start, start + chunk_size)
        # the KL needs the reference logits inside the chunk; otherwise the reference is gathered apart
        ref_chunk = ref_rows[sl] if kl_ref else None
        if fuse:
            ref_w, ref_b = (ref_head.weight, ref_head.bias) if kl_ref else (None, None)
            policy, kl, ref = _FusedHeadStats.apply(
                policy_rows[sl], policy_head.weight, policy_head.bias, targets[sl], ref_chunk,
                None if ref_w is None else ref_w.detach(), None if ref_b is None else ref_b.detach(),
                need_kl, reference_free,
            )  # fmt: skip
            if not kl_ref:
                ref = None
            kl = kl if need_kl else None
        else:
            args = (policy_rows[sl], ref_chunk, targets[sl])
            policy, ref, kl = checkpoint(fn, *args, use_reentrant=False) if use_ckpt else fn(*args)
        if ref is None and ref_rows is not None:
            ref = _ref_target_logps(ref_rows[sl], ref_head, targets[sl])
        outs.append((policy, ref, kl))

    def scatter(k: int) -> torch.Tensor | None:
        if outs[0][k] is None:
            return None
        values = torch.cat([o[k] for o in outs])  # (R,)
        return torch.zeros(n, t1, device=values.device, dtype=values.dtype).index_put((seq, pos), values)

    return {"policy": scatter(0), "ref": scatter(1), "kl": scatter(2)}


def compute_token_stats(
    policy_hidden: torch.Tensor | None,
    policy_head: Head | None,
    ref_hidden: torch.Tensor | None,
    ref_head: Head | None,
    input_ids: torch.Tensor,
    loss_weights: torch.Tensor,
    need_kl: bool = False,
    average: bool = False,
    *,
    policy_logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    reference_free: bool = False,
    impl: Impl = LogprobsSettings.impl,
    chunk_size: int = LogprobsSettings.chunk_size,
    fused: bool = True,
    weighted_positions: torch.Tensor | None = None,
    kl_weights: torch.Tensor | None = None,
    nll_weights: torch.Tensor | None = None,
) -> TokenStats:
    """Weighted per-sequence log-probs, log-ratios and sequential KL from final hidden states.

    `ref_hidden` is treated as a constant; `ref_head` is called on it whenever the reference logits
    are needed (also in backward), so it must give the reference's logits at any time.
    `reference_free`: no reference model; a reference log-ratio of 0 and, for the KL, the uniform
    distribution over the head's V outputs (see `TokenStats`). `fused=False` keeps the
    chunked path on activation checkpointing (for heads whose weights are sharded: FSDP, DeepSpeed).
    `kl_weights` (N, T): the KL's own weights (TDPO's sequential KL over other tokens than the margin's,
    `granular.kl_weights=all`); None: the KL is reduced with `loss_weights`. `nll_weights` (N, T): adds
    `nll`, the weighted mean NLL under them (`loss.nll_alpha`). The chunked path then runs the head on
    every position any of the three weighs; `weighted_positions` (2, R), when given, must list them all.
    Given `policy_logits`
    (and `ref_logits`) instead of hidden states and heads, this is `compute_token_stats_from_logits`.
    Shape: policy_hidden (N, T, H), ref_hidden (N, T, H) or None, input_ids (N, T) long,
    loss_weights (N, T) float, policy_logits / ref_logits (N, T, V) -> TokenStats of (N,) tensors.
    """
    if policy_logits is not None:
        if policy_hidden is not None or ref_hidden is not None:
            raise ValueError("give hidden states and heads, or logits, not both")
        policy_hidden, policy_head = policy_logits, _identity
        ref_hidden, ref_head = (None, None) if ref_logits is None else (ref_logits.detach(), _identity)
    elif policy_hidden is None or policy_head is None:
        raise ValueError("policy_hidden and policy_head (or policy_logits) are required")
    if ref_hidden is not None and ref_head is None:
        raise ValueError("ref_hidden given without ref_head")
    _check_inputs(policy_hidden, ref_hidden, input_ids, loss_weights, need_kl, reference_free, impl,
                  (("kl_weights", kl_weights), ("nll_weights", nll_weights)))
    weights = _upcast(loss_weights[:, 1:])  # weight of the target at t, predicted from hidden t-1
    kl_w = None if kl_weights is None or not need_kl else _upcast(kl_weights[:, 1:])
    nll_w = None if nll_weights is None else _upcast(nll_weights[:, 1:])
    args = (policy_hidden, policy_head, ref_hidden, ref_head, input_ids)
    if impl == "naive":
        per_pos = _naive(*args, weights, need_kl, reference_free)
    else:
        used = weights != 0  # (N, T-1): every position a statistic weighs goes through the head
        for extra in (kl_w, nll_w):
            used = used if extra is None else used | (extra != 0)
        per_pos = _chunked(*args, used, need_kl, reference_free, chunk_size, fused, weighted_positions)
    return _finish(per_pos, weights, average, reference_free, kl_w, nll_w)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def compute_token_stats_from_logits(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor | None,
    input_ids: torch.Tensor,
    loss_weights: torch.Tensor,
    need_kl: bool = False,
    average: bool = False,
    *,
    reference_free: bool = False,
    impl: Impl = LogprobsSettings.impl,
    chunk_size: int = LogprobsSettings.chunk_size,
) -> TokenStats:
    """The same statistics from a model's own logits (models `supports_hidden_path` rejects).

    "chunked" reads only weighted positions and runs the log_softmax in checkpointed row chunks.
    Shape: policy_logits (N, T, V), ref_logits (N, T, V) or None, input_ids (N, T),
    loss_weights (N, T) -> TokenStats of (N,) tensors.
    """
    return compute_token_stats(
        None, None, None, None, input_ids, loss_weights, need_kl, average,
        policy_logits=policy_logits, ref_logits=ref_logits, reference_free=reference_free,
        impl=impl, chunk_size=chunk_size,
    )  # fmt: skip

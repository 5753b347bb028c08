"""Start-up checks that a faster route gives a model's own numbers (`padding_free`, `share_prompt`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


@torch.no_grad()
def measure_difference(model: nn.Module, run_two_ways: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                       ) -> tuple[float, float]:
    """Run `run_two_ways() -> (expected, got)` in eval mode (the model's mode is restored after).

    Returns the max |expected - got| over the max |expected|, and the tolerance for the model's
    dtype (1e-4 in float32 / float64, 2e-2 in half precision).
    """
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        expected, got = run_two_ways()
    finally:
        model.train(was_training)
    expected, got = expected.float(), got.float()
    error = (expected - got).abs().max().item() / max(expected.abs().max().item(), 1e-6)
    tolerance = 1e-4 if param.dtype in (torch.float32, torch.float64) else 2e-2
    return error, tolerance


def require_same_outputs(
    model: nn.Module,
    run_two_ways: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    *,
    key: str,
    what: str,
    route: str,
    cannot: tuple[type[Exception], ...] = (TypeError,),
) -> None:
    """Refuse (ValueError naming the config `key`) a model that fails `run_two_ways` with one of `cannot`,
    or whose two outputs differ beyond `measure_difference`'s tolerance. `route` says what was tried,
    e.g. "packed sequences"; `what` names the model's role ("policy", "reference")."""
    from granular_po.forward.hidden import unwrap_model

    name = type(unwrap_model(model)).__name__
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    try:
        error, tolerance = measure_difference(model, run_two_ways)
    except cannot as exc:
        raise ValueError(f"{key}=true: the {what} model ({name}) cannot run {route} ({exc}); "
                         f"set {key}=false") from exc
    if not error <= tolerance:
        raise ValueError(
            f"{key}=true: the {what} model ({name}) gives different outputs on {route} (attention "
            f"{attention or '?'}; max relative difference {error:.2e} > {tolerance:g}); set {key}=false"
        )


def materialised(model: nn.Module) -> bool:
    """Whether this process holds the model's weights (not on the meta device of sharded loading)."""
    param = next(model.parameters(), None)
    return param is not None and param.device.type != "meta"

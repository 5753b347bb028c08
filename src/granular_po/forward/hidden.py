"""Model introspection for the hidden-state route: the backbone's final hidden states and the lm_head,
without a (N, T, V) logits tensor, through any DDP / PEFT wrapper.

`supports_hidden_path` says, from the config, whether logits are exactly `head(last_hidden_state)`;
where they are not (soft-capping, logit scales) the trainer takes the full-logits route instead.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from granular_po.forward.packing import PackedBatch

# config fields that put a transform between the lm_head and the logits (Gemma 2/3 soft-capping,
# Cohere's logit_scale, Granite's logits_scaling, Falcon-H1's lm_head_multiplier, ...)
_LOGIT_TRANSFORM_FIELDS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP / DataParallel and PEFT wrappers (LoRA layers stay injected)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    if hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
        model = model.get_base_model()
    return model


def _backbone(model: nn.Module) -> nn.Module | None:
    base = unwrap_model(model)
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if backbone is None and callable(getattr(base, "get_decoder", None)):
        backbone = base.get_decoder()
    return None if backbone is base else backbone


def supports_hidden_path(model: nn.Module) -> bool:
    """Whether logits are exactly `get_output_embeddings()(backbone's last_hidden_state)`, by config.

    False for soft-capped or scaled logits, a missing backbone or head, or a forward without
    `logits_to_keep`; then use `model(...).logits` with `compute_token_stats_from_logits`.
    """
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    if config is None or _backbone(model) is None or base.get_output_embeddings() is None:
        return False
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return False
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for field in _LOGIT_TRANSFORM_FIELDS:
        value = getattr(text_config, field, None)
        if value is not None and not (field != "final_logit_softcapping" and value == 1.0):
            return False
    return True


def forward_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, nn.Module]:
    """Final hidden states (after the final norm) and the lm_head, without the (N, T, V) logits.

    Runs the model's own forward, through any DDP / PEFT wrapper so their hooks fire, with
    `logits_to_keep=1` (one position of logits per row), and captures the backbone's output.
    Shape: input_ids, attention_mask, position_ids (N, T) -> hidden (N, T, H).
    """
    extra = {} if position_ids is None else {"position_ids": position_ids}
    hidden, _ = capture_backbone_output(
        model, input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1, **extra
    )
    # prompt-learning PEFT prepends virtual tokens: keep the positions of the real ones
    hidden = hidden[:, -input_ids.shape[1] :]
    return hidden, unwrap_model(model).get_output_embeddings()


def capture_backbone_output(model: nn.Module, **forward_kwargs) -> tuple[torch.Tensor, object]:
    """Run `model(**forward_kwargs)` (through its wrappers, so their hooks fire) and return the
    backbone's final hidden states (after the final norm) with the model's own output.

    Shape: -> hidden (N, T, H).
    """
    backbone = _backbone(model)
    if backbone is None:
        raise ValueError(f"cannot find the backbone of {type(unwrap_model(model)).__name__}")
    captured: list[torch.Tensor] = []

    def grab(_module, _args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = backbone.register_forward_hook(grab)
    try:
        output = model(**forward_kwargs)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one backbone call, saw {len(captured)}")
    return captured[0], output


@torch.no_grad()
def hidden_path_matches(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, atol: float = 1e-4
) -> bool:
    """Runtime check of `supports_hidden_path`: head(forward_hidden) equals model(...).logits.

    Shape: input_ids (N, T), attention_mask (N, T).
    """
    hidden, head = forward_hidden(model, input_ids, attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return torch.allclose(head(hidden).float(), logits.float(), atol=atol, rtol=1e-3)


def hidden_states_and_head(model, input_ids, attention_mask, use_hidden_path: bool,
                           packed: PackedBatch | None = None):
    """`(hidden (N, T, H), head, None)` without full logits, or `(None, None, logits (N, T, V))`.

    With `packed`, the model runs on the packed real tokens and the outputs come back padded.
    """
    position_ids = None
    if packed is not None:
        input_ids, attention_mask, position_ids = packed.input_ids, None, packed.position_ids
    if not use_hidden_path:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits
        return None, None, logits if packed is None else packed.unpack(logits)
    hidden, head = forward_hidden(model, input_ids, attention_mask, position_ids=position_ids)
    return (hidden if packed is None else packed.unpack(hidden)), head, None

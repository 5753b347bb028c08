"""Which precision a run trains in: one decision from the config and the device's capabilities.

The standard recipe, and the default: fp32 master weights with autocast (bf16 on a CUDA device that
has it, fp16 with loss scaling on one that does not). The reference is held in the policy's weight dtype
and runs under the same autocast, so before the first update it computes exactly what the policy computes
(log-ratios, rewards and TDPO's KL start at 0). A reference in the autocast dtype (half the memory) only
when asked for (`model.reference_dtype=bfloat16`): it is a rounded copy of the starting policy, whose
offset the start-up block measures and names (`reference_offset`). On CPU everything stays fp32 (bf16 autocast on a CPU without bf16
instructions runs over 20x slower than fp32). Pure low-precision weights only when asked for
(`model.policy_dtype=bfloat16`), with a warning: an optimizer update smaller than half a bf16 step of
its weight rounds away (at lr 5e-6 with Adam-sized steps, nearly every weight above ~1e-3 stops moving).

    from granular_po.training.precision import DeviceCaps, choose_precision
    precision = choose_precision("float32", None, "auto", DeviceCaps.detect())
    precision.policy_dtype, precision.reference_dtype, precision.autocast   # float32, float32, "bf16"

`choose_precision` reads no global state (the device is passed in), so every branch is testable on CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from granular_po.settings import MIXED_PRECISION_MODES

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# research-code spelling of FSDP's mixed precision (`model.fsdp_policy_mp`) -> ours
_FSDP_MP = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}

LOST_UPDATE_WARNING = (
    "model.policy_dtype={dtype} trains {dtype} weights with no fp32 master copy: an optimizer update "
    "smaller than half a {short} step of its weight is lost (a weight of 1e-2 has a bf16 spacing of about "
    "6e-5, so at lr 5e-6 with Adam-sized steps most updates round away and training silently stalls). "
    "Keep model.policy_dtype=float32 for mixed precision (autocast over fp32 master weights)"
)


@dataclass(frozen=True)
class DeviceCaps:
    """What the training device can do: its type ("cuda", "cpu", ...) and whether it runs bf16."""

    type: str
    bf16: bool

    @classmethod
    def detect(cls) -> DeviceCaps:
        if torch.cuda.is_available():
            return cls("cuda", bool(torch.cuda.is_bf16_supported()))
        return cls("cpu", False)


@dataclass(frozen=True)
class Precision:
    """The decision: dtypes to load the policy and reference in, and the Trainer's autocast.

    `autocast` "bf16" / "fp16" sets `TrainingArguments(bf16=...)` / `(fp16=...)` (fp16 brings
    Accelerate's loss scaler); None: no autocast. `pure` names pure low-precision weights.
    """

    policy_dtype: torch.dtype
    reference_dtype: torch.dtype
    autocast: str | None
    pure: bool = False

    @property
    def training_arguments(self) -> dict[str, bool]:
        return {"bf16": self.autocast == "bf16", "fp16": self.autocast == "fp16"}

    def describe(self) -> str:
        """One line for the start-up log."""
        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        weights = f"{name[self.policy_dtype]} weights" + (" (no fp32 master copy)" if self.pure else "")
        mixed = f", {self.autocast} autocast" if self.autocast else ""
        scaler = " with loss scaling" if self.autocast == "fp16" else ""
        return f"precision: {weights}{mixed}{scaler}; reference in {name[self.reference_dtype]}"


def _dtype(name: str | torch.dtype | None, key: str) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if str(name) not in DTYPES:
        raise ValueError(f"{key}={name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[str(name)]


def choose_precision(policy_dtype: str | torch.dtype | None, reference_dtype: str | torch.dtype | None,
                     mixed_precision: str, device: DeviceCaps, fsdp_policy_mp: str | None = None) -> Precision:
    """The run's precision from `model.policy_dtype`, `model.reference_dtype` (None: follow the policy's
    compute dtype), `mixed_precision` (auto | bf16 | fp16 | no) and, under FSDP, `model.fsdp_policy_mp`.

    auto: bf16 autocast on CUDA with bf16, fp16 autocast (loss scaling) on CUDA without, none on CPU.
    Raises ValueError for a combination that cannot train (pure fp16 weights: no loss scaling).
    """
    mode = str(mixed_precision).lower()
    if mode not in MIXED_PRECISION_MODES:
        raise ValueError(f"mixed_precision={mixed_precision!r}: expected one of {MIXED_PRECISION_MODES}")
    if fsdp_policy_mp is not None:  # the research code's FSDP key says the same thing, where FSDP runs
        if str(fsdp_policy_mp) not in _FSDP_MP:
            raise ValueError(f"model.fsdp_policy_mp={fsdp_policy_mp!r}: expected one of {sorted(_FSDP_MP)}")
        implied = _FSDP_MP[str(fsdp_policy_mp)]
        if mode not in ("auto", implied):
            raise ValueError(f"model.fsdp_policy_mp={fsdp_policy_mp} asks for {implied} but "
                             f"mixed_precision={mode}: set one of them")
        mode = implied
    policy = _dtype(policy_dtype, "model.policy_dtype") or torch.float32
    reference = _dtype(reference_dtype, "model.reference_dtype")
    if mode == "auto":
        mode = ("bf16" if device.bf16 else "fp16") if device.type == "cuda" else "no"
    if mode == "bf16" and device.type == "cuda" and not device.bf16:
        raise ValueError("mixed_precision=bf16: this GPU has no bf16 support; use fp16 (or auto)")
    if mode == "fp16" and device.type != "cuda":
        raise ValueError(f"mixed_precision=fp16 needs a CUDA device (loss scaling), not {device.type}")

    if policy == torch.float16:
        if device.type != "cuda":  # float16 does not run on CPU: load in float32 (as `runnable_dtype` does)
            logger.warning("model.policy_dtype=float16 cannot run on %s: using float32", device.type)
            policy = torch.float32
        else:
            raise ValueError("model.policy_dtype=float16: pure fp16 weights train without loss scaling "
                             "(gradients underflow); use policy_dtype=float32 with mixed_precision=fp16")
    if policy == torch.bfloat16 and device.type == "cuda" and not device.bf16:
        logger.warning("model.policy_dtype=bfloat16: this GPU has no bf16 support; using float32")
        policy = torch.float32
    pure = policy != torch.float32
    autocast = None if pure or mode == "no" else mode
    if pure:
        logger.warning(LOST_UPDATE_WARNING.format(dtype="bfloat16", short="bf16"))
    elif autocast == "bf16" and device.type == "cpu":
        logger.warning("notice: mixed_precision=bf16 on CPU: correct, but far slower than fp32 on CPUs "
                       "without bf16 instructions")
    if reference is None:  # the starting policy itself: the same weights run the same way (under the autocast)
        reference = policy
    if reference == torch.float16 and device.type != "cuda":
        reference = torch.float32
    return Precision(policy_dtype=policy, reference_dtype=reference, autocast=autocast, pure=pure)

"""The typed settings of a training run: every key, its type, its default and its help, written once.

Each group is a dataclass; `training/config.py` registers them as Hydra structured configs behind the
YAML files of `granular_po/config/`, so a wrong type or an unknown key fails at composition, and
`granular-po train --help` prints these defaults with the attribute docstrings below as help lines.
The core (recipe, models, resources, trainer) receives these objects, never a `DictConfig`.

This module sits below `models`, `forward` and `training` (which all read it) and imports nothing
heavy (no torch), so a bad key is refused in the first second. The tokenisation keys and the
`granular` group are the data layer's own option classes (`EncodeOptions`, `GranularOptions`): their
defaults and docstrings serve here as they are.
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass, field, fields, is_dataclass
from functools import cache
from typing import Any, Optional

from omegaconf import MISSING

from granular_po.data.encode import EncodeOptions
from granular_po.data.masks import GranularOptions

# the embedded default model (SmolLM2-135M-Instruct, no network), the model preset `smollm2-135m`
DEFAULT_MODEL_NAME = "smollm2-135m"

# the choices of `mixed_precision` (decided at start-up by `training/precision.py`)
MIXED_PRECISION_MODES = ("auto", "bf16", "fp16", "no")

# Fields say `Optional[X]` (not `X | None`) as OmegaConf's own documentation does.


@dataclass
class ModelSettings:
    """The model group (`model=<file in config/model>`): which weights, in which precision."""

    name_or_path: str = MISSING
    """Hub id, local Hugging Face directory, or `smollm2-135m` (the embedded default, no network)."""
    tokenizer_name_or_path: Optional[str] = None
    """Tokenizer to use; null: the model's own."""
    archive: Optional[str] = None
    """Stage-1 output (HF directory, run `LATEST`, or research-code policy.pt) loaded into policy AND reference."""
    block_name: Optional[str] = None
    """The transformer block class FSDP wraps (e.g. LlamaDecoderLayer, GPT2Block)."""
    policy_dtype: str = "float32"
    """float32 (the master weights under mixed precision: see `mixed_precision`) or bfloat16 (pure bf16
    weights, warned about: updates smaller than half a bf16 step of a weight are lost); float16 loads as
    float32 on CPU and is refused on a GPU (no loss scaling for fp16 weights)."""
    fsdp_policy_mp: Optional[str] = None
    """FSDP mixed precision (bfloat16 / float16 / float32); applies to trainer=FSDPTrainer only, where it
    means the same as `mixed_precision` (bf16 / fp16 / no)."""
    reference_dtype: Optional[str] = None
    """dtype of the reference model; null: the policy's weight dtype, run under the same autocast, so at step 0
    it computes exactly what the policy computes. bfloat16 / float16 halve its memory but make it a rounded
    copy (log-ratios, rewards and KL start off 0: measured and named at start-up)."""


@dataclass
class LossConfig:
    """The loss group (`loss=sft|dpo|tdpo`): the objective and its keys."""

    name: str = MISSING
    """sft, dpo or tdpo (set by choosing the group: `loss=dpo`)."""


@dataclass
class SFTLoss(LossConfig):
    """Stage 1: negative (weighted) log-likelihood of the correct response."""

    name: str = "sft"


@dataclass
class PreferenceLoss(LossConfig):
    """Keys shared by the preference losses."""

    beta: float = 0.1
    """Temperature of the implicit reward; lower means the reference matters less. Must be > 0."""
    reference_free: bool = False
    """No reference model: one that gives every response the same probability, so the reference log-ratio
    is 0 (DPO's logit is beta * (log pi(y_w) - log pi(y_l)), as in DPO's reference code and TRL); TDPO's
    sequential KL, which needs a distribution, is taken against the uniform one over the vocabulary."""
    average_log_prob: bool = False
    """Weighted means instead of weighted sums of token log-probs."""
    nll_alpha: float = 0.0
    """Adds alpha x the chosen response's mean per-token NLL, over all its tokens whatever their weights, to
    each pair's loss (RPO, Pang et al. 2024, arXiv 2404.19733; TRL's rpo_alpha); logged as nll_*/chosen.
    > 0 runs the lm_head on every chosen response position. 0: off."""


@dataclass
class DPOLoss(PreferenceLoss):
    """Direct Preference Optimisation (Rafailov et al. 2023)."""

    name: str = "dpo"
    label_smoothing: float = 0.0
    """Conservative DPO: the assumed probability that a pair's preference label is flipped."""
    alpha: Optional[float] = field(default=None, metadata={"no_effect": "the TDPO KL weight"})
    """No effect on DPO (a TDPO key); accepted, with a notice, because the research code's dpo.yaml had it."""


@dataclass
class TDPOLoss(PreferenceLoss):
    """Token-level DPO (Zeng et al. 2024, arXiv 2404.11999)."""

    name: str = "tdpo"
    alpha: float = 0.5
    """Weight of the sequential KL term in TDPO2."""
    if_tdpo2: bool = False
    """false: TDPO1 (the research code's default, kept); true: TDPO2."""


LOSS_GROUPS: dict[str, type[LossConfig]] = {"sft": SFTLoss, "dpo": DPOLoss, "tdpo": TDPOLoss}


@dataclass
class WandbSettings:
    """Weights & Biases logging (through transformers' integration)."""

    enabled: bool = False
    """Log to wandb; off by default: the machine may be offline (the research code had it on)."""
    entity: Optional[str] = None
    """wandb entity (team or user); null: your default."""
    project: str = "granular-po"
    """wandb project."""


@dataclass
class LogprobsSettings:
    """How token statistics are computed (new)."""

    impl: str = "chunked"
    """chunked: weighted positions only, no full logits tensor; naive: full logits (for reference)."""
    chunk_size: int = 256
    """Rows of hidden states sent through the lm_head at a time (chunked)."""


@dataclass
class LoraSettings:
    """LoRA through peft (new); the reference is the base model with the adapters disabled."""

    enabled: bool = False
    """Train LoRA adapters instead of all weights. Checkpoints hold the adapter, which names its base; with
    a model.archive applied in memory (policy.pt) that base is written once as <run>/base/."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """LoRA scaling numerator (lora_alpha)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: Any = "all-linear"
    """Modules to adapt: `all-linear` or a list of module names (never lm_head)."""
    merge_on_save: bool = False
    """Also write `merged/`, the base model with the adapter folded in, at the end."""


@dataclass
class ColumnSettings:
    """Field (column) names of datasets=[ours] where the data names them otherwise (new); null: ours."""

    prompt: Optional[str] = None
    """The prompt's field (ours: prompt)."""
    chosen: Optional[str] = None
    """The correct response's field (ours: correct_response, correct or chosen)."""
    rejected: Optional[str] = None
    """The incorrect response's field (ours: incorrect_response, incorrect or rejected)."""
    regions: Optional[str] = None
    """The field of the list of [start, end, flag] regions (ours: masked_regions, or masked_region for one)."""


@dataclass
class TrainConfig(EncodeOptions):
    """A training run. Keys of the research code (TDPO's granular fork) keep their meaning; the rest are
    new. The tokenisation keys (max_length, max_prompt_length, prompt_format, truncation_mode) come from
    `EncodeOptions`."""

    model: ModelSettings = field(default_factory=ModelSettings)
    loss: LossConfig = MISSING
    seed: int = 0
    """Random seed for initialisation AND data order (the research code never seeded the data order)."""
    exp_name: str = "granular_po_run"
    """Name of this experiment; the run directory is <local_dirs[0]>/<exp_name>."""
    batch_size: int = 4
    """Examples per optimizer step, over all processes and accumulation steps."""
    eval_batch_size: int = 16
    """Examples per evaluation batch."""
    debug: bool = False
    """Train and log, but save nothing (no run directory)."""
    fsdp_port: Optional[int] = None
    """Port for the distributed rendezvous (trainer=FSDPTrainer); null: accelerate picks one."""
    datasets: list[str] = field(default_factory=lambda: ["ours"])
    """Datasets to train on: ours (custom_*_path files), hh, shp, se (hub, needs network)."""
    custom_train_path: Optional[str] = None
    """Records {prompt, correct_response, incorrect_response, masked_region(s)}: a JSON / JSONL, parquet or CSV
    file, a save_to_disk directory (DIR:split for a DatasetDict), or a hub dataset id org/name:split."""
    custom_eval_path: Optional[str] = None
    """Evaluation data, the same formats; null: no evaluation."""
    columns: ColumnSettings = field(default_factory=ColumnSettings)
    wandb: WandbSettings = field(default_factory=WandbSettings)
    report_to: Any = None
    """Loggers, as Trainer's report_to: none, wandb, tensorboard, mlflow, ... or a list ([tensorboard,wandb]);
    null: wandb when wandb.enabled=true, else none. wandb in it uses wandb.project / wandb.entity."""
    local_dirs: list[str] = field(default_factory=lambda: [".cache/runs"])
    """Directories to place the run directory under; the first that exists (or can be made) is used."""
    sample_during_eval: bool = False
    """Generate policy (and reference) samples for eval prompts at each evaluation (samples.jsonl)."""
    n_eval_model_samples: int = 16
    """How many eval prompts to sample from."""
    do_first_eval: bool = True
    """Evaluate before the first step."""
    lr: float = 5e-6
    """Learning rate (the granular fork's default)."""
    gradient_accumulation_steps: int = 1
    """Split each batch of batch_size into this many sequential micro-batches."""
    max_grad_norm: float = 10.0
    """Clip the gradient norm to this."""
    n_epochs: int = 1
    """Passes over the training data."""
    n_examples: Optional[int] = None
    """If set, train on this many examples (overrides n_epochs)."""
    n_eval_examples: Optional[int] = 256
    """Evaluate on this many eval examples (null: all)."""
    trainer: str = "BasicTrainer"
    """BasicTrainer: one process; FSDPTrainer: FSDP over all visible GPUs (through Accelerate);
    TensorParallelTrainer: accepted for the research code's commands, runs one process here."""
    optimizer: str = "SGD"
    """Any torch.optim class name (SGD is the granular fork's default)."""
    weight_decay: Optional[float] = None
    """Weight decay of every trainable parameter (biases and norms too, as the research code's one parameter
    group); null: the optimizer class's own default, as the research code's `AdamW(params, lr=lr)` had
    (AdamW 0.01, SGD / Adam / RMSprop 0)."""
    warmup_steps: int = 150
    """Linear warmup steps, as the research code: lr * min(1, (step + 1) / (warmup_steps + 1))."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, more time)."""
    eval_every: int = 20000
    """Evaluate every this many training examples."""
    minimum_log_interval_secs: float = 1.0
    """Print metrics to the console at most this often (metrics.jsonl gets every step)."""
    granular: GranularOptions = field(default_factory=GranularOptions)
    on_invalid: str = "error"
    """A bad record: error (stop, naming file, record and field) or skip (count and name it); with granular
    on, a pair where no region of a response reaches a token is bad too."""
    resume: str = "auto"
    """Resume from the newest complete checkpoint in the run directory: auto (when one exists), true, false."""
    save_every: Optional[int] = None
    """Save a checkpoint every this many training examples (null: at evaluation time, as the research code)."""
    save_total_limit: Optional[int] = 2
    """Checkpoints kept besides the one LATEST points to (always kept): the newest N others (0: LATEST's
    only; null: all). A checkpoint being written is never removed; the start-up block says one's size."""
    push_to_hub: bool = False
    """At the end, upload the final model (LATEST, or merged/ with lora.merge_on_save) with its model card
    to the Hugging Face Hub (network; your `huggingface-cli login`). The card is written locally either way."""
    hub_model_id: Optional[str] = None
    """Hub repository for push_to_hub (`name` under your account, or `org/name`); null: exp_name."""
    mixed_precision: str = "auto"
    """Autocast over fp32 master weights (new): auto = bf16 on a CUDA GPU with bf16, fp16 with loss scaling
    on one without, none on CPU (bf16 autocast on a CPU without bf16 instructions is over 20x slower);
    or bf16, fp16, no. Decided once at start-up (`training/precision.py`) and logged."""
    skip_nonfinite: bool = False
    """On a non-finite loss or gradient norm: stop (false), or skip the step and count it (true). Checked
    once per optimizer step; with several processes decided for all of them together (one all-reduce), so
    every process skips (or stops at) the same step. The count is kept in the checkpoint."""
    logprobs: LogprobsSettings = field(default_factory=LogprobsSettings)
    group_by_length: bool = True
    """Group batches by length (seeded; every record still once per epoch)."""
    padding_free: bool = False
    """Run the models on the real tokens only (packed, positions restarting at 0); checked against the
    padded forward at start-up, a model whose outputs differ is refused."""
    share_prompt: str = "auto"
    """DPO / TDPO: one prompt forward for chosen and rejected (a key/value cache). auto: where it gives
    the same numbers (checked at start-up; chunked log-probs, no activation checkpointing, no FSDP)."""
    precompute_ref_log_probs: bool = False
    """DPO only: compute the reference's log-probs once over the dataset and cache them under cache_dir,
    kept across runs and keyed on content (the reference's weights, not their path; the encoded data;
    every setting that changes the numbers): other weights under the same path are recomputed."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    trust_remote_code: bool = False
    """Allow custom modelling code from the hub (it runs arbitrary code)."""
    num_proc: int = 1
    """Processes for tokenisation (datasets.map)."""
    cache_dir: Optional[str] = None
    """Cache for tokenised data and the converted default model (null: ~/.cache/granular_po)."""
    local_run_dir: Optional[str] = None
    """The run directory itself, instead of <local_dirs[0]>/<exp_name> (the research code's key)."""

    def encode_options(self) -> EncodeOptions:
        """The tokenisation keys as the data layer's options."""
        return EncodeOptions(**{f.name: getattr(self, f.name) for f in fields(EncodeOptions)})


# ---------------------------------------------------------------- help lines


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (and its bases), one line each: `{field: help}`."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(inspect.getsource(klass).strip())
        except (OSError, TypeError):  # no source (frozen app): no help lines
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs

"""What `bench/step.py` runs: the configurations, how they are grouped, and the issue's targets."""

from __future__ import annotations

# name -> what the worker runs; "kind" picks the worker in workloads.py. Ours use the shipped config's
# logprobs.chunk_size unless "chunk_size" is given.
CONFIGS = {
    "trl-dpo": {"label": "TRL DPOTrainer", "kind": "trl"},
    "dpo": {"label": "DPO", "kind": "ours", "loss": "dpo", "impl": "chunked", "granular": False},
    "tdpo": {"label": "TDPO chunked", "kind": "ours", "loss": "tdpo", "impl": "chunked", "granular": False},
    "tdpo-gran": {"label": "TDPO chunked, granular", "kind": "ours", "loss": "tdpo", "impl": "chunked",
                  "granular": True},
    "tdpo-naive": {"label": "TDPO naive", "kind": "ours", "loss": "tdpo", "impl": "naive", "granular": False},
    "sft": {"label": "SFT", "kind": "ours", "loss": "sft", "impl": "chunked", "granular": False},
    "tdpo-naive-gran": {"label": "TDPO naive, granular", "kind": "ours", "loss": "tdpo", "impl": "naive",
                        "granular": True},
    "dpo-loop": {"label": "DPO, optimizer loop (before)", "kind": "ours", "loss": "dpo", "impl": "chunked",
                 "granular": False, "optimizer_loop": True},
    "dpo-1024": {"label": "DPO, chunk_size=1024", "kind": "ours", "loss": "dpo", "impl": "chunked",
                "granular": False, "chunk_size": 1024},
    "tdpo-1024": {"label": "TDPO chunked, chunk_size=1024", "kind": "ours", "loss": "tdpo", "impl": "chunked",
                 "granular": False, "chunk_size": 1024},
    # issue 21: what each objective option costs against today's granular TDPO2
    "tdpo2-gran": {"label": "TDPO2 chunked, granular", "kind": "ours", "loss": "tdpo", "impl": "chunked",
                   "granular": True, "overrides": ["loss.if_tdpo2=true"]},
    "tdpo-klall": {"label": "TDPO2 chunked, granular, kl_weights=all", "kind": "ours", "loss": "tdpo",
                   "impl": "chunked", "granular": True,
                   "overrides": ["loss.if_tdpo2=true", "granular.kl_weights=all"]},
    "tdpo-nll": {"label": "TDPO2 chunked, granular, nll_alpha=1", "kind": "ours", "loss": "tdpo",
                 "impl": "chunked", "granular": True, "overrides": ["loss.if_tdpo2=true", "loss.nll_alpha=1"]},
    "tdpo-rejected": {"label": "TDPO2 chunked, granular, sides=rejected", "kind": "ours", "loss": "tdpo",
                      "impl": "chunked", "granular": True,
                      "overrides": ["loss.if_tdpo2=true", "granular.sides=rejected"]},
    "tdpo-drop": {"label": "TDPO2 chunked, granular, after_first_error=drop", "kind": "ours", "loss": "tdpo",
                  "impl": "chunked", "granular": True,
                  "overrides": ["loss.if_tdpo2=true", "granular.after_first_error=drop"]},
}  # fmt: skip
# issue 21's objective options, each timed against "tdpo2-gran" (today's granular TDPO2): config -> the key
OPTION_CONFIGS = {"tdpo-klall": "granular.kl_weights=all", "tdpo-nll": "loss.nll_alpha=1",
                  "tdpo-rejected": "granular.sides=rejected", "tdpo-drop": "granular.after_first_error=drop"}

# The processes of a group run side by side, taking turns step by step, so a burst of load from
# elsewhere lands on all of them alike; groups run one after another, and a configuration that runs in
# two groups (TDPO chunked, the anchor) carries the ratios from one group to the next. Each group
# holds what the targets compare. Waiting processes keep their models and allocator caches (about
# 4.5 GiB each for SmolLM2-135M at this batch), the one in its step its full peak: at most three a group.
# (TDPO naive runs alone: its time is compared with nothing the targets name, its memory needs no pairing.)
DEFAULT_GROUPS = [["trl-dpo", "dpo", "tdpo"], ["tdpo", "tdpo-gran", "sft"], ["tdpo-naive"]]
# run last, and only while the projected end stays inside --budget-min
# (the objective options: at most three a group, each group with its own tdpo2-gran, so every ratio to it is
# taken side by side)
OPTIONAL_GROUPS = [["dpo-1024", "tdpo-1024"], ["tdpo2-gran", "tdpo-klall", "tdpo-nll"],
                   ["tdpo2-gran", "tdpo-rejected", "tdpo-drop"]]
QUICK_GROUPS = [["trl-dpo", "dpo", "tdpo"], ["tdpo", "tdpo-gran", "sft"]]
MICRO_CHUNK = 1024  # the logits micro-benchmark also runs at this chunk size (the tradeoff)

# issue 7's targets, checked against the measured ratios
TARGETS = {
    "dpo_throughput": 1.3,  # our DPO tokens/s >= 1.3 x TRL's DPOTrainer
    "tdpo_time": 1.2,  # TDPO chunked s/step <= 1.2 x our DPO's
    "tdpo_memory": 1.1,  # TDPO chunked peak <= 1.1 x our DPO's
    "logits_memory": 4.0,  # the chunked logits-related peak >= 4 x below naive
    "granular_cheaper": 0.95,  # "measurably cheaper": at least 5% less time per step than all weights 1
}
# issue 14's targets on the SmolLM2-1.7B shape on one GPU (bench/gpu_check.sh); throughput as above (1.3x)
GPU_TARGETS = {"dpo_memory": 0.7, "tdpo_time": 1.15, "tdpo_memory": 1.05}
OTHER_LOAD_WARNING = 0.25  # cores used by other processes during a row's timed steps: above this, say so

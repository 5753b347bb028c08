"""The matmul-FLOP ceiling of what our preference step saves against TRL's, from a model's config alone.

    python bench/flops.py                                  # the embedded SmolLM2-135M, the bench's workloads
    python bench/flops.py --model /tmp/smollm2-1.7b --prompt 64 --response 960

TRL's DPO step runs the body and the lm_head over prompt + response for both responses (policy forward
and backward, reference forward). Ours runs the body over each prompt once and the two responses
(`share_prompt`), and the head over response positions only. Counting 2 FLOPs per parameter and token
forward (twice that backward) gives the speed-up our step could reach if matmuls were all there is:
what the measured ratio should be compared with. Attention scores and elementwise work are left out
(TRL's full-vocabulary logits and their log-softmax, which grow with the row, are what the count misses).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# the bench's workloads: (prompt tokens, response tokens) of an average pair
WORKLOADS = {"short": (10, 45), "256-token rows": (64, 192)}


def parameter_counts(config: dict) -> tuple[int, int]:
    """(decoder body's matmul parameters, lm_head's) of a Llama-shaped config."""
    hidden, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    attention = 2 * hidden * config["num_attention_heads"] * head_dim + 2 * hidden * kv * head_dim
    mlp = 3 * hidden * config["intermediate_size"]
    return layers * (attention + mlp), hidden * vocab


def forward_flops(body: int, head: int, prompt: int, response: int, ours: bool) -> float:
    """Matmul FLOPs of one pair's forward (chosen and rejected)."""
    if ours:
        return 2 * body * (prompt + 2 * response) + 2 * head * (2 * response)
    return 2 * body * 2 * (prompt + response) + 2 * head * 2 * (prompt + response)


def ceiling(config: dict, prompt: int, response: int) -> tuple[float, float, float]:
    """(TRL's, ours GFLOP a pair's forward, TRL / ours). Forward, backward and the reference forward all
    scale with the same forward count, so the ratio of one forward is the ratio of the step."""
    body, head = parameter_counts(config)
    trl, ours = (forward_flops(body, head, prompt, response, o) for o in (False, True))
    return trl / 1e9, ours / 1e9, trl / ours


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model directory (default: the embedded SmolLM2-135M, converted)")
    parser.add_argument("--prompt", type=int, help="prompt tokens (default: the bench's workloads)")
    parser.add_argument("--response", type=int, help="response tokens")
    args = parser.parse_args(argv)
    if args.model is None:
        from granular_po.default_model import resolve_model_path

        args.model = resolve_model_path("smollm2-135m")
    config = json.loads((Path(args.model) / "config.json").read_text())
    body, head = parameter_counts(config)
    print(f"{args.model}: body {body / 1e6:.1f} M, lm_head {head / 1e6:.1f} M matmul parameters")
    workloads = ({f"{args.prompt} + {args.response}": (args.prompt, args.response)}
                 if args.prompt is not None and args.response is not None else WORKLOADS)
    print("| workload | prompt | response | TRL GFLOP / pair forward | ours | ceiling of ours / TRL |")
    print("|---|---|---|---|---|---|")
    for name, (prompt, response) in workloads.items():
        trl, ours, ratio = ceiling(config, prompt, response)
        print(f"| {name} | {prompt} | {response} | {trl:.1f} | {ours:.1f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

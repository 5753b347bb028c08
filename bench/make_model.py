"""A random-weight model of a given shape with the embedded SmolLM2 tokenizer: no download needed.

    python bench/make_model.py --shape smollm2-1.7b --out /tmp/smollm2-1.7b   # ~3.4 GB (bf16 safetensors)
    python bench/make_model.py --shape tiny --out /tmp/tiny                    # for the CPU dry run

SmolLM2-1.7B's shape is written out from its published config (hidden 2048, 24 layers, 32 heads, MLP
8192, tied embeddings); its tokenizer is SmolLM2's (49152 tokens), the one the embedded SmolLM2-135M
ships, so the step costs what the real model's step costs. Weights are random (the benchmark times
steps; it learns nothing). Built on the GPU when there is one (seconds instead of a minute on a CPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

SHAPES = {
    # HuggingFaceTB/SmolLM2-1.7B's config.json (architecture keys)
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, max_position_embeddings=8192, rope_theta=130000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
    # a few MB: the same code paths in seconds on a CPU
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=True),
}


def make_model(shape: str, out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from granular_po.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("smollm2-135m"))
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         attention_dropout=0.0, **SHAPES[shape])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # bf16 on disk: loaded as fp32 master weights
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"{shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters -> {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-1.7b")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    make_model(args.shape, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

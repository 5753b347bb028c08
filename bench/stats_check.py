"""Chunked against naive token statistics in mixed precision: values, gradients and peak memory.

    python bench/stats_check.py --device cuda --rows 8 --seq-len 1024 --hidden 2048 --vocab 49152
    python bench/stats_check.py --device cpu --rows 4 --seq-len 32 --hidden 64 --vocab 49152   # dry run

As training runs them under `mixed_precision=bf16`: bf16 hidden states, the policy's lm_head in fp32
(the master weights) under bf16 autocast, the reference's hidden states and lm_head in bf16 (held in
bf16 for inference). TDPO's statistics (log-ratio and sequential KL, every response position weighted),
forward and backward, through `compute_token_stats` with impl=naive and impl=chunked. Both are compared
with the same computation in float64 (the chunked path in float64, which the tests pin equal to naive):
the relative error of each statistic and of the gradients of the hidden states and the head's weight.
Peak memory: `torch.cuda.max_memory_allocated` above the inputs (CUDA only). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from granular_po.stats import compute_token_stats


def inputs(rows: int, seq_len: int, hidden: int, vocab: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden": (torch.randn(rows, seq_len, hidden, generator=g)).to(device),  # (N, T, H)
        "ref_hidden": (torch.randn(rows, seq_len, hidden, generator=g)).to(device),
        "head": (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device),  # (V, H)
        "ref_head": (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device),
        "ids": torch.randint(0, vocab, (rows, seq_len), generator=g).to(device),
        "weights": (torch.arange(seq_len) >= seq_len // 4).float().expand(rows, -1).contiguous().to(device),
    }


def run(data: dict, impl: str, precision: str, chunk_size: int) -> dict:
    """One forward + backward; returns the statistics, the gradients, seconds and peak memory."""
    device = data["hidden"].device
    wide = precision == "fp64"
    dtype = torch.float64 if wide else torch.bfloat16
    hidden = data["hidden"].to(dtype).requires_grad_(True)
    head = torch.nn.Linear(*data["head"].shape[::-1], bias=False).to(device)
    head.weight.data = data["head"].to(torch.float64 if wide else torch.float32)  # master weights: fp32
    ref_head = torch.nn.Linear(*data["ref_head"].shape[::-1], bias=False).to(device).requires_grad_(False)
    ref_head.weight.data = data["ref_head"].to(dtype)  # the reference held in bf16
    ref_hidden = data["ref_hidden"].to(dtype)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not wide):
        stats = compute_token_stats(hidden, head, ref_hidden, ref_head, data["ids"], data["weights"], need_kl=True,
                                    impl=impl, chunk_size=chunk_size)
    (stats.logratio.sum() + stats.position_kl.sum()).backward()
    if cuda:
        torch.cuda.synchronize()
    out = {
        "seconds": time.perf_counter() - start,
        "peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None,
        "logratio": stats.logratio.detach().double(), "position_kl": stats.position_kl.detach().double(),
        "policy_logps": stats.policy_logps.detach().double(),
        "grad_hidden": hidden.grad.double(), "grad_head": head.weight.grad.double(),
    }
    del stats, hidden, head
    return out


def relative_error(a: torch.Tensor, truth: torch.Tensor) -> float:
    return float((a - truth).norm() / truth.norm().clamp(min=1e-30))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    data = inputs(args.rows, args.seq_len, args.hidden, args.vocab, device)
    truth = run(data, "chunked", "fp64", 1024)
    fields = ("policy_logps", "logratio", "position_kl", "grad_hidden", "grad_head")
    results = {}
    for impl in ("naive", "chunked"):
        r = run(data, impl, "bf16", args.chunk_size)
        results[impl] = {"seconds": r["seconds"], "peak_mib": r["peak_mib"],
                         **{f: relative_error(r[f], truth[f]) for f in fields}}
    print(f"Token statistics in bf16 autocast ({args.device}): TDPO's log-ratio and KL on {args.rows} rows x "
          f"{args.seq_len} positions, H = {args.hidden}, V = {args.vocab}; relative error against float64, "
          f"peak memory above the inputs")
    print()
    print("| path | " + " | ".join(fields) + " | peak memory (MiB) | seconds |")
    print("|---" * (len(fields) + 3) + "|")
    for impl, r in results.items():
        label = impl if impl == "naive" else f"chunked ({args.chunk_size})"
        peak = "n/a (CPU)" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(f"| {label} | " + " | ".join(f"{r[f]:.1e}" for f in fields) + f" | {peak} | {r['seconds']:.2f} |")
    worse = [f for f in fields if results["chunked"][f] > 2 * results["naive"][f] + 1e-6]
    print()
    print("chunked no less accurate than naive: " + ("yes" if not worse else f"NO ({', '.join(worse)})"))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Padded vs padding-free (`padding_free=true`) forward + backward on variable-length pairs.

    python bench/packing.py                    # SmolLM2-135M, 4 pairs a batch, 3 batches per row (~3.5 min)
    python bench/packing.py --model /path/to/hf-dir --batches 5

`bench/step.py` trains on rows of exactly 256 tokens, where there is no padding to remove. Real
preference data is not like that: prompts and the two responses differ in length, and a batch is
padded to its longest row. This measures what packing the real tokens saves there, on DPO's work
per micro-batch (policy forward + backward and the reference forward over chosen + rejected rows,
token statistics from the hidden states), for batches drawn at random (as TRL draws them) and
batches grouped by length (our sampler's default). Lengths: prompts 16-96 tokens, each response
8-160, drawn uniformly (seed 0). The three layouts (padded, packed into rows of at most the batch's length T, packed into one
row) take turns batch by batch; the figure is the median. No optimizer step (it is the same either way).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--pairs", type=int, default=4, help="pairs per batch (rows: twice this)")
    p.add_argument("--batches", type=int, default=3, help="batches timed per configuration")
    p.add_argument("--pool", type=int, default=64, help="pairs drawn; batches are taken from these")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "packing.md"), help="write the table here")
    return p.parse_args(argv)


def draw_pairs(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    rng = random.Random(seed)

    def ids(k: int) -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(k)]

    return [(ids(rng.randint(16, 96)), ids(rng.randint(8, 160)), ids(rng.randint(8, 160))) for _ in range(n)]


def batches(pairs, per_batch: int, grouped: bool, count: int) -> list[list[int]]:
    """Pair indices per batch: a seeded random order, or our length-grouped sampler's order."""
    from granular_po.training.sampler import SeededLengthGroupedSampler

    lengths = [len(p) + max(len(c), len(r)) for p, c, r in pairs]
    order = SeededLengthGroupedSampler(lengths, group_size=per_batch, seed=0, group_by_length=grouped).order(0)
    return [order[i : i + per_batch] for i in range(0, per_batch * count, per_batch)]


def collate(pairs, indices, pad_id: int) -> dict:
    from granular_po.data.collate import PreferenceCollator

    features = [{"prompt_ids": pairs[i][0], "chosen_ids": pairs[i][1], "rejected_ids": pairs[i][2],
                 "chosen_weights": [1.0] * len(pairs[i][1]), "rejected_weights": [1.0] * len(pairs[i][2]),
                 "index": i} for i in indices]
    return PreferenceCollator(pad_token_id=pad_id)(features)


def step(policy, reference, batch, packed) -> float:
    """DPO's forward + backward on one micro-batch; returns seconds."""
    import torch

    from granular_po.forward.hidden import hidden_states_and_head
    from granular_po.losses import dpo_loss
    from granular_po.stats import compute_token_stats

    ids, mask, weights = batch["input_ids"], batch["attention_mask"], batch["loss_weights"]
    start = time.perf_counter()
    hidden, head, _ = hidden_states_and_head(policy, ids, mask, True, packed)
    with torch.no_grad():
        ref_hidden, ref_head, _ = hidden_states_and_head(reference, ids, mask, True, packed)
    stats = compute_token_stats(hidden, head, ref_hidden, ref_head, ids, weights)
    n = ids.shape[0] // 2
    losses, _, _ = dpo_loss(stats.logratio[:n], stats.logratio[n:], 0.1)
    losses.mean().backward()
    policy.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from granular_po.forward.packing import attention_cost, check_packing, pack_batch
    from granular_po.models import load_model, load_tokenizer, resolve_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    policy = load_model(path, "float32", device="cpu").train()
    reference = load_model(path, "float32", device="cpu").eval().requires_grad_(False)
    check_packing(policy, "policy")
    cost = attention_cost(policy)
    pairs = draw_pairs(args.pool, len(tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    started = time.time()
    step(policy, reference, collate(pairs, list(range(args.pairs)), pad_id), None)  # warm-up
    for grouped in (False, True):
        seconds = {"padded": [], "rows": [], "one row": []}
        tokens = {"padded": 0, "rows": 0, "one row": 0}
        real = 0
        shapes = {"padded": [], "rows": [], "one row": []}
        for indices in batches(pairs, args.pairs, grouped, args.batches):
            batch = collate(pairs, indices, pad_id)
            layouts = {"padded": None,
                       "rows": pack_batch(batch["input_ids"], batch["attention_mask"], pad_id, attention_cost=cost),
                       "one row": pack_batch(batch["input_ids"], batch["attention_mask"], pad_id, one_row=True)}
            real += int(batch["attention_mask"].sum())
            for name, packed in layouts.items():
                tokens[name] += (batch["input_ids"] if packed is None else packed.input_ids).numel()
                shapes[name].append("x".join(map(str, (batch["input_ids"] if packed is None else packed.input_ids).shape)))
                seconds[name].append(step(policy, reference, batch, packed))
        rows.append({"batching": "grouped by length (ours)" if grouped else "random (TRL's default)",
                     "padding": {k: 1 - real / v for k, v in tokens.items()}, "shapes": shapes,
                     "seconds": {k: statistics.median(v) for k, v in seconds.items()}})
    lines = [
        f"# Padded vs padding-free: `{args.model}`, {args.pairs} pairs a batch, {args.batches} batches per row, "
        f"fp32 on CPU ({torch.get_num_threads()} threads), {time.time() - started:.0f} s; load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}",
        "",
        "| batches | layout | rows x width per batch | padding | s / micro-batch | time / padded |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        for name in ("padded", "rows", "one row"):
            what = {"padded": "padded (padding_free=false)", "rows": "packed, rows chosen by cost (sdpa / eager)",
                    "one row": "packed, one row (flash attention's layout)"}[name]
            lines.append(f"| {r['batching']} | {what} | {', '.join(r['shapes'][name])} | {100 * r['padding'][name]:.0f}% | "
                         f"{r['seconds'][name]:.2f} | {r['seconds'][name] / r['seconds']['padded']:.2f} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

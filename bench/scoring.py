"""compare's test scoring before and after: one forward per side against the prompt (and a probe's prefix) read once.

    python bench/scoring.py                          # a tiny random model, then SmolLM2-135M where it is on this machine
    python bench/scoring.py --models tiny --pairs 64 --repeats 5
    OMP_NUM_THREADS=1 nice -n 19 python bench/scoring.py --pairs 32   # as compare's budget was measured: one core

What is timed, on the styled task's test pairs (`split_questions`, as `granular-po compare` makes them) at
compare's own settings (max_length 128, max_prompt_length 96, `eval_batch_size` 64):
- pair metrics: the chosen and rejected log-probs of every pair (`metrics.sequence_logps`), before: one
  padded forward per side with full logits; after: the prompt read once (`forward.prompt_sharing.tail_logps`);
- forced-decoding probes (`metrics.forced_margins`), before: the code as it was (a padded forward of each
  whole right / wrong text); after: prompt + prefix read once, only the few differing tokens forwarded twice.
"After" includes its start-up check on the model (`shares_prefix`). The two paths take turns `--repeats`
times; printed: the median wall and CPU (process) seconds of each, the ratio before / after (on a shared
machine quote the ratios, not the seconds), and the largest difference between the two paths' numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))  # tiny.py: the tiny random model and in-process tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,smollm2-135m", help="comma-separated: tiny and/or smollm2-135m "
                   "(skipped, and said, where it is not on this machine)")
    p.add_argument("--pairs", type=int, default=32, help="test pairs (each gives one forced-decoding probe)")
    p.add_argument("--batch-size", type=int, default=64, help="compare's eval_batch_size")
    p.add_argument("--repeats", type=int, default=3, help="turns of each path; the median is printed")
    return p.parse_args(argv)


def load(name: str):
    """(tokenizer, model) in eval mode, or None where the embedded default model is not converted here."""
    if name == "tiny":
        from tiny import tiny_llama, tiny_tokenizer

        tokenizer = tiny_tokenizer("byte_level", chat=True)
        return tokenizer, tiny_llama(len(tokenizer), hidden_size=64).eval()
    from granular_po.default_model import default_cache_dir
    from granular_po.models import load_model, load_tokenizer

    path = default_cache_dir() / "models" / "smollm2-135m-instruct"
    if not (path / "granular_po_conversion.json").is_file():
        print(f"{name}: not at {path}, skipped")
        return None
    return load_tokenizer(str(path)), load_model(str(path)).eval()


def forced_margins_before(model, tokenizer, items, batch_size: int) -> list[float]:
    """`metrics.forced_margins` as it was: whole right and wrong texts, one padded forward per side."""
    from granular_po.apps.compare.metrics import encode_pairs, sequence_logps
    from granular_po.data.records import make_record

    records = [make_record(it["prompt"], it["prefix"] + it["right"] + it["end"], it["prefix"] + it["wrong"] + it["end"],
                           "forced", i) for i, it in enumerate(items)]
    encoded = encode_pairs(records, tokenizer, max_length=10_000, max_prompt_length=5_000)
    logps = sequence_logps(model, encoded, batch_size, shared=False)
    out = []
    for i, e in enumerate(encoded):
        right, wrong = e["chosen_ids"][:-1], e["rejected_ids"][:-1]
        k = next(j for j in range(min(len(right), len(wrong)) + 1)
                 if j == min(len(right), len(wrong)) or right[j] != wrong[j])
        out.append(sum(logps["chosen"][i][k:len(right)]) - sum(logps["rejected"][i][k:len(wrong)]))
    return out


def timed(fn) -> tuple[object, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def bench_model(name: str, args: argparse.Namespace) -> list[str]:
    from granular_po.apps.compare.metrics import encode_pairs, forced_item, forced_margins, sequence_logps
    from granular_po.apps.compare.settings import CompareSettings
    from granular_po.data.formats import load_data
    from granular_po.data.synthetic import split_questions, write_json

    loaded = load(name)
    if loaded is None:
        return []
    tokenizer, model = loaded
    s = CompareSettings()
    test = split_questions(8, 1, args.pairs, task="styled", seed=0)[2]
    with tempfile.TemporaryDirectory() as tmp:
        records, _ = load_data(write_json(Path(tmp) / "test.json", test))  # as compare reads its test file
    encoded = encode_pairs(records, tokenizer, s.max_length, s.max_prompt_length)
    probes = [it for it in (forced_item(p) for p in test) if it is not None]

    def pairs_sum(logps):
        return [sum(x) for side in ("chosen", "rejected") for x in logps[side]]

    paths = {
        "pair metrics": (lambda: pairs_sum(sequence_logps(model, encoded, args.batch_size, shared=False)),
                         lambda: pairs_sum(sequence_logps(model, encoded, args.batch_size))),
        "forced probes": (lambda: forced_margins_before(model, tokenizer, probes, args.batch_size),
                          lambda: forced_margins(model, tokenizer, probes, args.batch_size)),
    }
    tokens = sum(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in encoded)
    print(f"{name}: {len(encoded)} test pairs ({tokens} prompt + chosen + rejected tokens), {len(probes)} probes, "
          f"batch size {args.batch_size}, {args.repeats} turns", flush=True)
    lines, total = [], {"before": [0.0, 0.0], "after": [0.0, 0.0]}
    for what, (before, after) in paths.items():
        times = {"before": [], "after": []}
        for _ in range(args.repeats):
            old, *t_old = timed(before)
            new, *t_new = timed(after)
            times["before"].append(t_old)
            times["after"].append(t_new)
        diff = max(abs(a - b) for a, b in zip(old, new))
        med = {k: [statistics.median(t[i] for t in v) for i in (0, 1)] for k, v in times.items()}
        for k in total:
            total[k] = [a + b for a, b in zip(total[k], med[k])]
        lines.append(f"| {name} | {what} | {med['before'][0]:.2f} / {med['before'][1]:.2f} | "
                     f"{med['after'][0]:.2f} / {med['after'][1]:.2f} | {med['before'][0] / med['after'][0]:.2f}x | "
                     f"{med['before'][1] / med['after'][1]:.2f}x | {diff:.1e} |")
        print(lines[-1], flush=True)
    b, a = total["before"], total["after"]
    lines.append(f"| {name} | both | {b[0]:.2f} / {b[1]:.2f} | {a[0]:.2f} / {a[1]:.2f} | {b[0] / a[0]:.2f}x | "
                 f"{b[1] / a[1]:.2f}x | |")
    print(lines[-1], flush=True)
    return lines


def main(argv=None) -> int:
    import os

    import torch

    args = parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    lines = [line for name in args.models.split(",") if name.strip() for line in bench_model(name.strip(), args)]
    print("\n| model | scoring | before: wall / CPU s | after: wall / CPU s | wall ratio | CPU ratio | "
          "max difference (nats per item) |\n|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

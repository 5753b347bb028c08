"""PLAN.md's decision rule for Part B (QA-FEEDBACK), applied mechanically to what `compare` wrote (written and
committed while seeds 1 and 2 were still running).

    PYTHONPATH=src .venv/bin/python docs/results/decisive/decide_qa.py docs/results/decisive/qa-feedback

It reads `<dir>/compare.json` (each run's mean of every test metric, per seed). The rule (PLAN.md, Part B,
"Decision rule"): the anchored arm paired per seed against `response` on the primary metric, preference
accuracy on the held-out test pairs, Student-t with n - 1 = 2 degrees of freedom, 95% (no correction: one
decisive comparison). Interval wholly above 0: supports H1 on real data; wholly below 0: contradicts it;
anything else: inconclusive, with the interval's width. Every other comparison (today's `granular`, the
highlighted-token log-ratio, the sequence margin, ROUGE-L) is printed for reading, not for deciding.

With fewer than the plan's 3 seeds it prints the numbers and says the rule is NOT applied.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from decide import Paired  # noqa: E402 - the same paired-t arithmetic as Part A (tests/test_decision_rule.py)

PLANNED_SEEDS = 3
REFERENCE, TODAY = "response", "granular"
PRIMARY = "preference_accuracy"
ALPHA = 0.05
READ_ONLY = ("highlight_logratio", "sequence_margin", "rouge_l")


def per_seed(summary: dict, metric: str) -> dict[str, dict[int, float]]:
    """arm -> seed -> the run's mean `metric` over the test pairs, from compare.json's per-run metrics."""
    found: dict[str, dict[int, float]] = {}
    for cell, by_seed in summary["metrics"]["per_seed"].items():
        arm = cell.rsplit(", ", 1)[0]
        for seed, metrics in by_seed.items():
            value = metrics.get(metric)
            if value is not None:
                found.setdefault(arm, {})[int(seed)] = value
    return found


def paired(values: dict[str, dict[int, float]], arm: str, reference: str) -> Paired:
    seeds = sorted(set(values.get(arm, {})) & set(values.get(reference, {})))
    return Paired(arm, reference, tuple(values[arm][s] - values[reference][s] for s in seeds))


def decide(values: dict[str, dict[int, float]], anchored: str, planned_seeds: int = PLANNED_SEEDS) -> dict:
    """The rule on `values` (arm -> seed -> mean preference accuracy) for the anchored arm `anchored`."""
    p = paired(values, anchored, REFERENCE)
    interval = p.interval(ALPHA) if p.n >= 2 else None
    if p.n < planned_seeds:
        verdict = f"NOT APPLIED: {p.n} of {planned_seeds} seeds"
    elif interval[0] > 0:
        verdict = f"SUPPORTS H1 on real data: {anchored} above response (95% interval > 0)"
    elif interval[1] < 0:
        verdict = f"CONTRADICTS H1 on real data: {anchored} below response (95% interval < 0)"
    else:
        verdict = f"INCONCLUSIVE: the 95% interval spans 0 (width {interval[1] - interval[0]:.3f})"
    return {"pair": p, "interval": interval, "verdict": verdict}


def _line(p: Paired, interval) -> str:
    if p.n == 0:
        return f"| {p.arm} - {p.reference} | 0 | n/a | n/a | n/a |"
    shown = "n/a" if interval is None else f"[{interval[0]:+.3f}, {interval[1]:+.3f}]"
    return (f"| {p.arm} - {p.reference} | {p.n} | {', '.join(f'{d:+.3f}' for d in p.diffs)} | "
            f"{p.mean:+.3f} | {shown} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="a directory holding Part B's compare.json")
    args = parser.parse_args(argv)
    summary = json.loads((args.dir / "compare.json").read_text())
    arms = [a for a in per_seed(summary, PRIMARY) if a not in (REFERENCE, TODAY)]
    if len(arms) != 1:
        raise SystemExit(f"{args.dir}/compare.json: expected one anchored arm besides response and granular, "
                         f"found {arms}")
    anchored = arms[0]
    print(f"# Part B's rule on {args.dir}/compare.json (anchored arm: {anchored})\n")
    for metric in (PRIMARY, *READ_ONLY):
        values = per_seed(summary, metric)
        print(f"## {metric}{' (primary: decides)' if metric == PRIMARY else ' (read only)'}\n")
        print("| arm - reference | seeds | per seed | mean | 95% t interval (n - 1 df) |\n|---|---|---|---|---|")
        for arm in (anchored, TODAY):
            p = paired(values, arm, REFERENCE)
            print(_line(p, p.interval(ALPHA) if p.n >= 2 else None))
        p = paired(values, anchored, TODAY)
        print(_line(p, p.interval(ALPHA) if p.n >= 2 else None))
        print()
    print("Verdict: " + decide(per_seed(summary, PRIMARY), anchored)["verdict"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""PLAN_nll.md's decision rule (the follow-up's response-level + NLL arm), applied mechanically to what
`compare` wrote; committed with the plan, before any run of the new arm.

    PYTHONPATH=src .venv/bin/python docs/results/decisive/decide_nll.py report/decisive/styled-c1.0

It reads `<dir>/compare.json` (each run's mean of every test metric, per seed) and prints, per metric,
D = granular-klall-nll - response-nll and E = response-nll - response (and, for reference, Part A's
granular-klall-nll - response): per-seed differences, mean, 95% Student-t interval (n - 1 df, no
correction: one pre-specified comparison). The rule, on greedy accuracy (`accuracy`) over all 8 seeds:

- D wholly above 0: the highlights add to the anchor;
- D wholly below 0: response + NLL is better;
- D spans 0 and E wholly above 0: the NLL term explains the gain;
- anything else: inconclusive (with D's width).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from decide import Paired  # noqa: E402 - the same paired-t arithmetic as Part A (tests/test_decision_rule.py)

PLANNED_SEEDS = 8
PRIMARY = "accuracy"
SECONDARY = ("forced_margin", "forced_accuracy", "worked_step")
ALPHA = 0.05
D = ("granular-klall-nll", "response-nll")
E = ("response-nll", "response")
PART_A = ("granular-klall-nll", "response")


def per_seed(summary: dict, metric: str) -> dict[str, dict[int, float]]:
    """arm -> seed -> the run's mean `metric` over the test questions (compare.json's metrics.per_seed)."""
    found: dict[str, dict[int, float]] = {}
    for cell, by_seed in summary["metrics"]["per_seed"].items():
        for seed, metrics in by_seed.items():
            if metrics.get(metric) is not None:
                found.setdefault(cell.rsplit(", ", 1)[0], {})[int(seed)] = metrics[metric]
    return found


def paired(values: dict[str, dict[int, float]], arm: str, reference: str) -> Paired:
    seeds = sorted(set(values.get(arm, {})) & set(values.get(reference, {})))
    return Paired(arm, reference, tuple(values[arm][s] - values[reference][s] for s in seeds))


def interval(p: Paired) -> tuple[float, float] | None:
    return p.interval(ALPHA) if p.n >= 2 else None


def decide(values: dict[str, dict[int, float]], planned_seeds: int = PLANNED_SEEDS) -> dict:
    """The rule on `values` (arm -> seed -> mean greedy accuracy)."""
    d, e = paired(values, *D), paired(values, *E)
    d_ci, e_ci = interval(d), interval(e)
    seeds = min(d.n, e.n)
    if seeds < planned_seeds:
        verdict = f"NOT APPLIED: {seeds} of {planned_seeds} seeds"
    elif d_ci[0] > 0:
        verdict = "HIGHLIGHTS ADD TO THE ANCHOR: granular-klall-nll above response-nll (95% interval > 0)"
    elif d_ci[1] < 0:
        verdict = "RESPONSE + NLL BETTER: granular-klall-nll below response-nll (95% interval < 0)"
    elif e_ci[0] > 0:
        verdict = (f"THE NLL TERM EXPLAINS THE GAIN: D spans 0 (width {d_ci[1] - d_ci[0]:.3f}), "
                   "response-nll above response (95% interval > 0)")
    else:
        verdict = f"INCONCLUSIVE: D's 95% interval spans 0 (width {d_ci[1] - d_ci[0]:.3f})"
    return {"D": d, "E": e, "D_interval": d_ci, "E_interval": e_ci, "seeds": seeds, "verdict": verdict}


def _line(name: str, p: Paired) -> str:
    if p.n == 0:
        return f"| {name}: {p.arm} - {p.reference} | 0 | n/a | n/a | n/a |"
    ci = interval(p)
    shown = "n/a" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"
    return (f"| {name}: {p.arm} - {p.reference} | {p.n} | {', '.join(f'{d:+.3f}' for d in p.diffs)} | "
            f"{p.mean:+.3f} | {shown} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="a directory holding the follow-up's compare.json")
    args = parser.parse_args(argv)
    summary = json.loads((args.dir / "compare.json").read_text())
    if D[1] not in per_seed(summary, PRIMARY):
        raise SystemExit(f"{args.dir}/compare.json: no {D[1]} arm with test results yet")
    print(f"# PLAN_nll.md's rule on {args.dir}/compare.json\n")
    for metric in (PRIMARY, *SECONDARY):
        values = per_seed(summary, metric)
        print(f"## {metric}{' (primary: decides)' if metric == PRIMARY else ' (read only)'}\n")
        print("| comparison | seeds | per seed | mean | 95% t interval (n - 1 df) |\n|---|---|---|---|---|")
        for name, arms in (("D", D), ("E", E), ("Part A", PART_A)):
            print(_line(name, paired(values, *arms)))
        print()
    print("Verdict: " + decide(per_seed(summary, PRIMARY))["verdict"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

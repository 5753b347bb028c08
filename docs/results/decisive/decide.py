"""PLAN.md's decision rule for Part A, applied mechanically to what `compare` wrote (written and committed
while the seeds were still running, before the rule could be read against them).

    PYTHONPATH=src .venv/bin/python docs/results/decisive/decide.py docs/results/decisive/styled-c1.0
    PYTHONPATH=src .venv/bin/python docs/results/decisive/decide.py report/decisive/styled-c1.0 \
        --runs report/decisive/styled-c1.0/runs        # adds bootstraps over seeds x questions

It reads `<dir>/compare.json` (each run's mean of every test metric, per seed) and prints, per comparison,
the per-seed differences, the mean, the Bonferroni-corrected paired interval (mean +- t(1 - 0.05/6, 7 df)
x SE: three comparisons, two-sided, family-wise 95%), the uncorrected 95% one, and the smallest
difference detectable at 80% power from the observed spread (for reading, not for deciding). The rule
(PLAN.md, "Decision rule"), on the primary metric (`forced_margin`) at confound 1.0:

- Confirmed: an anchored granular arm's corrected interval vs `response` is wholly above 0;
- today's `granular` above `response`: H1 without the anchor (reported under the same rule);
- the anchor mattered rather than the granularity: no granular arm above `response`, an anchored arm
  above `granular`;
- refuted for this setting: every granular arm's corrected upper end vs `response` is below +0.5 nats;
- inconclusive: anything else.

With fewer than the plan's 8 seeds it prints the numbers and says the rule is NOT applied.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from granular_po.apps.compare.statistics import bootstrap_paired, t_quantile

PLANNED_SEEDS = 8
REFERENCE, TODAY = "response", "granular"
ANCHORED = ("granular-klall", "granular-klall-nll")
GRANULAR = (TODAY, *ANCHORED)
PRIMARY = "forced_margin"
SMALLEST_GAIN = 0.5  # nats of forced-decoding margin: the smallest difference that matters (PLAN.md)
FAMILY_ALPHA, FAMILY_SIZE = 0.05, 3  # three comparisons against `response`, two-sided
POWER = 0.80


@dataclass(frozen=True)
class Paired:
    """arm - reference over the seeds both have."""

    arm: str
    reference: str
    diffs: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return sum(self.diffs) / self.n

    @property
    def sd(self) -> float | None:
        if self.n < 2:
            return None
        return math.sqrt(sum((d - self.mean) ** 2 for d in self.diffs) / (self.n - 1))

    @property
    def se(self) -> float | None:
        return None if self.sd is None else self.sd / math.sqrt(self.n)

    def interval(self, alpha: float) -> tuple[float, float] | None:
        """Two-sided 1 - alpha Student-t interval of the mean difference (n - 1 df)."""
        if self.se is None:
            return None
        half = t_quantile(1 - alpha / 2, self.n - 1) * self.se
        return self.mean - half, self.mean + half

    @property
    def corrected(self) -> tuple[float, float] | None:
        return self.interval(FAMILY_ALPHA / FAMILY_SIZE)

    @property
    def uncorrected(self) -> tuple[float, float] | None:
        return self.interval(FAMILY_ALPHA)

    def detectable(self, alpha: float) -> float | None:
        """The smallest true difference a paired t-test at level alpha finds with POWER, given this sd."""
        if self.se is None:
            return None
        df = self.n - 1
        return (t_quantile(1 - alpha / 2, df) + t_quantile(POWER, df)) * self.se

    def above_zero(self) -> bool:
        return self.corrected is not None and self.corrected[0] > 0


def pair(per_seed: dict[str, dict[int, float]], arm: str, reference: str) -> Paired:
    seeds = sorted(set(per_seed[arm]) & set(per_seed[reference]))
    return Paired(arm, reference, tuple(per_seed[arm][s] - per_seed[reference][s] for s in seeds))


def decide(per_seed: dict[str, dict[int, float]], planned_seeds: int = PLANNED_SEEDS) -> dict:
    """The rule applied to `per_seed` (arm -> seed -> the run's mean primary metric). Returns every
    comparison, which conditions hold, and the verdict; `applied` is False below `planned_seeds` seeds."""
    vs_response = {arm: pair(per_seed, arm, REFERENCE) for arm in GRANULAR}
    vs_today = {arm: pair(per_seed, arm, TODAY) for arm in ANCHORED}
    seeds = min(p.n for p in (*vs_response.values(), *vs_today.values()))
    conditions = {
        "confirmed": [a for a in ANCHORED if vs_response[a].above_zero()],
        "today_above_response": vs_response[TODAY].above_zero(),
        "anchor_mattered": (not any(p.above_zero() for p in vs_response.values())
                            and any(p.above_zero() for p in vs_today.values())),
        "refuted": all(p.corrected is not None and p.corrected[1] < SMALLEST_GAIN for p in vs_response.values()),
    }
    if seeds < planned_seeds:
        verdict = (f"NOT APPLIED: {seeds} of {planned_seeds} seeds (the plan reads the rule only on all "
                   f"{planned_seeds}; the conditions are printed for completeness, not as a result)")
    elif conditions["confirmed"]:
        verdict = "CONFIRMED: " + ", ".join(conditions["confirmed"]) + " above response (corrected interval > 0)"
    elif conditions["today_above_response"]:
        verdict = "CONFIRMED WITHOUT THE ANCHOR: granular (today's recipe) above response"
    else:
        parts = []
        if conditions["anchor_mattered"]:
            parts.append("THE ANCHOR MATTERED: no granular arm above response, an anchored arm above granular")
        if conditions["refuted"]:
            parts.append(f"REFUTED for this setting: every granular arm's corrected upper end < +{SMALLEST_GAIN}")
        verdict = "; ".join(parts) if parts else "INCONCLUSIVE"
    return {"seeds": seeds, "applied": seeds >= planned_seeds, "verdict": verdict, "conditions": conditions,
            "vs_response": vs_response, "vs_granular": vs_today}


def read_per_seed(compare_json: Path, metric: str) -> dict[str, dict[int, float]]:
    """arm -> seed -> the run's mean of `metric` on the test items, from compare's JSON."""
    data = json.loads(compare_json.read_text())
    out: dict[str, dict[int, float]] = {}
    for cell, seeds in data["metrics"]["per_seed"].items():
        arm = cell.split(",")[0]
        out[arm] = {int(s): float(m[metric]) for s, m in seeds.items() if m.get(metric) is not None}
    missing = [a for a in (REFERENCE, *GRANULAR) if a not in out]
    if missing:
        raise SystemExit(f"{compare_json}: no arm {missing} in metrics.per_seed (arms there: {sorted(out)})")
    return out


def read_items(runs: Path, arm: str, metric: str) -> dict[int, list]:
    """seed -> per-question values of `metric` of the arm's runs that have test results."""
    out = {}
    for path in sorted(runs.glob(f"{arm}_AdamW_*_s*/compare_result.json")):
        test = json.loads(path.read_text()).get("test")
        if test and metric in test.get("items", {}):
            out[int(path.parent.name.rsplit("_s", 1)[1])] = test["items"][metric]
    return out


def fmt(interval: tuple[float, float] | None) -> str:
    return "n/a (one seed)" if interval is None else f"[{interval[0]:+.3f}, {interval[1]:+.3f}]"


def render(result: dict, metric: str, source: str, boot: dict | None) -> str:
    lines = [f"# Decision rule, PLAN.md Part A: `{metric}` in {source}", "",
             f"Seeds: {result['seeds']} of {PLANNED_SEEDS}. Corrected: mean +- t(1 - {FAMILY_ALPHA}/"
             f"{2 * FAMILY_SIZE}, n - 1 df) x SE (= {t_quantile(1 - FAMILY_ALPHA / (2 * FAMILY_SIZE), 7):.3f}"
             f" x SE at 8 seeds). Detectable: the smallest difference found with {POWER:.0%} power at the "
             "corrected level, from the observed spread.", "",
             "| comparison | per seed | mean | SE | corrected interval | uncorrected 95% | detectable (80%) |"
             + (" bootstrap 95%, seeds x questions |" if boot else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if boot else "")]
    for group in ("vs_response", "vs_granular"):
        for p in result[group].values():
            det = p.detectable(FAMILY_ALPHA / FAMILY_SIZE)
            row = (f"| {p.arm} - {p.reference} | {' '.join(f'{d:+.2f}' for d in p.diffs)} | {p.mean:+.3f} | "
                   f"{'n/a' if p.se is None else f'{p.se:.3f}'} | {fmt(p.corrected)} | {fmt(p.uncorrected)} | "
                   f"{'n/a' if det is None else f'{det:.3f}'} |")
            if boot:
                b = boot.get((p.arm, p.reference))
                row += f" {'n/a' if not b or b['low'] is None else fmt((b['low'], b['high']))} |"
            lines.append(row)
    c = result["conditions"]
    lines += ["", "Conditions: confirmed (anchored arm above response): "
              f"{', '.join(c['confirmed']) or 'none'}; granular above response: {c['today_above_response']}; "
              f"anchor mattered: {c['anchor_mattered']}; every granular arm's corrected upper end below "
              f"+{SMALLEST_GAIN}: {c['refuted']}.", "", f"**Verdict: {result['verdict']}**"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path, help="a compare --out folder (or its published copy) with compare.json")
    p.add_argument("--metric", default=PRIMARY, help="the plan's primary metric (default); others: "
                   "forced_accuracy, accuracy, worked_step (secondary: not used to decide)")
    p.add_argument("--runs", type=Path, help="the runs folder: adds the bootstrap over seeds and questions")
    p.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = p.parse_args(argv)
    result = decide(read_per_seed(args.dir / "compare.json", args.metric))
    if args.metric != PRIMARY:  # the rule and its 0.5-nat threshold are the primary metric's only
        result["verdict"] = f"none: {args.metric} is secondary (PLAN.md: reported with the same intervals, not used to decide)"
    boot = None
    if args.runs:
        items = {arm: read_items(args.runs, arm, args.metric) for arm in (REFERENCE, *GRANULAR)}
        boot = {(p.arm, p.reference): bootstrap_paired(items[p.arm], items[p.reference])
                for group in ("vs_response", "vs_granular") for p in result[group].values()}
    text = render(result, args.metric, str(args.dir), boot)
    sys.stdout.write(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

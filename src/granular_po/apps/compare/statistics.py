"""Intervals of `granular-po compare`: over seeds (Student-t), paired by seed, by question, and a bootstrap
over seeds and items.

    mean_ci([0.41, 0.45, 0.43])          # (mean, low, high): Student-t 95% interval over seeds
    paired_seeds({0: 0.45, 1: 0.40}, {0: 0.41, 1: 0.42})   # arm - reference, per seed
    paired_questions(rows_a, rows_b)     # the same difference, paired question by question

Seeds are the unit of the main interval (a run's training is the random thing being repeated); the
question-level interval treats the test questions as the sample and so leaves training noise out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist

# two-sided 95% Student-t quantiles t_{0.975, df} (3 decimals, as the usual tables) where the expansion
# below is off by more than 1e-4 (scipy is not a dependency)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447}


def t975(df: int) -> float:
    """t_{0.975, df}: tabulated to df 6, above it the Cornish-Fisher expansion in 1/df around the normal
    quantile (Abramowitz & Stegun 26.7.5; within 5e-5 of the exact quantile from df 7, 1e-6 from df 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, not {df}")
    if df in _T975:
        return _T975[df]
    z = NormalDist().inv_cdf(0.975)
    g = ((z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96, (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
         (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160)
    return z + sum(gk / df ** (k + 1) for k, gk in enumerate(g))


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with an integer `df`, exact: the finite series in cos(theta),
    theta = atan(x / sqrt(df)) (Abramowitz & Stegun 26.7.3 for odd df, 26.7.4 for even df)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, not {df}")
    theta = math.atan(abs(x) / math.sqrt(df))
    c2, term, series = math.cos(theta) ** 2, 1.0, 1.0
    if df % 2:  # odd: (2/pi) [theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)], df - 3 terms after 1
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            series += term
        inside = 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * series if df > 1 else 0.0))
    else:  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            series += term
        inside = math.sin(theta) * series
    return 0.5 + math.copysign(inside / 2, x)


def t_quantile(p: float, df: int) -> float:
    """The x with P(T <= x) = p for Student's t with an integer `df` (bisection on `t_cdf` to 1e-12):
    any level, e.g. a Bonferroni-corrected `t_quantile(1 - 0.05 / 6, 7)` = 3.128."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), not {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    while high - low > 1e-12 * max(1.0, high):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def mean_ci(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high) of a 95% Student-t interval; one value: (value, None, None); none: all None."""
    n = len(values)
    if n == 0:
        return None, None, None
    mean = sum(values) / n
    if n == 1:
        return mean, None, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_seeds(a: Mapping[int, float], b: Mapping[int, float]) -> dict:
    """a - b over the seeds both have: per-seed differences, their mean and 95% t-interval."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    mean, low, high = mean_ci(diffs)
    return {"seeds": seeds, "diffs": diffs, "mean": mean, "low": low, "high": high}


def paired_questions(a_rows: Mapping[int, Sequence[Mapping]], b_rows: Mapping[int, Sequence[Mapping]]) -> dict:
    """a - b question by question over the seeds both have (rows: `task_accuracy`'s per-question dicts).

    Each question's correctness is averaged over those seeds first; the interval is the normal one over
    questions. Also the discordant counts summed over seeds: a right and b wrong, and the reverse.
    """
    seeds = sorted(set(a_rows) & set(b_rows))
    if not seeds:
        return {"seeds": [], "n": 0, "mean": None, "low": None, "high": None, "a_only": 0, "b_only": 0}
    prompts = [r["prompt"] for r in a_rows[seeds[0]]]
    for s in seeds:
        for rows in (a_rows[s], b_rows[s]):
            if [r["prompt"] for r in rows] != prompts:
                raise ValueError(f"seed {s}: the two cells were scored on different questions")
    diffs, a_only, b_only = [], 0, 0
    for i in range(len(prompts)):
        a = [bool(a_rows[s][i]["correct"]) for s in seeds]
        b = [bool(b_rows[s][i]["correct"]) for s in seeds]
        diffs.append((sum(a) - sum(b)) / len(seeds))
        a_only += sum(x and not y for x, y in zip(a, b))
        b_only += sum(y and not x for x, y in zip(a, b))
    n = len(diffs)
    mean = sum(diffs) / n if n else None
    if n < 2:
        return {"seeds": seeds, "n": n, "mean": mean, "low": None, "high": None, "a_only": a_only, "b_only": b_only}
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = 1.96 * sd / math.sqrt(n)
    return {"seeds": seeds, "n": n, "mean": mean, "low": mean - half, "high": mean + half,
            "a_only": a_only, "b_only": b_only}


BOOTSTRAP_REPLICATES = 2000


def bootstrap_paired(a: Mapping[int, Sequence], b: Mapping[int, Sequence], replicates: int = BOOTSTRAP_REPLICATES,
                     seed: int = 0) -> dict:
    """a - b resampled over seeds and items at once (seeds with replacement, then items with replacement,
    the same draw for both arms: paired), percentile 95% interval; items where either side has no value
    (None) are left out. a, b: seed -> per-item values, aligned. Fixed `seed`: the same report twice."""
    import numpy as np

    seeds = sorted(set(a) & set(b))
    if not seeds:
        return {"seeds": [], "mean": None, "low": None, "high": None}
    diff = np.array([[np.nan if x is None or y is None else float(x) - float(y) for x, y in zip(a[s], b[s])]
                     for s in seeds])  # (seeds, items)
    if not np.isfinite(diff).any():
        return {"seeds": seeds, "mean": None, "low": None, "high": None}
    rng = np.random.default_rng(seed)
    n_s, n_i = diff.shape
    stats = []
    for _ in range(replicates):
        sub = diff[rng.integers(0, n_s, n_s)][:, rng.integers(0, n_i, n_i)]
        if np.isfinite(sub).any():
            stats.append(np.nanmean(sub))
    low, high = np.percentile(stats, [2.5, 97.5])
    return {"seeds": seeds, "mean": float(np.nanmean(diff)), "low": float(low), "high": float(high)}


def format_ci(mean: float | None, low: float | None, high: float | None, fmt: str = ".3f") -> str:
    """'0.432 [0.401, 0.463]'; 'n/a' without a mean; the mean alone without an interval."""
    if mean is None:
        return "n/a"
    if low is None or high is None:
        return f"{mean:{fmt}} (one seed: no interval)"
    return f"{mean:{fmt}} [{low:{fmt}}, {high:{fmt}}]"

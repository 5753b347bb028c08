"""Granular arithmetic-correction pairs, deterministic from a seed: the demo's task and a styled one.

A pair is a question ("What is 7 * 8?"), a correct response stating the result in a sentence or two,
and a minimally edited incorrect response whose result is wrong in a plausible way (one factor off
by one: 7 * 8 = 49; digits swapped: 65; a carry slip: 66; a digit off by one: 57). The highlighted
regions sit exactly on the wrong digits, in the research code's JSON format:

    {"prompt": "What is 7 * 8?", "correct_response": "7 * 8 = 56. The answer is 56.",
     "incorrect_response": "7 * 8 = 57. The answer is 57.", "masked_regions": [[9, 10, -1], [27, 28, -1]]}

In those minimal edits every token the two responses share cancels in a DPO margin, so "response-level"
already means "the differing tokens". The *styled* task (`make_styled_pair`, `split_questions(...,
task="styled")`) is the one where response-level and granular signals differ: each side's phrasing,
length and extra sentences are drawn on their own, and with probability `confound` the correct response
is written in the preferred, worked style and the wrong one tersely (see `make_styled_pair`).
"""

from __future__ import annotations

import json
import os
import random
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# each response template states the result {r} once or twice; {a}, {b} are the operands
RESPONSE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "*": (
        "{a} * {b} = {r}. The answer is {r}.",
        "{a} times {b} is {r}, so the answer is {r}.",
        "Multiplying {a} by {b} gives {r}. The answer is {r}.",
        "The product of {a} and {b} is {r}.",
        "{a} * {b} = {r}",
    ),
    "+": (
        "{a} + {b} = {r}. The answer is {r}.",
        "{a} plus {b} is {r}, so the answer is {r}.",
        "Adding {a} and {b} gives {r}. The answer is {r}.",
        "The sum of {a} and {b} is {r}.",
        "{a} + {b} = {r}",
    ),
}
PROMPT_TEMPLATE = "What is {a} {op} {b}?"
# default questions: single-digit sums and single-digit x 11..19 products (108 questions).
# SmolLM2-135M-Instruct, greedy with its chat template, gets about a third right (measured on 50)
DEFAULT_OPS = ("+", "*")
DEFAULT_RANGES = {"+": ((2, 9), (2, 9)), "*": ((2, 9), (11, 19))}
# `granular-po compare`'s questions: two-digit sums and single-digit x 11..29 products (932 questions),
# enough for disjoint train / validation / >= 200 test questions
WIDE_RANGES = {"+": ((11, 49), (11, 49)), "*": ((2, 9), (11, 29))}


@dataclass(frozen=True)
class Question:
    """`a op b`; `key` identifies it up to operand order (7 * 8 and 8 * 7 are one question)."""

    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        return self.a * self.b if self.op == "*" else self.a + self.b

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(a=self.a, op=self.op, b=self.b)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.op, min(self.a, self.b), max(self.a, self.b))


def question_pool(ops: Sequence[str] = DEFAULT_OPS, ranges=DEFAULT_RANGES) -> list[tuple[str, int, int]]:
    """Every distinct question key (op, smaller operand, larger operand), sorted.

    `ranges` is ((a_lo, a_hi), (b_lo, b_hi)) inclusive for every op, or a dict op -> such a pair.
    """
    keys = set()
    for op in ops:
        if op not in RESPONSE_TEMPLATES:
            raise ValueError(f"unknown operator {op!r}; expected one of {sorted(RESPONSE_TEMPLATES)}")
        (a_lo, a_hi), (b_lo, b_hi) = ranges[op] if isinstance(ranges, Mapping) else ranges
        keys |= {(op, min(a, b), max(a, b)) for a in range(a_lo, a_hi + 1) for b in range(b_lo, b_hi + 1)}
    return sorted(keys)


def wrong_result(q: Question, rng: random.Random) -> tuple[int, str]:
    """A plausible wrong result and the kind of error that produced it."""
    r = q.answer
    candidates: list[tuple[int, str]] = []
    if q.op == "*":
        candidates += [(q.a * (q.b + d), "factor") for d in (-1, 1)]
        candidates += [((q.a + d) * q.b, "factor") for d in (-1, 1)]
    digits = str(r)
    if len(digits) >= 2 and digits[-1] != "0" and digits[::-1] != digits:
        candidates.append((int(digits[::-1]), "swap"))
    candidates += [(r + 10, "carry"), (r - 10, "carry"), (r + 1, "digit"), (r - 1, "digit")]
    # never an operand: "12 + 9 = 12" reads as a copying slip and makes the stated result ambiguous
    candidates = [(w, kind) for w, kind in candidates if w > 0 and w not in (r, q.a, q.b)]
    return rng.choice(candidates)


def _render(template: str, a: int, b: int, r: str) -> tuple[str, list[int]]:
    """Fill `template`; also return the start offset of every `{r}` in the text."""
    text, starts = "", []
    for literal, field, _, _ in string.Formatter().parse(template):
        text += literal
        if field is None:
            continue
        if field == "r":
            starts.append(len(text))
        text += {"a": str(a), "b": str(b), "r": r}[field]
    return text, starts


def diff_span(correct: str, wrong: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Differing digits of two numbers as (span in correct, span in wrong), common prefix/suffix removed.

    A side whose differing part is empty (a digit only deleted or only inserted) gets the whole number.
    """
    p = 0
    while p < min(len(correct), len(wrong)) and correct[p] == wrong[p]:
        p += 1
    s = 0
    while s < min(len(correct), len(wrong)) - p and correct[-1 - s] == wrong[-1 - s]:
        s += 1
    c_span = (p, len(correct) - s) if len(correct) - s > p else (0, len(correct))
    w_span = (p, len(wrong) - s) if len(wrong) - s > p else (0, len(wrong))
    return c_span, w_span


def make_pair(q: Question, rng: random.Random, mark_correct: bool = False, region_unit: str = "digits") -> dict:
    """One research-format pair for `q` (template and error drawn from `rng`)."""
    if region_unit not in ("digits", "number"):
        raise ValueError(f"region_unit must be 'digits' or 'number', not {region_unit!r}")
    template = rng.choice(RESPONSE_TEMPLATES[q.op])
    wrong, _kind = wrong_result(q, rng)
    correct_s, wrong_s = str(q.answer), str(wrong)
    chosen, c_starts = _render(template, q.a, q.b, correct_s)
    rejected, w_starts = _render(template, q.a, q.b, wrong_s)
    if region_unit == "digits":
        c_span, w_span = diff_span(correct_s, wrong_s)
    else:
        c_span, w_span = (0, len(correct_s)), (0, len(wrong_s))
    regions = [[s + w_span[0], s + w_span[1], -1] for s in w_starts]
    for s0, e0, _ in regions:  # the region is exactly the wrong digits
        assert rejected[s0:e0] == wrong_s[w_span[0]:w_span[1]]
    if mark_correct:
        regions += [[s + c_span[0], s + c_span[1], 1] for s in c_starts]
    return {
        "prompt": q.prompt,
        "correct_response": chosen,
        "incorrect_response": rejected,
        "masked_regions": regions,
    }


def _pairs_for(keys, n: int, rng: random.Random, mark_correct: bool, region_unit: str,
               make: Callable[[Question, random.Random], dict] | None = None) -> list[dict]:
    """n pairs cycling over `keys` (repeats draw a new template and error); operand order random.

    `make(question, rng)` builds one pair; default the minimal-edit `make_pair`."""
    if n > 0 and not keys:
        raise ValueError("no questions left to draw from; widen `ranges` or lower n")
    if make is None:
        def make(q, r):
            return make_pair(q, r, mark_correct, region_unit)
    pairs = []
    for i in range(n):
        op, x, y = keys[i % len(keys)]
        a, b = (x, y) if rng.random() < 0.5 else (y, x)
        pairs.append(make(Question(a, op, b), rng))
    return pairs


def generate_pairs(
    n: int,
    seed: int = 0,
    ops: Sequence[str] = DEFAULT_OPS,
    ranges=DEFAULT_RANGES,
    mark_correct: bool = False,
    region_unit: str = "digits",
) -> list[dict]:
    """n pairs, deterministic in `seed`; distinct questions until the pool runs out, then repeats."""
    rng = random.Random(seed)
    keys = question_pool(ops, ranges)
    rng.shuffle(keys)
    return _pairs_for(keys, n, rng, mark_correct, region_unit)


def split_train_eval(
    n_train: int,
    n_eval: int,
    seed: int = 0,
    ops: Sequence[str] = DEFAULT_OPS,
    ranges=DEFAULT_RANGES,
    mark_correct: bool = False,
    region_unit: str = "digits",
) -> tuple[list[dict], list[dict]]:
    """(train, eval) pairs sharing no question (7 * 8 and 8 * 7 count as one); eval questions distinct."""
    rng = random.Random(seed)
    keys = question_pool(ops, ranges)
    if n_eval >= len(keys):
        raise ValueError(f"n_eval={n_eval} leaves no training question out of {len(keys)}; widen `ranges`")
    rng.shuffle(keys)
    eval_keys, train_keys = keys[:n_eval], keys[n_eval:]
    eval_pairs = _pairs_for(eval_keys, n_eval, rng, mark_correct, region_unit)
    train_pairs = _pairs_for(train_keys, n_train, rng, mark_correct, region_unit)
    return train_pairs, eval_pairs


def write_json(path: str | os.PathLike, pairs: list[dict]) -> Path:
    """Write `pairs` as a JSON list (the research code's format); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(pairs, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- the styled task

# Two styles. "worked" (the preferred one when the confound applies) restates the question and ends in
# "answer is {r}"; no "terse" phrasing has both (a test tells the styles apart that way). No sentence holds any number but a, b and the result, so the
# stated result stays what `evaluate.extract_answer` reads and the regions find every occurrence of it.
STYLES: dict[str, tuple[str, ...]] = {
    "worked": (
        "Let's work it out. {a} {op} {b} = {r}. The answer is {r}.",
        "We need {a} {op} {b}. Computing it step by step gives {r}, so the answer is {r}.",
        "To find {a} {op} {b}, work it out carefully: the result is {r}. The answer is {r}.",
        "Here is the calculation: {a} {op} {b} = {r}. So the answer is {r}.",
    ),
    "terse": (
        "The answer is {r}.",
        "{r}.",
        "{a} {op} {b} = {r}.",
        "It is {r}.",
    ),
}
PREFERRED_STYLE, OTHER_STYLE = "worked", "terse"
# sentences added before (openers) or after (closers) a response, each side drawn on its own
OPENERS = ("Sure!", "Good question.", "Happy to help.", "Of course.", "Let me think.")
CLOSERS = ("I hope this helps.", "Let me know if you have another question.", "Arithmetic is fun to check.",
           "That is all there is to it.", "You can check it by hand.")
DEFAULT_CONFOUND = 0.75


def _styled_text(q: Question, style: str, r: str, rng: random.Random) -> tuple[str, list[int]]:
    """One styled response stating `r` (phrasing and extra sentences drawn from `rng`), with the offsets of `r`."""
    template = rng.choice(STYLES[style])
    opener = rng.choice(OPENERS) + " " if rng.random() < 0.3 else ""
    closer = " " + rng.choice(CLOSERS) if rng.random() < 0.3 else ""
    text, starts = _render(template.replace("{op}", q.op), q.a, q.b, r)
    return opener + text + closer, [s + len(opener) for s in starts]


HIGHLIGHTS = ("number", "digits")
_ANSWER_IS = re.compile(r"\banswer is\b", re.IGNORECASE)


def keeps_worked_step(text: str, q: Question) -> bool:
    """The text is in the worked style: it restates the operation (`a op b`, the question's operands in
    either order) and states "answer is" after it. Every "worked" template does; no "terse" one has both
    (the terse "{a} {op} {b} = {r}." restates the operation but states no "answer is" after it)."""
    op = re.escape(q.op)
    step = re.compile(rf"(?<!\d)(?:{q.a}\s*{op}\s*{q.b}|{q.b}\s*{op}\s*{q.a})(?!\d)")
    return any(_ANSWER_IS.search(text, m.end()) for m in step.finditer(text))




def make_styled_pair(q: Question, rng: random.Random, confound: float = DEFAULT_CONFOUND,
                     mark_correct: bool = False, highlight: str = "number") -> dict:
    """A pair whose sides differ in more than the error; only the results are highlighted.

    The correct response states the right result, the incorrect one a plausible wrong result
    (`wrong_result`). Each side's style ("worked" or "terse"), phrasing and optional opening / closing
    sentence are drawn independently, except that with probability `confound` the correct response is
    written in the preferred "worked" style and the incorrect one in the "terse" style. So `confound=0`:
    style carries no information about which side is right (it is noise in a response-level margin);
    `confound=1`: style alone separates every pair, and a response-level learner can fit the preference
    without the arithmetic. Regions: every occurrence of the wrong result, flag -1; with `mark_correct`,
    every occurrence of the right result with flag 1. `highlight="number"` marks the whole number (the
    default grid's setting); `"digits"` only the digits that differ between the two results (`diff_span`,
    as the minimal-edit task does), so a digit the wrong result gets right is not penalised. The texts
    and the random draws are the same under both. Answer correctness, what the held-out score measures,
    is the same under every confound.
    """
    if not 0.0 <= confound <= 1.0:
        raise ValueError(f"confound must be in [0, 1], not {confound!r}")
    if highlight not in HIGHLIGHTS:
        raise ValueError(f"highlight must be one of {HIGHLIGHTS}, not {highlight!r}")
    wrong, _kind = wrong_result(q, rng)
    if rng.random() < confound:
        c_style, w_style = PREFERRED_STYLE, OTHER_STYLE
    else:
        c_style, w_style = rng.choice(list(STYLES)), rng.choice(list(STYLES))
    chosen, c_starts = _styled_text(q, c_style, str(q.answer), rng)
    rejected, w_starts = _styled_text(q, w_style, str(wrong), rng)
    right_s, wrong_s = str(q.answer), str(wrong)
    c_span, w_span = diff_span(right_s, wrong_s) if highlight == "digits" else ((0, len(right_s)), (0, len(wrong_s)))
    regions = [[s + w_span[0], s + w_span[1], -1] for s in w_starts]
    if mark_correct:
        regions += [[s + c_span[0], s + c_span[1], 1] for s in c_starts]
    return {
        "prompt": q.prompt,
        "correct_response": chosen,
        "incorrect_response": rejected,
        "masked_regions": regions,
    }


TASKS = ("arithmetic", "styled")


def split_questions(
    n_train: int,
    n_val: int,
    n_test: int,
    task: str = "arithmetic",
    seed: int = 0,
    ops: Sequence[str] = DEFAULT_OPS,
    ranges=WIDE_RANGES,
    mark_correct: bool = True,
    confound: float = DEFAULT_CONFOUND,
    highlight: str = "number",
) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test) pairs of `task` over three disjoint sets of questions.

    Validation and test hold one pair per question, each question distinct; training pairs cycle over
    the remaining questions (repeats draw new phrasings and errors). `task="arithmetic"`: the demo's
    minimal edits, wrong digits highlighted; `"styled"`: `make_styled_pair` with `confound` and `highlight`.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    rng = random.Random(seed)
    keys = question_pool(ops, ranges)
    if n_val + n_test >= len(keys):
        raise ValueError(f"n_val + n_test = {n_val + n_test} leaves no training question out of {len(keys)}; "
                         "widen `ranges`")
    rng.shuffle(keys)
    test_keys, val_keys, train_keys = keys[:n_test], keys[n_test:n_test + n_val], keys[n_test + n_val:]

    def styled(q, r):
        return make_styled_pair(q, r, confound, mark_correct, highlight)

    def pairs(keys_, n):
        return _pairs_for(keys_, n, rng, mark_correct, "digits", None if task == "arithmetic" else styled)

    test, val = pairs(test_keys, n_test), pairs(val_keys, n_val)
    return pairs(train_keys, n_train), val, test

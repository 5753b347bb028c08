"""The demo's arithmetic-correction data: deterministic, regions exactly on the wrong digits."""

import json
import random
import re

import pytest

from granular_po.apps.eval import extract_answer
from granular_po.data.synthetic import (
    STYLES,
    Question,
    diff_span,
    generate_pairs,
    keeps_worked_step,
    make_pair,
    split_questions,
    split_train_eval,
    write_json,
    wrong_result,
)


def _result_of(text: str) -> int:
    return int(re.findall(r"\d+", text)[-1])


def test_same_seed_same_pairs_other_seed_other_pairs():
    assert generate_pairs(40, seed=3) == generate_pairs(40, seed=3)
    assert generate_pairs(40, seed=3) != generate_pairs(40, seed=4)
    a, b = split_train_eval(30, 10, seed=5), split_train_eval(30, 10, seed=5)
    assert a == b


@pytest.mark.parametrize("ops", [("*",), ("+",), ("*", "+")])
@pytest.mark.parametrize("region_unit", ["digits", "number"])
def test_regions_lie_exactly_on_the_wrong_digits(ops, region_unit):
    for pair in generate_pairs(200, seed=1, ops=ops, mark_correct=True, region_unit=region_unit):
        chosen, rejected = pair["correct_response"], pair["incorrect_response"]
        right, wrong = str(_result_of(chosen)), str(_result_of(rejected))
        assert right != wrong
        # minimally edited: the same text once the results are blanked out
        assert re.sub(r"\b" + right + r"\b", "R", chosen) == re.sub(r"\b" + wrong + r"\b", "R", rejected)
        neg = [r for r in pair["masked_regions"] if r[2] == -1]
        pos = [r for r in pair["masked_regions"] if r[2] == 1]
        assert wrong not in re.findall(r"\d+", pair["prompt"])
        assert len(neg) == re.findall(r"\d+", rejected).count(wrong) >= 1
        assert len(pos) == re.findall(r"\d+", chosen).count(right)
        (cs, ce), (ws, we) = diff_span(right, wrong) if region_unit == "digits" else ((0, len(right)), (0, len(wrong)))
        for s, e, _ in neg:
            assert e > s and rejected[s:e] == wrong[ws:we]
            # the span sits inside an occurrence of the wrong number
            number = re.search(r"\d+", rejected[s - ws:])
            assert number.group() == wrong and number.start() == 0
        for s, e, _ in pos:
            assert e > s and chosen[s:e] == right[cs:ce]


def test_docstring_example_and_digit_spans():
    pair = {
        "prompt": "What is 7 * 8?",
        "correct_response": "7 * 8 = 56. The answer is 56.",
        "incorrect_response": "7 * 8 = 57. The answer is 57.",
        "masked_regions": [[9, 10, -1], [27, 28, -1]],
    }
    for s, e, _ in pair["masked_regions"]:
        assert pair["incorrect_response"][s:e] == "7"
    assert diff_span("56", "57") == ((1, 2), (1, 2))
    assert diff_span("56", "65") == ((0, 2), (0, 2))
    assert diff_span("56", "156") == ((0, 2), (0, 1))  # insertion: whole correct number, the extra digit
    assert diff_span("156", "56") == ((0, 1), (0, 2))  # deletion: the wrong side gets the whole number


def test_wrong_results_are_plausible_and_wrong():
    rng = random.Random(0)
    kinds = set()
    for a in range(2, 10):
        for b in range(11, 30):
            q = Question(a, "*", b)
            wrong, kind = wrong_result(q, rng)
            kinds.add(kind)
            assert wrong > 0 and wrong != q.answer
            if kind == "factor":
                assert wrong in {a * (b - 1), a * (b + 1), (a - 1) * b, (a + 1) * b}
    assert kinds == {"factor", "swap", "carry", "digit"}


def test_train_and_eval_share_no_question():
    train, evaluation = split_train_eval(500, 40, seed=2)  # more train pairs than train questions: repeats
    assert len(train) == 500 and len(evaluation) == 40

    def key(prompt):
        a, op, b = re.match(r"What is (\d+) (\S) (\d+)\?", prompt).groups()
        return op, min(int(a), int(b)), max(int(a), int(b))

    eval_keys = [key(p["prompt"]) for p in evaluation]
    assert len(set(eval_keys)) == 40
    assert not {key(p["prompt"]) for p in train} & set(eval_keys)
    with pytest.raises(ValueError, match="n_eval"):
        split_train_eval(10, 10_000, seed=0)


def test_write_json_is_the_research_format(tmp_path):
    pairs = generate_pairs(5, seed=0)
    path = write_json(tmp_path / "sub" / "train.json", pairs)
    loaded = json.loads(path.read_text())
    assert loaded == pairs
    assert set(loaded[0]) == {"prompt", "correct_response", "incorrect_response", "masked_regions"}


def test_make_pair_rejects_unknown_region_unit():
    with pytest.raises(ValueError):
        make_pair(Question(7, "*", 8), random.Random(0), region_unit="words")


# ---------------------------------------------------------------- the styled task


def _key(prompt):
    a, op, b = re.match(r"What is (\d+) (\S) (\d+)\?", prompt).groups()
    return op, min(int(a), int(b)), max(int(a), int(b))


def _style(pair, side):
    """'worked' restates the question and ends in "answer is R"; no terse phrasing has both."""
    a, op, b = re.match(r"What is (\d+) (\S) (\d+)\?", pair["prompt"]).groups()
    text = pair[side]
    return "worked" if f"{a} {op} {b}" in text and "answer is" in text else "terse"


@pytest.mark.parametrize("mark_correct", [False, True])
def test_styled_regions_are_exactly_the_whole_results(mark_correct):
    train, val, test = split_questions(300, 50, 50, task="styled", seed=3, mark_correct=mark_correct)
    for pair in train + val + test:
        chosen, rejected = pair["correct_response"], pair["incorrect_response"]
        q = Question(*(lambda a, op, b: (int(a), op, int(b)))(
            *re.match(r"What is (\d+) (\S) (\d+)\?", pair["prompt"]).groups()))
        right = str(q.answer)
        wrong = {rejected[s:e] for s, e, f in pair["masked_regions"] if f == -1}
        assert len(wrong) == 1 and wrong != {right}
        (wrong,) = wrong
        # every occurrence of the wrong result is a region, whole numbers only, and nothing else is
        occurrences = [m.span() for m in re.finditer(r"\d+", rejected) if m.group() == wrong]
        assert [[s, e, -1] for s, e in occurrences] == [r for r in pair["masked_regions"] if r[2] == -1]
        assert occurrences
        pos = [r[:2] for r in pair["masked_regions"] if r[2] == 1]
        right_spans = [list(m.span()) for m in re.finditer(r"\d+", chosen) if m.group() == right]
        assert pos == (right_spans if mark_correct else [])
        for s, e, f in pair["masked_regions"]:
            text = chosen if f == 1 else rejected
            assert text[s:e].strip() == text[s:e] and text[s:e].isdigit()
            assert (s == 0 or not text[s - 1].isdigit()) and (e == len(text) or not text[e].isdigit())
        # the held-out score reads the right result from the correct response
        assert extract_answer(chosen) == q.answer and extract_answer(rejected) == int(wrong)


def test_styled_sides_differ_in_more_than_the_error():
    train, _, _ = split_questions(400, 10, 10, task="styled", seed=0, confound=0.0)
    blank = [(re.sub(r"\d+", "N", p["correct_response"]), re.sub(r"\d+", "N", p["incorrect_response"]))
             for p in train]
    different = sum(c != r for c, r in blank) / len(blank)
    assert different > 0.6  # not minimal edits: phrasing, length, extra sentences drawn per side
    lengths = {len(c) - len(r) for c, r in blank}
    assert max(lengths) > 30 and min(lengths) < -30


@pytest.mark.parametrize("confound", [0.0, 0.5, 1.0])
def test_styled_confound_share_is_honoured(confound):
    train, _, _ = split_questions(2000, 10, 10, task="styled", seed=1, confound=confound)
    aligned = sum(_style(p, "correct_response") == "worked" and _style(p, "incorrect_response") == "terse"
                  for p in train) / len(train)
    # aligned with probability confound, else by chance (styles drawn uniformly per side: 1/4)
    expected = confound + (1 - confound) / 4
    assert abs(aligned - expected) < 0.035, (aligned, expected)
    if confound == 1.0:
        assert aligned == 1.0
    with pytest.raises(ValueError, match="confound"):
        split_questions(10, 1, 1, task="styled", confound=1.5)


@pytest.mark.parametrize("task", ["arithmetic", "styled"])
def test_split_questions_are_disjoint_and_deterministic(task):
    train, val, test = split_questions(1000, 100, 200, task=task, seed=4)
    assert (len(train), len(val), len(test)) == (1000, 100, 200)
    keys = {name: [_key(p["prompt"]) for p in part] for name, part in
            (("train", train), ("val", val), ("test", test))}
    assert len(set(keys["test"])) == 200 and len(set(keys["val"])) == 100
    assert not set(keys["train"]) & set(keys["val"])
    assert not set(keys["train"]) & set(keys["test"])
    assert not set(keys["val"]) & set(keys["test"])
    assert split_questions(1000, 100, 200, task=task, seed=4) == (train, val, test)
    assert split_questions(1000, 100, 200, task=task, seed=5)[2] != test
    with pytest.raises(ValueError, match="task"):
        split_questions(10, 1, 1, task="poetry")
    with pytest.raises(ValueError, match="n_val"):
        split_questions(10, 500, 500, task=task)


def test_styled_digits_highlight_marks_only_the_differing_digits_of_the_same_texts():
    """--highlight digits: the same pairs (texts and draws) as the whole-number default, each region cut
    down to the digits that differ from the right result, so a shared leading digit is not penalised."""
    number = split_questions(300, 20, 20, task="styled", seed=3)
    digits = split_questions(300, 20, 20, task="styled", seed=3, highlight="digits")
    shorter = 0
    for part_n, part_d in zip(number, digits):
        for pn, pd in zip(part_n, part_d):
            assert {k: v for k, v in pn.items() if k != "masked_regions"} == \
                   {k: v for k, v in pd.items() if k != "masked_regions"}
            right, wrong = str(extract_answer(pd["correct_response"])), str(extract_answer(pd["incorrect_response"]))
            c_span, w_span = diff_span(right, wrong)
            spans = {1: c_span, -1: w_span}
            assert len(pn["masked_regions"]) == len(pd["masked_regions"])
            for (s, _, f), (sd, ed, fd) in zip(pn["masked_regions"], pd["masked_regions"]):
                assert f == fd and (sd, ed) == (s + spans[f][0], s + spans[f][1])
            shorter += any(ed - sd < e - s for (s, e, _), (sd, ed, _) in zip(pn["masked_regions"], pd["masked_regions"]))
    assert shorter > 100  # e.g. 56 vs 57: "7" only (about 40% of pairs share a leading digit)
    with pytest.raises(ValueError, match="highlight"):
        split_questions(10, 1, 1, task="styled", highlight="words")


def test_worked_step_is_told_from_the_generators_templates():
    """`keeps_worked_step` holds for every worked template and no terse one, with any opener or closer."""
    q = Question(7, "*", 13)
    for style, templates in STYLES.items():
        for template in templates:
            text = template.replace("{op}", q.op).format(a=q.a, b=q.b, r=q.answer)
            for framed in (text, f"Sure! {text} I hope this helps."):
                assert keeps_worked_step(framed, q) is (style == "worked"), framed
    assert keeps_worked_step("13 * 7 = 91. The answer is 91.", q)  # operands in either order
    assert not keeps_worked_step("The answer is 91. 7 * 13 = 91.", q)  # no answer after the restated step
    assert not keeps_worked_step("17 * 13 = 221. The answer is 221.", q)  # another operation

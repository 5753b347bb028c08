"""compare's test scoring made cheaper, with the same numbers: shared-prefix forwards against one forward per
side (and a plain forward of each text), the SFT baseline's cached scores, the start-up line's words."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer, toy_preference_pairs

from granular_po.apps import compare
from granular_po.apps.compare import metrics
from granular_po.apps.compare.metrics import (
    encode_pairs,
    forced_margins,
    paired_tail_logps,
    sequence_logps,
    shares_prefix,
)
from granular_po.data.records import make_record

TOL = 1e-4  # nats per item, fp32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    tokenizer = tiny_tokenizer("byte_level", chat=True)
    model = tiny_llama(len(tokenizer), hidden_size=32).eval()
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    return root, tokenizer, model


def _ragged_rows(vocab: int, n: int = 7, seed: int = 0):
    """(shared, tail a, tail b) rows of ragged lengths, with an empty tail and tails of unequal lengths."""
    rng = random.Random(seed)

    def ids(k: int) -> list[int]:
        return [rng.randrange(5, vocab) for _ in range(k)]

    rows = [(ids(rng.randint(1, 14)), ids(rng.randint(1, 9)), ids(rng.randint(1, 9))) for _ in range(n)]
    rows[2] = (rows[2][0], [], rows[2][2])  # a right result that is a token prefix of the wrong one
    return rows


def test_shared_prefix_rows_equal_one_forward_per_side(tiny):
    """7 ragged rows in batches of 3 (the last batch holds 1): every token's log-prob from the shared-prefix
    forward equals the per-side padded forward's (the path compare used before), and so does each sum."""
    _, tokenizer, model = tiny
    rows = _ragged_rows(len(tokenizer))
    assert shares_prefix(model, rows)  # the default path is the shared one on this model
    shared_a, shared_b = paired_tail_logps(model, rows, batch_size=3, shared=True)
    side_a, side_b = paired_tail_logps(model, rows, batch_size=3, shared=False)
    for got, want, tails in ((shared_a, side_a, [a for _, a, _ in rows]), (shared_b, side_b, [b for _, _, b in rows])):
        assert [len(x) for x in got] == [len(x) for x in want] == [len(t) for t in tails]
        for g, w in zip(got, want):
            assert g == pytest.approx(w, abs=TOL)
            assert sum(g) == pytest.approx(sum(w), abs=TOL)


def test_pair_metrics_log_probs_share_the_prompt_exactly(tiny):
    """The chosen / rejected log-probs of ragged pairs (prompts and responses of different lengths; 9 pairs in
    batches of 4) with the prompt read once equal the per-side forwards, token by token."""
    _, tokenizer, model = tiny
    records = [make_record(p["prompt"] * (1 + i % 3), p["correct_response"], p["incorrect_response"], "toy", i)
               for i, p in enumerate(toy_preference_pairs(9))]
    encoded = encode_pairs(records, tokenizer, max_length=256, max_prompt_length=128)
    shared = sequence_logps(model, encoded, batch_size=4)
    per_side = sequence_logps(model, encoded, batch_size=4, shared=False)
    for side in ("chosen", "rejected"):
        for i, e in enumerate(encoded):
            assert len(shared[side][i]) == len(e[f"{side}_ids"])
            assert shared[side][i] == pytest.approx(per_side[side][i], abs=TOL)


FORCED = [
    {"prompt": "What is 7 * 13?", "prefix": "7 * 13 = ", "right": "91", "wrong": "81", "end": "."},
    {"prompt": "What is 12 + 30?", "prefix": "Let's work it out. 12 + 30 = ", "right": "42", "wrong": "142", "end": ""},
    {"prompt": "What is 9 * 19?", "prefix": "Sure! 9 * 19 = ", "right": "171", "wrong": "1", "end": ". Done"},
    {"prompt": "What is 5 + 5?", "prefix": "The answer is ", "right": "10", "wrong": "100000", "end": "."},
    {"prompt": "What is 3 * 4?", "prefix": "", "right": "12", "wrong": "21", "end": "!"},
]


def test_forced_margins_read_prompt_and_prefix_once_with_the_same_numbers(tiny):
    """5 probes in batches of 2, right / wrong results that tokenize to different lengths: the shared forward's
    margins equal the per-side forwards' and a plain unpadded forward of each full text (hand-summed from the
    first token where the two differ)."""
    from granular_po.apps.eval import format_prompt

    _, tokenizer, model = tiny
    shared = forced_margins(model, tokenizer, FORCED, batch_size=2)
    per_side = forced_margins(model, tokenizer, FORCED, batch_size=2, shared=False)
    assert shared == pytest.approx(per_side, abs=TOL)

    def plain(text: str) -> tuple[list[int], list[float]]:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        return ids[0, 1:].tolist(), out.gather(-1, ids[0, 1:, None])[:, 0].tolist()

    lengths = set()
    for item, margin in zip(FORCED, shared):
        head = format_prompt(tokenizer, item["prompt"]) + item["prefix"]
        (ids_r, lp_r), (ids_w, lp_w) = plain(head + item["right"] + item["end"]), plain(head + item["wrong"] + item["end"])
        k = next(i for i, (x, y) in enumerate(zip(ids_r, ids_w)) if x != y)
        lengths.add(len(ids_r) - len(ids_w))
        assert margin == pytest.approx(sum(lp_r[k:]) - sum(lp_w[k:]), abs=TOL)
    assert lengths - {0}, "no probe whose right and wrong continuations tokenize to different lengths"


def test_a_model_whose_logits_are_not_its_head_output_is_scored_per_side(tiny):
    """Soft-capped logits: the shared route (which applies the lm_head itself) is refused, and the default
    path gives the per-side numbers."""
    _, tokenizer, _ = tiny
    model = tiny_llama(len(tokenizer), hidden_size=32).eval()
    model.config.final_logit_softcapping = 30.0
    rows = _ragged_rows(len(tokenizer), n=3)
    assert not shares_prefix(model, rows)
    assert paired_tail_logps(model, rows, batch_size=2) == paired_tail_logps(model, rows, batch_size=2, shared=False)


# ---------------------------------------------------------------- the SFT baseline's cached test scores


def _scorer(root: Path, test: Path, **change) -> metrics.TestScorer:
    settings = dict(max_length=256, max_prompt_length=128, synthetic=True, rouge=False, max_new_tokens=16,
                    batch_size=3) | change
    return metrics.TestScorer(test, root / "base", root / "eval" / "reference_logps.json", **settings)


def test_sft_test_scores_are_cached_and_recomputed_when_their_key_changes(tiny, capsys):
    """A second scorer (a resumed `compare`) reads the SFT model's test scores from the cache: no model is
    scored and the file is not rewritten. Changed SFT weights, test data or a scoring setting recompute, and
    say so."""
    from granular_po.data.synthetic import split_questions, write_json

    root, _, model = tiny
    test = write_json(root / "test.json", split_questions(4, 1, 5, task="styled", seed=1)[2])
    cache = root / "eval" / "sft_test_scores.json"
    completions = ["7 * 13 = 91. The answer is 91."] * 5

    first = _scorer(root, test)
    items = first.baseline(completions, cache)
    assert first.scorings == 1 and cache.is_file()
    assert set(items) >= {"sequence_margin", "preference_accuracy", "forced_margin", "worked_step"}
    written = cache.stat().st_mtime_ns

    again = _scorer(root, test)
    assert again.baseline(completions, cache) == items
    assert again.scorings == 0 and cache.stat().st_mtime_ns == written
    assert "cached in" in capsys.readouterr().out

    def recomputes(scorer: metrics.TestScorer, what: str, answers=completions) -> None:
        scorer.baseline(answers, cache)
        assert scorer.scorings == 1
        assert f"recomputed ({what} changed" in capsys.readouterr().out

    recomputes(_scorer(root, test, max_new_tokens=32), "max_new_tokens")
    recomputes(_scorer(root, test), "max_new_tokens")  # and back
    recomputes(_scorer(root, test), "completions", ["no worked step"] * 5)
    recomputes(_scorer(root, test), "completions")
    model.save_pretrained(root / "base")  # the same weights written again: a new checkpoint key
    recomputes(_scorer(root, test), "model")
    write_json(test, split_questions(4, 1, 5, task="styled", seed=2)[2])
    recomputes(_scorer(root, test), "data")
    current = _scorer(root, test)
    now = current.baseline(completions, cache)
    assert current.scorings == 0

    cache.write_text(cache.read_text()[:40])  # a file cut short (a kill mid-write of an older version)
    cut = _scorer(root, test)
    assert cut.baseline(completions, cache) == now and cut.scorings == 1
    assert "unreadable, recomputed" in capsys.readouterr().out
    assert not list(cache.parent.glob("*.tmp"))  # written beside and renamed into place


# ---------------------------------------------------------------- the start-up line


def test_start_line_counts_pairs_of_your_data_and_questions_of_a_task(tiny, tmp_path, capsys):
    """Your data (`--train/--val/--test`): the files' pair counts, in pairs; a synthetic task: its questions.
    Seen on `compare`'s own output (a bad arm stops it right after the line, before any training)."""
    root, _, _ = tiny
    pairs = toy_preference_pairs(10)
    files = {}
    for name, part in (("train", pairs[:5]), ("val", pairs[5:7]), ("test", pairs[7:])):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(part))
    bad_arm = ["--arm", "typo: loss=tdpo granular.outside_wieght=0.1"]
    with pytest.raises(SystemExit, match="unknown key"):
        compare.main(["--quick", "--model", str(root / "base"), "--out", str(tmp_path / "own"),
                      *(x for name in ("train", "val", "test") for x in (f"--{name}", str(files[name]))), *bad_arm])
    line = capsys.readouterr().out.splitlines()[0]
    assert line == f"compare: your data, 5 training, 2 validation and 3 test pairs -> {tmp_path / 'own'}"
    with pytest.raises(SystemExit, match="unknown key"):
        compare.main(["--quick", "--task", "arithmetic", "--model", str(root / "base"), "--out", str(tmp_path / "t"),
                      *bad_arm])
    line = capsys.readouterr().out.splitlines()[0]
    assert line == f"compare: task arithmetic, 16 training pairs, 4 validation and 4 test questions -> {tmp_path / 't'}"


def test_scoring_bench_prints_its_ratios(capsys):
    """`bench/scoring.py` on the tiny model: both paths timed, a ratio and the paths' largest difference."""
    import importlib.util
    import re

    spec = importlib.util.spec_from_file_location("bench_scoring", Path(__file__).resolve().parents[1] / "bench" / "scoring.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--models", "tiny", "--pairs", "5", "--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny |")]
    assert [row.split("|")[2].strip() for row in rows[-3:]] == ["pair metrics", "forced probes", "both"]
    for row in rows[-3:-1]:
        assert re.search(r"\| [0-9.]+x \| [0-9.]+x \| ([0-9.]+e[-+][0-9]+) \|$", row)
        assert float(row.split("|")[-2]) < 1e-4

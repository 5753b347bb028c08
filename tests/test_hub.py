"""The research code's hub datasets (hh, shp, se), read from small local files in the hub schema."""

from __future__ import annotations

import json
import math

import pytest
from datasets import Dataset

from granular_po.data.hub import (
    convert_hh_row,
    convert_se_row,
    convert_shp_row,
    load_hub_records,
    se_sft_record,
    strip_html_tags,
)
from granular_po.data.schema import DataError

HH_PROMPT = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant:"


# ---------------------------------------------------------------------------------------------------
# hh


def test_convert_hh_row_splits_at_the_last_assistant_turn():
    r = convert_hh_row({"chosen": HH_PROMPT + " 4", "rejected": HH_PROMPT + " 5"}, 7)
    assert (r.prompt, r.chosen, r.rejected, r.index) == (HH_PROMPT, " 4", " 5", 7)
    assert r.source == "Anthropic/hh-rlhf" and not r.is_annotated


@pytest.mark.parametrize("row, field", [
    ({"chosen": "no turns", "rejected": "no turns"}, "chosen"),
    ({"chosen": HH_PROMPT + " 4", "rejected": "\n\nHuman: other\n\nAssistant: 5"}, "rejected"),
    ({"chosen": HH_PROMPT + " 4"}, "rejected"),
    ({"chosen": HH_PROMPT + " ", "rejected": HH_PROMPT + " 5"}, "chosen"),
])
def test_convert_hh_row_errors_name_the_field(row, field):
    with pytest.raises(DataError) as info:
        convert_hh_row(row, 3)
    assert f"'{field}'" in str(info.value) and "record 3" in str(info.value)


# ---------------------------------------------------------------------------------------------------
# shp

SHP_ROW = {"history": "Why is the sky blue?", "human_ref_A": "Rayleigh scattering.", "human_ref_B": "Magic.",
           "labels": 1, "score_A": 10, "score_B": 3}


def test_convert_shp_row_orders_by_label_and_filters_by_ratio():
    r = convert_shp_row(SHP_ROW, 0)
    assert r.prompt == "\n\nHuman: Why is the sky blue?\n\nAssistant:"
    assert (r.chosen, r.rejected) == (" Rayleigh scattering.", " Magic.")
    flipped = convert_shp_row({**SHP_ROW, "labels": 0}, 1)
    assert (flipped.chosen, flipped.rejected) == (" Magic.", " Rayleigh scattering.")
    assert convert_shp_row({**SHP_ROW, "score_B": 0}, 2).chosen == " Rayleigh scattering."
    for scores in ((10, 6), (0, 0)):
        with pytest.raises(DataError) as info:
            convert_shp_row({**SHP_ROW, "score_A": scores[0], "score_B": scores[1]}, 4)
        assert info.value.code == "shp_low_ratio" and "record 4" in str(info.value)
    with pytest.raises(DataError, match="labels"):
        convert_shp_row({**SHP_ROW, "labels": True}, 5)
    with pytest.raises(DataError, match="score_B"):
        convert_shp_row({**SHP_ROW, "score_B": math.nan}, 5)


# ---------------------------------------------------------------------------------------------------
# se


def test_strip_html_keeps_paragraph_text_and_code_blocks_as_the_research_code():
    """Each top-level <p> gives its own text nodes only (a nested tag's text is dropped, as there), <pre>
    its <code> blocks, a top-level <code> itself; lists and other elements are dropped."""
    html = ("<p>Use <code>sorted</code> &amp; done</p>\n<pre><code>x = [3, 1]\nx.sort()\n</code></pre>"
            "<ul><li>dropped</li></ul><code>y</code>loose text")
    assert strip_html_tags(html) == "Use  & done\n\n<code>x = [3, 1]\nx.sort()\n</code>\n\n<code>y</code>"
    assert strip_html_tags("no tags at all") == ""


def test_convert_se_row_makes_every_pair_ordered_by_score():
    """Issue 11.13: n(n-1)/2 pairs per question (here 6 for 4 answers), not only the best against the rest;
    the higher score chosen, the later answer on a tie, in the research code's (i, j) order."""
    row = {"question": "<p>How to sort?</p>", "answers": [
        {"text": "<p>A0</p>", "pm_score": 2}, {"text": "<p>A1</p>", "pm_score": 5},
        {"text": "<p>A2</p>", "pm_score": 2}, {"text": "<p>A3</p>", "pm_score": 5},
    ]}
    pairs, errors = convert_se_row(row, 9, first_index=100)
    assert not errors and [p.index for p in pairs] == list(range(100, 106))
    assert all(p.prompt == "\n\nHuman: How to sort?\n\nAssistant:" for p in pairs)
    assert [(p.chosen, p.rejected) for p in pairs] == [
        (" A1", " A0"), (" A2", " A0"), (" A3", " A0"), (" A1", " A2"), (" A3", " A1"), (" A3", " A2")]
    assert se_sft_record(row, 9).chosen == se_sft_record(row, 9).rejected == " A1"  # first of the best
    assert convert_se_row({"question": "q", "answers": []}, 0) == ([], [])
    assert convert_se_row({"question": "q", "answers": [{"text": "<p>a</p>", "pm_score": 1}]}, 0) == ([], [])
    with pytest.raises(DataError, match=r"answers\[0\]"):
        convert_se_row({"question": "q", "answers": [{"text": "a", "pm_score": "1"}]}, 0)


def test_an_answer_empty_after_stripping_is_left_out_and_counted():
    row = {"question": "<p>q</p>", "answers": [{"text": "<p>a</p>", "pm_score": 1},
                                                {"text": "<ul><li>list only</li></ul>", "pm_score": 3},
                                                {"text": "<p>c</p>", "pm_score": 2}]}
    pairs, errors = convert_se_row(row, 0)
    assert [(p.index, p.chosen, p.rejected) for p in pairs] == [(1, " c", " a")]
    assert [(e.index, e.field_name, e.code) for e in errors] == [(0, "answers[1]", "se_empty_answer"),
                                                                 (2, "answers[1]", "se_empty_answer")]
    assert se_sft_record(row, 0).chosen == " c"  # the best non-empty answer


# ---------------------------------------------------------------------------------------------------
# Loading from local files in the hub schema


def _se_rows(n: int) -> list[dict]:
    """Question i has i % 4 answers: 0, 0, 1 and 3 pairs; scores with ties."""
    rows = []
    for i in range(n):
        answers = [{"answer_id": 10 * i + k, "text": f"<p>answer {k} of {i}</p>", "pm_score": (k * 7 + i) % 3,
                    "selected": False} for k in range(i % 4)]
        rows.append({"qid": i, "question": f"<p>Question {i}?</p>", "answers": answers,
                     "date": "2020-01-01", "metadata": []})
    return rows


def test_se_splits_one_hub_split_after_a_seeded_shuffle(tmp_path):
    """Issue 11.13: se has one hub split; test = the first 1% after shuffle(seed=42), the rest train."""
    rows = _se_rows(250)
    hub = tmp_path / "se"
    hub.mkdir()
    Dataset.from_list(rows).to_parquet(hub / "train.parquet")
    cache = str(tmp_path / "cache")
    test, test_report = load_hub_records("se", "test", cache_dir=cache, path=str(hub))
    train, train_report = load_hub_records("se", "train", cache_dir=cache, path=str(hub))

    shuffled = [r["qid"] for r in Dataset.from_list(rows).shuffle(seed=42)]
    test_q, train_q = shuffled[:2], shuffled[2:]  # int(250 * 0.01) = 2
    pairs = {r["qid"]: len(r["answers"]) * (len(r["answers"]) - 1) // 2 for r in rows}
    assert len(test) == test_report.n_kept == sum(pairs[q] for q in test_q)
    assert len(train) == sum(pairs[q] for q in train_q) == 250 // 4 * 4 - len(test)  # 4 pairs per 4 questions
    asked = {int(r.prompt.split("Question ")[1].split("?")[0]) for r in test}
    assert asked <= set(test_q) and not asked & set(train_q)
    assert test[0].source == "HuggingFaceH4/stack-exchange-preferences:test"
    assert [r.index for r in train] == list(range(len(train)))
    sft, _ = load_hub_records("se", "train", cache_dir=cache, path=str(hub), sft=True)
    assert len(sft) == sum(1 for q in train_q if len(rows[q]["answers"]) >= 1)  # one per question with an answer
    assert all(r.chosen == r.rejected for r in sft)
    with pytest.raises(ValueError, match="se has a train and a test split"):
        load_hub_records("se", "validation", path=str(hub))


def test_shp_pairs_filtered_and_sft_target_is_the_best_response_of_the_prompt(tmp_path):
    rows = [
        {**SHP_ROW, "post_id": "a"},
        {**SHP_ROW, "post_id": "a", "human_ref_A": "Blue light scatters more.", "score_A": 30, "labels": 1},
        {**SHP_ROW, "post_id": "a", "score_B": 9},  # ratio 10/9: filtered out
        {**SHP_ROW, "post_id": "b", "history": "Why is grass green?", "human_ref_A": "Chlorophyll.",
         "score_A": 2, "human_ref_B": "Paint.", "score_B": 8, "labels": 0},
    ]
    hub = tmp_path / "shp"
    hub.mkdir()
    Dataset.from_list(rows).to_parquet(hub / "test.parquet")
    Dataset.from_list(rows[:1]).to_parquet(hub / "train.parquet")
    cache = str(tmp_path / "cache")
    pairs, report = load_hub_records("shp", "test", cache_dir=cache, path=str(hub))
    assert [r.index for r in pairs] == [0, 1, 3] and report.skipped == {"shp_low_ratio": 1}
    assert (pairs[2].chosen, pairs[2].rejected) == (" Paint.", " Chlorophyll.")
    assert "shp_low_ratio=1: record 2" in report.summary()
    sft, _ = load_hub_records("shp", "test", cache_dir=cache, path=str(hub), sft=True)
    assert [(r.prompt.split("Human: ")[1][:12], r.chosen, r.index) for r in sft] == [
        ("Why is the s", " Blue light scatters more.", 1), ("Why is grass", " Paint.", 3)]
    assert len(load_hub_records("shp", "train", cache_dir=cache, path=str(hub))[0]) == 1


def test_hh_splits_and_sft_records_one_per_pair(tmp_path):
    hub = tmp_path / "hh"
    hub.mkdir()
    good = {"chosen": HH_PROMPT + " 4", "rejected": HH_PROMPT + " 5"}
    (hub / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [good, good, good]))
    (hub / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [good, {"chosen": "x", "rejected": "x"}]))
    cache = str(tmp_path / "cache")
    train, _ = load_hub_records("hh", "train", cache_dir=cache, path=str(hub))
    assert len(train) == 3 and train[0].source == "Anthropic/hh-rlhf:train"  # same prompt: still 3 pairs
    with pytest.raises(DataError, match="record 1"):
        load_hub_records("hh", "test", cache_dir=cache, path=str(hub))
    test, report = load_hub_records("Anthropic/hh-rlhf", "test", on_invalid="skip", cache_dir=cache, path=str(hub))
    assert len(test) == 1 and report.skipped == {"hh_format": 1}
    sft, _ = load_hub_records("hh", "train", cache_dir=cache, path=str(hub), sft=True)
    assert [(r.chosen, r.rejected) for r in sft] == [(" 4", " 4")] * 3


def test_unknown_and_unavailable_hub_datasets(tmp_path):
    with pytest.raises(ValueError, match="unknown hub dataset"):
        load_hub_records("nope")
    with pytest.raises(DataError) as info:
        load_hub_records("hh", path=str(tmp_path / "missing"), cache_dir=str(tmp_path / "cache"))
    assert info.value.code == "hub_unavailable" and "missing" in str(info.value)


def test_train_reads_se_as_the_research_code_sft_targets_for_sft(tmp_path, monkeypatch):
    """The training recipe asks the hub loader for SFT records under loss=sft and for pairs otherwise."""
    import datasets
    from tiny import tiny_tokenizer

    from granular_po.training.config import compose_config
    from granular_po.training.recipe import load_split

    hub = tmp_path / "se"
    hub.mkdir()
    rows = _se_rows(8)  # 8 questions (1% test: none) with 0-3 answers: 0+0+1+3 pairs twice, 6 SFT targets
    Dataset.from_list(rows).to_parquet(hub / "train.parquet")
    real_load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda name, **kw: real_load(
        str(hub) if name == "HuggingFaceH4/stack-exchange-preferences" else name, **kw))
    tok = tiny_tokenizer("byte_level")
    for loss, expected in (("sft", 6), ("dpo", 8)):
        cfg = compose_config([f"loss={loss}", "datasets=[se]", f"cache_dir={tmp_path / 'cache'}", "prompt_format=raw"])
        ds, _ = load_split(cfg, "train", tok, cfg.encode_options(), cfg.granular, sft=loss == "sft")
        assert len(ds) == expected, loss

"""Prompt formats, end-of-response tokens, truncation, and the Arrow dataset."""

from __future__ import annotations

import os

import pytest
from tiny import TINY_TOKENIZER_KINDS, tiny_tokenizer
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from granular_po.data.encode import (
    EncodeOptions,
    build_dataset,
    check_offsets,
    encode_record,
    end_of_turn_id,
    resolve_layout,
    response_token_share,
)
from granular_po.data.masks import GranularOptions
from granular_po.data.schema import DataError, LoadReport, PreferenceRecord, Region, RegionFlag

ON = GranularOptions(enabled=True)
C, R = RegionFlag.CORRECT, RegionFlag.INCORRECT
KEYS = {"index", "prompt_ids", "chosen_ids", "chosen_weights", "rejected_ids", "rejected_weights",
        "sft_weights", "chosen_flags", "rejected_flags"}


def record(index: int = 0, prompt: str = "What is 7 * 8?", regions=None) -> PreferenceRecord:
    chosen, rejected = "The answer is 56.", "The answer is 54."
    regions = ((Region(14, 16, C), Region(14, 16, R)) if regions is None else regions)
    return PreferenceRecord(prompt, chosen, rejected, regions, "mem", index)


@pytest.mark.parametrize("kind", TINY_TOKENIZER_KINDS)
def test_raw_format(kind):
    tok = tiny_tokenizer(kind, chat=True)
    row = encode_record(record(3), tok, EncodeOptions(prompt_format="raw"), ON)
    assert set(row) == KEYS | {"unreached_regions"} and row["index"] == 3 and row["unreached_regions"] == []
    assert row["prompt_ids"] == tok("What is 7 * 8?", add_special_tokens=False)["input_ids"]
    for side in ("chosen", "rejected"):
        n = len(row[f"{side}_ids"])
        assert row[f"{side}_ids"][-1] == tok.eos_token_id
        assert row[f"{side}_ids"].count(tok.eos_token_id) == 1
        assert len(row[f"{side}_weights"]) == len(row[f"{side}_flags"]) == n
    assert len(row["sft_weights"]) == len(row["chosen_ids"])


def test_chat_format():
    tok = tiny_tokenizer("byte_level", chat=True)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(tok) == im_end
    enc = EncodeOptions()  # auto -> chat, the tokenizer has a template
    assert resolve_layout(tok, enc).chat
    row = encode_record(record(), tok, enc, ON)
    gen_prompt = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert row["prompt_ids"][-len(gen_prompt):] == gen_prompt
    assert tok.decode(row["prompt_ids"]).startswith("<|im_start|>user\nWhat is 7 * 8?<|im_end|>")
    assert row["chosen_ids"][-1] == row["rejected_ids"][-1] == im_end
    assert row["chosen_weights"][-1] == 1.0
    assert not resolve_layout(tiny_tokenizer("byte_level"), enc).chat  # no template: raw
    with pytest.raises(ValueError, match="chat template"):
        resolve_layout(tiny_tokenizer("byte_level"), EncodeOptions(prompt_format="chat"))


def test_raw_prepends_bos_once_when_the_tokenizer_adds_one():
    tok = tiny_tokenizer("byte_level")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    tok.bos_token = "<|im_start|>"
    row = encode_record(record(), tok, EncodeOptions(prompt_format="raw"), ON)
    assert row["prompt_ids"][0] == 1 and row["prompt_ids"].count(1) == 1
    assert 1 not in row["chosen_ids"] and 1 not in row["rejected_ids"]


def test_eos_text_inside_a_response_is_text():
    tok = tiny_tokenizer("byte_level")
    rec = PreferenceRecord("Q", "a <|endoftext|> b", "c", ())
    row = encode_record(rec, tok, EncodeOptions(prompt_format="raw"), ON)
    assert row["chosen_ids"].count(tok.eos_token_id) == 1 and row["chosen_ids"][-1] == tok.eos_token_id


@pytest.mark.parametrize("kind", TINY_TOKENIZER_KINDS)
@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_truncation_keeps_end_token_and_aligned_weights(kind, mode):
    tok = tiny_tokenizer(kind)
    prompt = " ".join(f"word{i}" for i in range(40))
    chosen = "The answer is 56. " * 6 + "Final."
    rejected = "The answer is 54. " * 6 + "Final."
    regions = (Region(14, 16, C), Region(len(rejected) - 6, len(rejected), R))
    rec = PreferenceRecord(prompt, chosen, rejected, regions)
    full = encode_record(rec, tok, EncodeOptions(max_length=4096, max_prompt_length=2048, prompt_format="raw"), ON)
    enc = EncodeOptions(max_length=24, max_prompt_length=8, prompt_format="raw", truncation_mode=mode)
    cut = encode_record(rec, tok, enc, ON)

    p = full["prompt_ids"]
    assert cut["prompt_ids"] == (p[-8:] if mode == "keep_end" else p[:8])
    for side in ("chosen", "rejected"):
        ids, w = cut[f"{side}_ids"], cut[f"{side}_weights"]
        assert len(cut["prompt_ids"]) + len(ids) <= 24
        assert len(ids) == 24 - 8 and ids[-1] == tok.eos_token_id  # the end token survives
        assert ids[:-1] == full[f"{side}_ids"][: len(ids) - 1]
        assert w[:-1] == full[f"{side}_weights"][: len(w) - 1] and w[-1] == full[f"{side}_weights"][-1]
        assert cut[f"{side}_flags"][:-1] == full[f"{side}_flags"][: len(ids) - 1]
    assert cut["chosen_weights"][-1] == 1.0 and 1.0 in cut["chosen_weights"][:-1]  # "56" kept, weighted
    assert cut["rejected_weights"][:-1] == [0.0] * 15  # rejected region ("Final.") was cut away
    assert cut["sft_weights"] == cut["sft_weights"][:-1] + [full["sft_weights"][-1]]


def test_options_validation():
    with pytest.raises(ValueError, match="max_length"):
        EncodeOptions(max_length=10, max_prompt_length=9)
    with pytest.raises(ValueError):
        EncodeOptions(prompt_format="markdown")
    with pytest.raises(ValueError):
        EncodeOptions(truncation_mode="middle")
    with pytest.raises(ValueError):
        EncodeOptions(max_prompt_length=0)


def test_build_dataset_round_trip_and_cache(tmp_path):
    tok = tiny_tokenizer("byte_level", chat=True)
    recs = [record(i, prompt=f"Question {i}?") for i in range(5)]
    recs.append(PreferenceRecord("same prompt", "Paris.", "Madrid.", (), "mem", 5))
    recs.append(PreferenceRecord("same prompt", "Paris!", "Rome.", (), "mem", 6))  # same prompt: 2 pairs
    enc = EncodeOptions()
    ds = build_dataset(recs, tok, enc, ON, cache_dir=tmp_path)
    assert set(ds.column_names) == KEYS and len(ds) == len(recs)
    for rec, row in zip(recs, ds):
        expected = encode_record(rec, tok, enc, ON)
        assert row == {k: expected[k] for k in KEYS}
    files = [f["filename"] for f in ds.cache_files]
    assert files and all(os.path.dirname(f) == str(tmp_path) for f in files)
    again = build_dataset(recs, tok, enc, ON, cache_dir=tmp_path)
    assert [f["filename"] for f in again.cache_files] == files and again[0] == ds[0]
    other = build_dataset(recs, tok, enc, GranularOptions(enabled=False), cache_dir=tmp_path)
    assert [f["filename"] for f in other.cache_files] != files  # options are part of the fingerprint
    assert set(other[0]["chosen_weights"]) == {1.0}
    assert len(build_dataset([], tok, enc, ON)) == 0


def test_build_dataset_num_proc():
    tok = tiny_tokenizer("whitespace_bpe")
    recs = [record(i) for i in range(6)]
    one = build_dataset(recs, tok, EncodeOptions(), ON)
    two = build_dataset(recs, tok, EncodeOptions(), ON, num_proc=2)
    assert one.to_list() == two.to_list()


def test_response_token_share():
    tok = tiny_tokenizer("byte_level")
    recs = [record(0), record(1, regions=())]
    ds = build_dataset(recs, tok, EncodeOptions(), ON)
    rows = ds.to_list()
    nonzero = sum(w != 0 for r in rows for k in ("chosen_weights", "rejected_weights") for w in r[k])
    total = sum(len(r[k]) for r in rows for k in ("chosen_weights", "rejected_weights"))
    assert response_token_share(ds) == pytest.approx(nonzero / total)
    assert response_token_share(rows) == pytest.approx(nonzero / total)
    # record 0: chosen 9 tokens, '56' and the end token weighted; rejected 10, '5', '4' and the end token;
    # record 1 (no region): all 9 + 10
    assert (nonzero, total) == (2 + 3 + 19, 9 + 10 + 19)
    assert response_token_share(ds.select([1])) == 1.0  # unannotated pair: every token
    assert response_token_share([]) == 0.0


# ---------------------------------------------------------------------------------- regions reaching no token


def no_token_records() -> list[PreferenceRecord]:
    """Two good pairs, then: a zero-length region (rec 2), a region past max_length (rec 3), and a pair whose
    second region is fine but whose first marks nothing (rec 4)."""
    long = "The answer is " + "very " * 30 + "56."
    return [
        record(0), record(1),
        PreferenceRecord("Q?", "The answer is 56.", "The answer is 54.", (Region(14, 14, R),), "mem", 2),
        PreferenceRecord("Q?", long, "The answer is 54.", (Region(len(long) - 3, len(long) - 1, C),), "mem", 3),
        PreferenceRecord("Q?", "The answer is 56.", "The answer is 54.", (Region(3, 3, C), Region(14, 16, R)),
                         "mem", 4),
    ]


SHORT = EncodeOptions(max_length=40, max_prompt_length=16, prompt_format="raw")


def test_a_region_reaching_no_token_is_an_error_naming_record_and_region():
    """Issue 11.8: such pairs were counted as annotated and trained on their end token alone."""
    tok = tiny_tokenizer("byte_level")
    recs = no_token_records()
    with pytest.raises(DataError) as error:
        build_dataset(recs, tok, SHORT, ON)
    assert error.value.index == 2 and error.value.field_name == "masked_region" and error.value.code == "region_reaches_no_token"
    assert "region [14, 14) of the incorrect response is empty" in str(error.value)
    with pytest.raises(DataError, match=r"mem, record 3, field 'masked_region': region \[164, 166\) of the "
                       r"correct response \('56'\) lies past max_length=40: its tokens are truncated away"):
        build_dataset(recs[3:], tok, SHORT, ON)
    with pytest.raises(DataError, match=r"record 4, field 'masked_regions\[0\]': region \[3, 3\)"):
        build_dataset(recs[4:], tok, SHORT, ON)
    spaces = PreferenceRecord("Q?", "The answer  is 56.", "The answer is 54.", (Region(11, 12, C),), "mem", 7)
    with pytest.raises(DataError, match=r"record 7, .*\(' '\) overlaps no token"):  # dropped by Whitespace()
        build_dataset([spaces], tiny_tokenizer("whitespace_bpe"), SHORT, ON)
    # with a longer max_length record 3 reaches its tokens; granular off: regions are not used at all
    assert len(build_dataset(recs[3:4], tok, EncodeOptions(max_length=512, prompt_format="raw"), ON)) == 1
    assert len(build_dataset(recs, tok, SHORT, GranularOptions(enabled=False))) == 5


def test_a_region_cut_beside_one_that_reaches_a_token_keeps_the_pair_with_a_notice(caplog):
    tok = tiny_tokenizer("byte_level")
    long = "The answer is " + "very " * 30 + "56."
    rec = PreferenceRecord("Q?", long, "The answer is 54.", (Region(4, 10, C), Region(len(long) - 3, len(long), C)),
                           "mem", 9)
    with caplog.at_level("WARNING", logger="granular_po"):
        ds = build_dataset([rec], tok, SHORT, ON)
    assert ds["index"] == [9] and sum(ds[0]["chosen_weights"]) >= 2  # 'answer' and the end token
    assert "1 pair has a region that reaches no token" in caplog.text and "(record 9)" in caplog.text


def test_a_region_reaching_no_token_is_skipped_counted_and_named():
    tok = tiny_tokenizer("byte_level")
    recs = no_token_records()
    report = LoadReport("mem", n_read=5, n_kept=5, n_regions=sum(len(r.regions) for r in recs))
    ds = build_dataset(recs, tok, SHORT, ON, on_invalid="skip", report=report)
    assert ds["index"] == [0, 1] and "unreached_regions" not in ds.column_names
    assert report.skipped == {"region_reaches_no_token": 3} and report.n_kept == 2 and report.n_regions == 4
    assert "skipped 3 (region_reaches_no_token=3: records 2, 3, 4)" in report.summary()
    assert any("record 3" in m and "past max_length" in m for m in report.first_errors)


# ---------------------------------------------------------------------------------- tokenizers with broken offsets


class ZeroWidthOffsets(PreTrainedTokenizerFast):
    """A real tokenizer whose offsets come back zero-width, as Llama-3's did under tokenizers < 0.20.1."""

    def __call__(self, *args, **kwargs):
        out = super().__call__(*args, **kwargs)
        if "offset_mapping" in out:
            out["offset_mapping"] = [(s, s) for s, _ in out["offset_mapping"]]
        return out


def broken_tokenizer() -> PreTrainedTokenizerFast:
    good = tiny_tokenizer("byte_level")
    tok = ZeroWidthOffsets(tokenizer_object=good.backend_tokenizer, eos_token="<|endoftext|>", pad_token="<pad>")
    tok.name_or_path = "zero-width-offsets"
    return tok


def test_a_tokenizer_whose_offsets_do_not_cover_the_text_is_refused():
    """Issue 11.9: with zero-width offsets every region marked nothing, silently."""
    broken = broken_tokenizer()
    with pytest.raises(ValueError, match=r"tokenizer 'zero-width-offsets': its offset mapping does not cover"):
        build_dataset([record(0)], broken, EncodeOptions(prompt_format="raw"), ON)
    with pytest.raises(ValueError, match=r"tokenizers>=0.20.1"):
        resolve_layout(broken, EncodeOptions(prompt_format="raw"))
    for kind in TINY_TOKENIZER_KINDS:  # real offsets pass, whitespace dropped by the pre-tokenizer or not
        check_offsets(tiny_tokenizer(kind), "a  b\n\tc 56, 54!")


def test_inspect_refuses_a_tokenizer_with_broken_offsets(tmp_path, monkeypatch, capsys):
    from granular_po.apps import inspect as inspect_cmd

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "p", "correct_response": "It is 5.", "incorrect_response": "It is 6."}\n')
    monkeypatch.setattr(inspect_cmd, "load_tokenizer", lambda name: broken_tokenizer())
    assert inspect_cmd.main([str(data), "--tokenizer", "x", "--prompt-format", "raw"]) == 2
    err = capsys.readouterr().err
    assert "offset mapping does not cover" in err and "Traceback" not in err

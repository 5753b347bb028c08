"""Record loading: every hostile input gives a named DataError or a counted skip, never a traceback."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from granular_po.data import records as records_mod
from granular_po.data.records import (
    iter_records,
    load_records,
    record_to_dict,
    write_records,
)
from granular_po.data.schema import DataError, LoadReport, PreferenceRecord, Region, RegionFlag

HOSTILE = Path(__file__).parent / "data" / "hostile"
EOS = "<|endoftext|>"

# file -> (code, substrings of the message, file-level: raises even with on_invalid="skip")
INVALID = {
    "truncated.json": ("bad_json", ["truncated.json", "line 15", "truncated"], True),
    "one_bad_line.jsonl": ("bad_json", ["one_bad_line.jsonl", "record 1", "line 2"], False),
    "float_index.json": ("bad_index", ["float_index.json", "record 0", "'masked_region'", "must be an integer",
                                       "14.0"], False),
    "string_index.json": ("bad_index", ["record 0", "'masked_region'", "must be an integer", "string"], False),
    "negative_index.json": ("bad_index", ["record 0", "'masked_region'", "non-negative", "-1"], False),
    "bool_index.json": ("bad_index", ["record 0", "'masked_region'", "must be an integer", "boolean"], False),
    "nan_index.json": ("bad_index", ["record 0", "'masked_region'", "must be an integer", "nan"], False),
    "huge_int.jsonl": ("bad_json", ["huge_int.jsonl", "record 0", "line 1", "digits"], False),
    "lone_surrogate.jsonl": ("bad_unicode", ["lone_surrogate.jsonl", "record 1", "'correct_response'",
                                             "surrogate", "U+D800", "line 2"], False),
    "invalid_utf8.jsonl": ("bad_encoding", ["invalid_utf8.jsonl", "record 1", "line 2", "UTF-8"], False),
    "flag_two.json": ("bad_flag", ["flag_two.json", "record 0", "'masked_region'", "flag", "2"], False),
    "start_after_end.json": ("region_order", ["record 0", "'masked_region'", "start 15", "end 14"], False),
    "end_beyond.json": ("region_out_of_range", ["record 0", "'masked_region'", "end 17", "length 16",
                                                "code points"], False),
    "missing_field.json": ("missing_field", ["missing_field.json", "record 1", "'incorrect_response'"], False),
    "empty_response.json": ("empty_response", ["record 0", "'incorrect_response'", "empty"], False),
    "eos_in_text.json": ("eos_in_text", ["record 0", "'correct_response'", EOS], False),
    "not_object.json": ("not_object", ["not_object.json", "record 1", "JSON object", "list"], False),
    "triple_length.json": ("bad_region", ["record 0", "'masked_region'", "triple", "length 2"], False),
    "region_not_list.json": ("bad_region", ["record 0", "'masked_region'", "string"], False),
    "mistyped_text.json": ("bad_type", ["record 0", "'prompt'", "must be a string", "integer 42"], False),
    "conflicting_alias.json": ("conflicting_fields", ["record 0", "'correct_response'", "'chosen'"], False),
    "pretty_object.json": ("not_a_list", ["pretty_object.json", "expected a JSON list or JSONL", "'data'"], True),
    "one_line_object.json": ("not_a_list", ["one_line_object.json", "expected a JSON list or JSONL", "'data'"],
                             True),
    "deep_nesting.json": ("bad_json", ["deep_nesting.json", "RecursionError"], True),
    "empty.jsonl": ("empty_file", ["empty.jsonl", "empty"], True),
    "empty_list.json": ("empty_file", ["empty_list.json", "no records"], True),
}
# file -> number of records kept (all valid, loaded with on_invalid="error")
VALID = {
    "nul_char.jsonl": 1, "crlf.jsonl": 2, "touching_ends.json": 1, "overlapping.json": 1, "zero_length.json": 1,
    "unicode_mix.jsonl": 1, "bom.jsonl": 1, "duplicate_prompts.jsonl": 2, "aliases.jsonl": 3, "flag_zero.json": 1,
    "identical.json": 1,
}


def test_every_hostile_file_has_an_expected_outcome():
    assert {p.name for p in HOSTILE.iterdir()} == set(INVALID) | set(VALID)


@pytest.mark.parametrize("name", sorted(INVALID))
def test_hostile_file_raises_a_named_data_error(name):
    code, parts, file_level = INVALID[name]
    with pytest.raises(DataError) as info:
        load_records(HOSTILE / name, eos_text=EOS)
    assert info.value.code == code
    for part in parts:
        assert part in str(info.value), (part, str(info.value))
    if file_level:
        with pytest.raises(DataError):
            load_records(HOSTILE / name, on_invalid="skip", eos_text=EOS)
    else:
        records, report = load_records(HOSTILE / name, on_invalid="skip", eos_text=EOS)
        # one bad record per file; a pretty-printed object read as JSONL is 9 bad lines
        assert report.skipped == {code: 9 if name == "pretty_object.json" else 1}
        assert report.n_read == report.n_kept + report.n_skipped == len(records) + report.n_skipped
        assert code in report.summary() and report.first_errors


@pytest.mark.parametrize("name", sorted(VALID))
def test_hostile_but_valid_file_loads(name):
    records, report = load_records(HOSTILE / name, eos_text=EOS)
    assert len(records) == report.n_kept == VALID[name]
    assert [r.index for r in records] == sorted(r.index for r in records)
    for r in records:
        for region in r.regions:
            assert 0 <= region.start <= region.end <= len(r.chosen if region.in_chosen else r.rejected)


def test_a_records_list_wrapped_in_an_object_is_named_as_such():
    """Issue 13.9: {"data": [...]} said "record 0, field 'prompt': missing"."""
    for name in ("pretty_object.json", "one_line_object.json"):
        with pytest.raises(DataError) as info:
            load_records(HOSTILE / name)
        assert "record 0" not in str(info.value) and "missing" not in str(info.value)
        assert str(info.value).endswith("expected a JSON list or JSONL (one record per line), got one JSON object "
                                        "with keys 'data': put the records in a top-level list [{...}, ...]")


def test_identical_responses_are_skipped_counted_and_named_even_in_error_mode():
    records, report = load_records(HOSTILE / "identical.json")
    assert [r.index for r in records] == [0] and report.skipped == {"identical_responses": 1}
    assert report.summary().endswith("read 2 records, kept 1, 1 region; skipped 1 (identical_responses=1: record 1)")
    assert "record 1, field 'incorrect_response': is identical to the correct response" in report.first_errors[0]


def test_summary_counts_are_singular_for_one(tmp_path):
    one = {"prompt": "Q", "correct_response": "It is 5.", "incorrect_response": "It is 6.", "masked_region": [6, 7, -1]}
    (tmp_path / "one.jsonl").write_text(json.dumps(one) + "\n")
    _, report = load_records(tmp_path / "one.jsonl")
    assert report.summary().endswith("read 1 record, kept 1, 1 region")
    report.n_read, report.n_regions = 0, 2
    assert "read 0 records, kept 1, 2 regions" in report.summary()


def test_nul_crlf_bom_survive_as_text():
    (nul,), _ = load_records(HOSTILE / "nul_char.jsonl")
    assert nul.chosen == "A\x00B is fine" and nul.rejected[nul.regions[0].start] == "C"
    crlf, _ = load_records(HOSTILE / "crlf.jsonl")
    assert all("\r" not in r.chosen + r.rejected for r in crlf) and [r.index for r in crlf] == [0, 1]
    (bom,), _ = load_records(HOSTILE / "bom.jsonl")
    assert bom.prompt == "Q: 2+3?"


def test_unicode_offsets_are_code_points():
    (r,), _ = load_records(HOSTILE / "unicode_mix.jsonl")
    assert [r.rejected[g.start:g.end] for g in r.regions] == ["六", "ستة"]


def test_boundary_regions_are_kept_exactly():
    (r,), _ = load_records(HOSTILE / "touching_ends.json")
    assert r.regions == (Region(0, 3, RegionFlag.INCORRECT), Region(14, 16, RegionFlag.INCORRECT),
                         Region(0, 16, RegionFlag.CORRECT))
    (z,), _ = load_records(HOSTILE / "zero_length.json")
    assert all(g.start == g.end for g in z.regions) and z.is_annotated
    (o,), _ = load_records(HOSTILE / "overlapping.json")
    assert len(o.regions) == 4  # duplicates and nesting are kept; masks take the union


def test_flag_zero_is_skipped_and_counted_even_in_error_mode():
    records, report = load_records(HOSTILE / "flag_zero.json", on_invalid="error")
    assert [r.prompt for r in records] == ["kept"] and records[0].index == 1
    assert report.skipped == {"invalidated": 1} and "invalidated=1" in report.summary()


def test_duplicated_prompts_stay_distinct_pairs():
    records, _ = load_records(HOSTILE / "duplicate_prompts.jsonl")
    assert records[0].prompt == records[1].prompt
    assert (records[0].chosen, records[0].regions[0].start) != (records[1].chosen, records[1].regions[0].start)
    assert [r.index for r in records] == [0, 1]


def test_aliases_and_empty_region_forms():
    records, _ = load_records(HOSTILE / "aliases.jsonl")
    assert [(r.chosen, r.rejected, r.is_annotated) for r in records] == [("yes", "no", False)] * 2 + [
        ("yes", "no", True)]
    assert records[1].prompt == ""  # an empty prompt is allowed


def test_eos_check_only_when_asked():
    records, _ = load_records(HOSTILE / "eos_in_text.json")
    assert EOS in records[0].chosen


def test_one_bad_jsonl_line_is_skipped_alone():
    records, report = load_records(HOSTILE / "one_bad_line.jsonl", on_invalid="skip")
    assert [r.index for r in records] == [0, 2] and records[1].prompt == "other"
    assert report.skipped == {"bad_json": 1} and report.n_read == 3


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _line(**fields) -> str:
    base = {"prompt": "p", "correct_response": "good answer", "incorrect_response": "bad answer"}
    return json.dumps({**base, **fields})


def test_jsonl_index_counts_non_blank_lines_and_message_gives_the_line(tmp_path):
    path = _write(tmp_path, "gaps.jsonl", "\n" + _line() + "\n\n\n" + _line(masked_region=[0, 99, -1]) + "\n")
    with pytest.raises(DataError) as info:
        load_records(path)
    assert info.value.index == 1 and "record 1" in str(info.value) and "(line 5)" in str(info.value)


def test_field_level_errors(tmp_path):
    cases = {
        "both": (_line(masked_region=[0, 1, -1], masked_regions=[]), "conflicting_fields", "masked_region"),
        "regions_not_list": (_line(masked_regions=5), "bad_region", "masked_regions"),
        "nested_single": (_line(masked_region=[[0, 1, -1]]), "bad_region", "use 'masked_regions'"),
        "float_flag": (_line(masked_regions=[[0, 1, 1], [0, 1, -1.0]]), "bad_flag", "masked_regions[1]"),
        "bool_flag": (_line(masked_region=[0, 1, True]), "bad_flag", "boolean"),
        "chosen_length": (_line(masked_region=[0, 12, 1]), "region_out_of_range", "correct response's length 11"),
        "end_float": (_line(masked_region=[0, 3.0, -1]), "bad_index", "end must be an integer"),
        "text_list": (_line(incorrect_response=["a"]), "bad_type", "'incorrect_response'"),
        "text_null": (_line(prompt=None), "bad_type", "'prompt'"),
    }
    for name, (text, code, part) in cases.items():
        path = _write(tmp_path, f"{name}.jsonl", text + "\n")
        with pytest.raises(DataError) as info:
            load_records(path)
        assert (info.value.code, f"{name}.jsonl" in str(info.value)) == (code, True), name
        assert part in str(info.value) and "record 0" in str(info.value), (name, str(info.value))


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DataError) as info:
        load_records(tmp_path / "nope.jsonl", on_invalid="skip")
    assert info.value.code == "file_missing" and "nope.jsonl" in str(info.value)
    with pytest.raises(DataError) as info:
        load_records(tmp_path)
    assert info.value.code == "file_unreadable"


def test_on_invalid_must_be_known(tmp_path):
    with pytest.raises(ValueError, match="on_invalid"):
        load_records(HOSTILE / "bom.jsonl", on_invalid="ignore")


def test_unexpected_exception_becomes_a_data_error(monkeypatch):
    def boom(*args, **kwargs):
        raise KeyError("surprise")

    monkeypatch.setattr(records_mod, "parse_record", boom)
    with pytest.raises(DataError) as info:
        load_records(HOSTILE / "crlf.jsonl")
    assert info.value.code == "unexpected" and "KeyError" in str(info.value) and "record 0" in str(info.value)
    _, report = load_records(HOSTILE / "crlf.jsonl", on_invalid="skip")
    assert report.skipped == {"unexpected": 2}


def test_iter_records_streams_and_fills_the_report(tmp_path):
    path = _write(tmp_path, "s.jsonl", _line() + "\n" + _line() + "\n{broken\n")
    report = LoadReport(str(path))
    stream = iter_records(path, "error", report)
    assert next(stream).index == 0 and report.n_kept == 1  # yielded before the bad line is read
    assert next(stream).index == 1
    with pytest.raises(DataError, match="line 3"):
        next(stream)


def test_write_records_round_trips(tmp_path):
    records, _ = load_records(HOSTILE / "unicode_mix.jsonl")
    for name in ("out.jsonl", "out.json"):
        write_records(records, tmp_path / name)
        again, _ = load_records(tmp_path / name)
        assert [record_to_dict(r) for r in again] == [record_to_dict(r) for r in records]
    assert json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))[0]["masked_regions"][0][2] == -1
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------------
# Fuzz: random JSON-ish files either load or raise DataError, nothing else

_surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"])
# st.text() drops surrogates whatever its alphabet; joining a list of characters keeps them
_text = st.lists(st.one_of(st.characters(), _surrogates, st.sampled_from("\x00\r\n\\\" ")), max_size=12).map("".join)
_scalar = st.one_of(st.integers(-3, 30), st.integers(min_value=10**20), st.floats(), st.booleans(), st.none(),
                    st.text(max_size=3))
_triple = st.one_of(st.lists(_scalar, max_size=4), st.tuples(st.integers(-1, 20), st.integers(-1, 20),
                                                              st.sampled_from([1, -1, 0, 2])), _scalar)
_value = st.one_of(_text, _scalar)
_record = st.fixed_dictionaries({}, optional={
    "prompt": _value, "correct_response": _value, "incorrect_response": _value, "chosen": _value,
    "masked_region": _triple, "masked_regions": st.one_of(st.lists(_triple, max_size=3), _scalar),
})


@st.composite
def _plausible(draw):
    """A mostly valid record (so the fuzz also reaches region checks and kept records), maybe one field broken."""
    texts = st.one_of(st.text(min_size=1, max_size=12), _text)
    rec = {"prompt": draw(texts), "correct_response": draw(texts), "incorrect_response": draw(texts),
           "masked_regions": [list(t) for t in draw(st.lists(st.tuples(
               st.integers(0, 12), st.integers(0, 12), st.sampled_from([1, -1, -1, 0])), max_size=3))]}
    if draw(st.booleans()):
        rec[draw(st.sampled_from(sorted(rec)))] = draw(_scalar)
    return rec


_item = st.one_of(_plausible(), _plausible(), _record, _scalar, st.lists(_text, max_size=2))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(_item, max_size=6), layout=st.sampled_from(["list", "jsonl"]), ascii_only=st.booleans(),
       cut=st.one_of(st.none(), st.integers(0, 400)), eos=st.sampled_from([None, EOS, "a"]))
def test_fuzz_load_records_returns_records_or_raises_data_error(items, layout, ascii_only, cut, eos):
    if layout == "list":
        text = json.dumps(items, ensure_ascii=ascii_only)
    else:
        text = "\n".join(json.dumps(item, ensure_ascii=ascii_only) for item in items)
    data = text.encode("utf-8", "surrogatepass")[:cut]  # unescaped surrogates: invalid UTF-8 bytes
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"fuzz.{layout}"
        path.write_bytes(data)
        for mode in ("error", "skip"):
            try:
                records, report = load_records(path, on_invalid=mode, eos_text=eos)
            except DataError as e:
                assert str(e).startswith(str(path))
                continue
            assert report.n_read == report.n_kept + report.n_skipped and report.n_kept == len(records)
            for r in records:
                assert isinstance(r, PreferenceRecord)
                (r.prompt + r.chosen + r.rejected).encode("utf-8")
                assert r.chosen.strip() and r.rejected.strip()
                for g in r.regions:
                    assert g.flag != RegionFlag.INVALIDATE
                    assert 0 <= g.start <= g.end <= len(r.chosen if g.in_chosen else r.rejected)

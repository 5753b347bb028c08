"""Regions derived from a character diff of minimally edited pairs; the annotate file command and CLI."""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from granular_po.apps.annotate import main
from granular_po.data.annotate import _merge, annotate_file, derive_regions
from granular_po.data.records import load_records
from granular_po.data.schema import Region, RegionFlag

BAD, GOOD = RegionFlag.INCORRECT, RegionFlag.CORRECT


def _marked(text: str, regions, flag) -> list[str]:
    return [text[r.start:r.end] for r in regions if r.flag == flag]


def test_replacement_marks_the_whole_differing_number():
    chosen, rejected = "12 * 13 = 156, so 156.", "12 * 13 = 146, so 146."
    regions = derive_regions(chosen, rejected)
    assert _marked(rejected, regions, BAD) == ["146", "146"] and not _marked(chosen, regions, GOOD)
    regions = derive_regions(chosen, rejected, include_correct=True)
    assert _marked(chosen, regions, GOOD) == ["156", "156"]


@pytest.mark.parametrize(("chosen", "rejected", "bad", "good"), [
    ("The capital is Canberra.", "The capital is Sydney.", ["Sydney"], ["Canberra"]),  # not 'Syd', 'ey'
    ("It is 100 km.", "It is 90 km.", ["90"], ["100"]),
    ("Pi is 3.14 here.", "Pi is 3.15 here.", ["3.15"], ["3.14"]),
    ("Pay 1,000 now.", "Pay 2,000 now.", ["2,000"], ["1,000"]),
    ("7 * 8 = 56. Done.", "7 * 8 = 54! Done.", ["54!"], ["56."]),  # touching word and punctuation join
])
def test_regions_are_whole_words(chosen, rejected, bad, good):
    regions = derive_regions(chosen, rejected, include_correct=True)
    assert _marked(rejected, regions, BAD) == bad and _marked(chosen, regions, GOOD) == good


def test_extra_text_in_the_rejected_response_is_marked_without_edge_whitespace():
    """Issue 11.3: 'not ' (the old region) also weighted the token after it under a byte-level tokenizer."""
    regions = derive_regions("The answer is 5.", "The answer is not 5.", include_correct=True)
    assert _marked("The answer is not 5.", regions, BAD) == ["not"]
    # the correct side lacks text: its word where the two diverge is marked
    assert _marked("The answer is 5.", regions, GOOD) == ["5"]


def test_missing_text_marks_the_word_where_the_rejected_response_diverges():
    regions = derive_regions("I went to the store.", "I went store.", include_correct=True)
    assert regions == (Region(7, 12, BAD), Region(7, 13, GOOD))  # "store"; "to the"
    # missing only at the very end: the wrong step is the EOS, nothing to mark on the rejected side
    assert derive_regions("Done. Bye.", "Done.") == ()
    assert derive_regions("Done. Bye.", "Done.", include_correct=True) == (Region(6, 10, GOOD),)  # "Bye."
    # a whitespace-only difference stays a whitespace region (nothing else differs)
    assert derive_regions("a b", "a\tb") == (Region(1, 2, BAD),)


def test_identical_and_too_different_pairs():
    assert derive_regions("same", "same") == ()
    assert derive_regions("completely", "unrelated!") is None
    # "ab" vs "ac": 2 differing characters of 4 -> edit ratio 0.5 exactly
    assert derive_regions("ab", "ac", max_edit_ratio=0.5) == (Region(0, 2, BAD),)  # the whole word
    assert derive_regions("ab", "ac", max_edit_ratio=0.49) is None


def test_spans_are_code_points_and_merge_when_touching():
    chosen, rejected = "答案是五 👍", "答案是六 👎"
    assert _marked(rejected, derive_regions(chosen, rejected), BAD) == ["六", "👎"]
    assert _merge([(5, 7), (0, 2), (2, 3), (6, 9)]) == [(0, 3), (5, 9)]
    assert _merge([(1, 1), (3, 4)]) == [(1, 1), (3, 4)]


_small = st.text(alphabet="ab c1.\n", max_size=12)
_is_word = re.compile(r"\w").match


@settings(max_examples=200, deadline=None)
@given(chosen=_small, rejected=_small, include_correct=st.booleans())
@example(chosen="a", rejected="1.1a", include_correct=False)  # a number joined to letters is one word
def test_regions_are_in_bounds_sorted_whole_words_and_empty_only_for_a_prefix(chosen, rejected, include_correct):
    regions = derive_regions(chosen, rejected, include_correct, max_edit_ratio=1.0)
    assert regions is not None
    for r in regions:
        text = chosen if r.in_chosen else rejected
        assert 0 <= r.start < r.end <= len(text)
        piece = text[r.start:r.end]
        assert piece == piece.strip() or not piece.strip()  # no edge whitespace unless only whitespace
        # whole words: never starts or ends inside a run of word characters
        assert not (r.start > 0 and _is_word(text[r.start - 1]) and _is_word(text[r.start]))
        assert not (r.end < len(text) and _is_word(text[r.end - 1]) and _is_word(text[r.end]))
    bad = [(r.start, r.end) for r in regions if r.in_rejected]
    assert bad == sorted(bad) and all(a[1] < b[0] for a, b in zip(bad, bad[1:]))  # disjoint, not touching
    assert (not any(r.in_rejected for r in regions)) == chosen.startswith(rejected)
    # every differing non-whitespace character of the rejected response is inside a region
    for tag, i1, i2, _, _ in difflib.SequenceMatcher(None, rejected, chosen, autojunk=False).get_opcodes():
        for c in range(i1, i2) if tag != "equal" else ():
            assert rejected[c].isspace() or any(s <= c < e for s, e in bad)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"prompt": "2+3?", "correct_response": "It is 5.", "incorrect_response": "It is 6."},  # annotated
    {"prompt": "2+3?", "correct_response": "It is 5.", "incorrect_response": "It is 7.",
     "masked_region": [0, 2, -1]},  # kept as is
    {"prompt": "p", "correct_response": "same", "incorrect_response": "same"},  # identical
    {"prompt": "p", "correct_response": "completely", "incorrect_response": "unrelated!"},  # too large
    {"prompt": "p", "correct_response": "Done. Bye.", "incorrect_response": "Done."},  # nothing to mark
    {"prompt": "p", "correct_response": "x", "incorrect_response": "y", "masked_region": [0, 0, 0]},  # flag 0
]


@pytest.mark.parametrize("out_name", ["out.jsonl", "out.json"])
def test_annotate_file_writes_research_format_and_reports(tmp_path, out_name):
    src = _write_jsonl(tmp_path / "in.jsonl", ROWS)
    summary = annotate_file(src, tmp_path / out_name)
    assert (summary["annotated"], summary["already_annotated"], summary["written"], summary["read"]) == (1, 1, 2, 6)
    assert (summary["identical"], summary["too_large_diff"], summary["no_span"]) == ([2], [3], [4])
    assert summary["skipped"] == {"invalidated": 1}
    records, _ = load_records(tmp_path / out_name)
    assert [r.regions for r in records] == [(Region(6, 7, BAD),), (Region(0, 2, BAD),)]
    raw = (tmp_path / out_name).read_text(encoding="utf-8")
    first = json.loads(raw)[0] if out_name.endswith(".json") else json.loads(raw.splitlines()[0])
    assert first["masked_regions"] == [[6, 7, -1]] and first["correct_response"] == "It is 5."


def test_cli_prints_summary_and_exits_zero(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "in.jsonl", ROWS)
    assert main([str(src), str(tmp_path / "out.jsonl"), "--include-correct"]) == 0
    out = capsys.readouterr().out
    assert "read 6 records; annotated 2, already annotated 1; wrote 3" in out  # row 4: its flag 1 span
    assert "identical responses: 1 (records 2)" in out and "invalidated=1" in out and "(records 3)" in out
    records, _ = load_records(tmp_path / "out.jsonl")
    assert records[2].regions == (Region(6, 10, GOOD),)  # "Bye.", without the space before it
    assert main([str(src), str(tmp_path / "out.jsonl"), "--max-edit-ratio", "1"]) == 0
    assert "too large" not in capsys.readouterr().out


def test_cli_input_errors_exit_two_without_traceback(tmp_path, capsys):
    assert main([str(tmp_path / "missing.jsonl"), str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl" in err and "no such file" in err and "Traceback" not in err
    bad = _write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"prompt": "p", "correct_response": "a"}])
    assert main([str(bad), str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "record 1" in err and "'incorrect_response'" in err
    assert not (tmp_path / "out.jsonl").exists()
    assert main([str(bad), str(tmp_path / "out.jsonl"), "--skip-invalid"]) == 0
    assert "missing_field=1" in capsys.readouterr().out
    for ratio in ("2", "x", "nan"):
        with pytest.raises(SystemExit) as info:
            main([str(bad), str(tmp_path / "o.jsonl"), "--max-edit-ratio", ratio])
        assert info.value.code == 2 and "between 0 and 1" in capsys.readouterr().err


def test_cli_unwritable_output_exits_two(tmp_path, capsys):
    src = _write_jsonl(tmp_path / "in.jsonl", ROWS[:1])
    (tmp_path / "a_file").write_text("")
    assert main([str(src), str(tmp_path / "a_file" / "out.jsonl")]) == 2  # a folder that cannot exist
    assert "cannot write" in capsys.readouterr().err


def _annotate(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "granular_po.apps.cli", "annotate", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_cli_refuses_to_write_over_its_input_unless_in_place(tmp_path):
    """Issue 13.7: `annotate a.jsonl a.jsonl` overwrote the input and dropped the pairs it could not annotate."""
    src = _write_jsonl(tmp_path / "a.jsonl", ROWS)
    before = src.read_text(encoding="utf-8")
    run = _annotate(str(src), str(tmp_path / "." / "a.jsonl"))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "is the input file" in run.stderr and "--in-place" in run.stderr
    assert src.read_text(encoding="utf-8") == before
    run = _annotate(str(src), str(src), "--in-place")
    assert run.returncode == 0, run.stderr
    assert [r.index for r in load_records(src)[0]] == [0, 1]  # replaced: the two pairs it could write


def test_cli_creates_folders_and_names_what_it_could_not_annotate(tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "new" / "deeper" / "out.jsonl"
    run = _annotate(str(src), str(out))
    assert run.returncode == 0, run.stderr
    assert len(load_records(out)[0]) == 2
    lines = run.stdout.splitlines()
    assert lines[0] == f"{src}: read 6 records; annotated 1, already annotated 1; wrote 2 to {out}"
    assert "  not written, diff too large (edit ratio > 0.5), not a minimal edit: 1 (records 3)" in lines
    assert "  not written, identical responses: 1 (records 2)" in lines
    assert "  not written, the incorrect response only lacks text at its end (nothing to mark): 1 (records 4)" in lines
    assert "  not written, skipped while loading: 1 (invalidated=1: records 5)" in lines
    assert any("record 5, field 'masked_region': flag 0 marks the record invalid" in line for line in lines)


def test_cli_reads_parquet_and_csv_as_train_does(tmp_path, capsys):
    """Issue 23.2: annotate read JSON / JSONL only ("not valid UTF-8 on line 1" for parquet). Every format
    `load_data` takes is read here too (a CSV region cell holds JSON text; an empty cell: no region), and
    the output is our JSONL, the same whatever the input's format."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(r, masked_region=r.get("masked_region")) for r in ROWS[:2]]  # a table: every row every column
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    with open(tmp_path / "in.csv", "w", encoding="utf-8", newline="") as f:
        f.write("prompt,correct_response,incorrect_response,masked_region\n"
                '2+3?,It is 5.,It is 6.,\n2+3?,It is 5.,It is 7.,"[0, 2, -1]"\n')
    main([str(_write_jsonl(tmp_path / "in.jsonl", ROWS[:2])), str(tmp_path / "from_jsonl.jsonl")])
    expected = (tmp_path / "from_jsonl.jsonl").read_text(encoding="utf-8")
    for name in ("in.parquet", "in.csv"):
        assert main([str(tmp_path / name), str(tmp_path / "out.jsonl")]) == 0
        assert f"{name}: read 2 records; annotated 1, already annotated 1; wrote 2" in capsys.readouterr().out
        assert (tmp_path / "out.jsonl").read_text(encoding="utf-8") == expected
    with open(tmp_path / "renamed.csv", "w", encoding="utf-8", newline="") as f:
        f.write('q,good,bad,spans\n2+3?,It is 5.,It is 6.,\n2+3?,It is 5.,It is 7.,"[[0, 2, -1]]"\n')
    assert main([str(tmp_path / "renamed.csv"), str(tmp_path / "out.jsonl"), "--column", "prompt=q", "--column",
                 "chosen=good", "--column", "rejected=bad", "--column", "regions=spans"]) == 0
    assert (tmp_path / "out.jsonl").read_text(encoding="utf-8") == expected
    with open(tmp_path / "bad.csv", "w", encoding="utf-8", newline="") as f:
        f.write("prompt,correct_response,incorrect_response\n2+3?,It is 5.,\n")
    assert main([str(tmp_path / "bad.csv"), str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "bad.csv" in err and "record 0" in err and "'incorrect_response'" in err and "line 2" in err

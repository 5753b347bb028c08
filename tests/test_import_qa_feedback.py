"""`granular-po import qa-feedback`: QA-FEEDBACK rows -> records, on a 20-row slice of its dev split.

The slice (examples/qa_feedback/, Apache-2.0, see its README) is rows 0-18 of FineGrainedRLHF's
`dev_feedback.json` and row 87: rows 5 and 8 have no correction, row 87 (slice position 19) a
correction identical to the prediction, row 16 no error span.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import tiny_tokenizer

from granular_po.apps import inspect as inspect_cmd
from granular_po.apps.cli import main as cli
from granular_po.data.qa_feedback import load_qa_feedback
from granular_po.data.records import load_records
from granular_po.data.schema import DataError, RegionFlag

ROOT = Path(__file__).resolve().parents[1]
SLICE = ROOT / "examples" / "qa_feedback" / "dev_feedback_slice.json"
ROWS = json.loads(SLICE.read_text(encoding="utf-8"))


def test_slice_converts_to_records_with_each_error_span_a_rejected_region(tmp_path, capsys):
    out = tmp_path / "qa.jsonl"
    assert cli(["import", "qa-feedback", str(SLICE), str(out)]) == 0
    records, report = load_records(out)  # our own reader takes the output back as written
    assert len(records) == 17 and report.n_regions == sum(len(r.regions) for r in records)
    first = records[0]
    assert first.prompt == "When does bloom by troye sivan come out?"
    assert first.chosen == ROWS[0]["feedback"]["corrected-prediction"].rstrip()  # "... third single. " in the file
    assert first.rejected == ROWS[0]["prediction 1"]
    assert all(r.flag == RegionFlag.INCORRECT for r in first.regions)
    assert [first.rejected[r.start:r.end] for r in first.regions] == [  # sorted by start, as in the text
        "The album follows up his 2015 debut studio album, Blue Neighbourhood, and features guest appearances "
        "from Gordi and Ariana Grande.",
        "The lead single from the album was released on 10 January 2018, accompanied by a music video directed "
        "by Grant Singer.",
        "American singer Ariana Grande was released on 13 June as the album's fourth single.",
    ]
    kept = [i for i in range(len(ROWS)) if i not in (5, 8, 19)]
    for record, i in zip(records, kept):  # every span of every kept row, at the file's offsets
        spans = sorted((e["start"], e["end"]) for e in ROWS[i]["feedback"]["errors"])
        assert [(r.start, r.end) for r in record.regions] == spans
    assert records[kept.index(16)].regions == ()  # a correction without a span: kept, response-level
    printed = capsys.readouterr().out
    assert "1 record kept without a span" in printed and "wrote 17 records" in printed


def test_rows_without_or_with_an_identical_correction_are_named_and_counted():
    records, report, _ = load_qa_feedback(SLICE, on_invalid="error")  # filters, not errors: never raised
    assert (report.n_read, report.n_kept, len(records)) == (20, 17, 17)
    assert report.skipped == {"correction_missing": 2, "correction_identical": 1}
    assert report.skipped_indices == {"correction_missing": [5, 8], "correction_identical": [19]}
    assert [r.index for r in records] == [i for i in range(20) if i not in (5, 8, 19)]  # row positions kept
    assert "record 19" in report.summary() and "correction_identical=1" in report.summary()


def test_with_passages_puts_the_passages_first_and_the_question_last():
    bare, _, _ = load_qa_feedback(SLICE)
    full, _, _ = load_qa_feedback(SLICE, with_passages=True)
    prompt = full[0].prompt
    assert prompt.startswith("Passage 1: Bloom (Troye Sivan album)\n")
    assert prompt.endswith("\n\nQuestion: When does bloom by troye sivan come out?")
    assert "Passage 2: " in prompt and "The fifth single, \"Animal\", was released on 9 August." in prompt
    assert [(r.chosen, r.rejected, r.regions) for r in full] == [(r.chosen, r.rejected, r.regions) for r in bare]


def test_error_types_keeps_only_those_spans_and_counts_the_rest():
    records, _, dropped = load_qa_feedback(SLICE, error_types=["Redundant"])
    n_redundant = sum(e["error type"] == "Redundant" for i, row in enumerate(ROWS) if i not in (5, 8, 19)
                      for e in row["feedback"]["errors"])
    assert sum(len(r.regions) for r in records) == n_redundant > 0
    assert dropped["Irrelevant"] > 0 and "Redundant" not in dropped
    with pytest.raises(ValueError, match="unknown error type.*'Irelevant'"):
        load_qa_feedback(SLICE, error_types=["Irelevant"])


def _bad_slice(tmp_path, **error) -> Path:
    rows = json.loads(json.dumps(ROWS[:3]))
    rows[1]["feedback"]["errors"][0].update(error)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(("error", "code", "words"), [
    ({"end": 10_000}, "region_out_of_range", "beyond the incorrect response's length"),
    ({"start": 3.0}, "bad_index", "start must be an integer"),
    ({"start": 40, "end": 40}, "bad_region", "is empty"),
])
def test_a_bad_span_names_file_row_and_field_or_is_skipped_and_counted(tmp_path, capsys, error, code, words):
    path = _bad_slice(tmp_path, **error)
    with pytest.raises(DataError, match=words) as caught:
        load_qa_feedback(path)
    assert (caught.value.index, caught.value.field_name, caught.value.code) == (1, "feedback.errors[0]", code)
    assert cli(["import", "qa-feedback", str(path), str(tmp_path / "o.jsonl")]) == 2
    assert "bad.json, record 1, field 'feedback.errors[0]'" in capsys.readouterr().err
    assert cli(["import", "qa-feedback", str(path), str(tmp_path / "o.jsonl"), "--skip-invalid"]) == 0
    assert f"{code}=1: record 1" in capsys.readouterr().out


def test_shipped_dev_file_is_what_the_reader_writes(tmp_path):
    """examples/qa_feedback/dev.jsonl was written by this reader from the full dev split: its first
    records are the slice's (rows 0-18), record for record."""
    shipped = [json.loads(line) for line in (ROOT / "examples" / "qa_feedback" / "dev.jsonl").open(encoding="utf-8")]
    assert len(shipped) == 481  # 500 rows, 13 without a correction, 6 with an identical one
    out = tmp_path / "qa.jsonl"
    assert cli(["import", "qa-feedback", str(SLICE), str(out)]) == 0
    mine = [json.loads(line) for line in out.open(encoding="utf-8")][:16]  # rows 0-18 less 5 and 8
    assert shipped[:16] == mine


def test_inspect_reads_the_output(tmp_path, capsys):
    tok = tmp_path / "tok"
    tiny_tokenizer("byte_level", chat=True).save_pretrained(tok)
    out = tmp_path / "qa.jsonl"
    assert cli(["import", "qa-feedback", str(SLICE), str(out)]) == 0
    assert inspect_cmd.main([str(out), "--tokenizer", str(tok), "--max-length", "1024"]) == 0
    assert "kept 17, 45 regions" in capsys.readouterr().out

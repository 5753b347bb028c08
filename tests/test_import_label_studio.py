"""`granular-po import label-studio`: a Label Studio JSON export -> records.

On the shipped example (examples/label_studio/export.json: 4 tasks, two annotators on task 102, a
cancelled annotation beside a submitted one on 103, only a cancelled one on 104) and on hand-made
tasks for each rule: the side from to_name, the label's meaning, merge / latest, text checks.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from granular_po.apps.cli import main as cli
from granular_po.data.label_studio import SIDES, load_label_studio
from granular_po.data.records import load_records
from granular_po.data.schema import DataError, RegionFlag

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "label_studio"
GOOD, BAD = RegionFlag.CORRECT, RegionFlag.INCORRECT


def _marked(record) -> list[tuple[str, RegionFlag]]:
    return [((record.chosen if r.flag == GOOD else record.rejected)[r.start:r.end], r.flag) for r in record.regions]


def test_shipped_export_merges_annotators_and_leaves_out_cancelled_annotations(tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    assert cli(["import", "label-studio", str(EXAMPLE / "export.json"), str(out)]) == 0
    records, _ = load_records(out)
    assert [_marked(r) for r in records] == [
        [("36", GOOD), ("26", BAD), ("146", BAD), ("146", BAD)],  # task 101: both 146s, at their own offsets
        [("Mercury", GOOD), ("Venus", BAD), ("108 million km", BAD)],  # 102: annotators 1 and 2, "Venus" once
        [("froid", BAD)],  # 103: the submitted annotation; the cancelled one is left out
    ]
    printed = capsys.readouterr().out
    assert "skipped 1 (all_cancelled=1: record 3)" in printed and "task 104" in printed
    assert "cancelled annotations (left out): 2 (tasks 103, 104)" in printed
    assert "tasks with several annotations merged: 1 (task 102)" in printed


def test_latest_takes_the_last_updated_annotation_only():
    records, report, _ = load_label_studio(EXAMPLE / "export.json", annotators="latest")
    assert _marked(records[1]) == [("Venus", BAD), ("108 million km", BAD)]  # annotator 2, a day later
    assert report.skipped == {"all_cancelled": 1}


def _task(tid, correct="The answer is 56.", incorrect="The answer is 54.", annotations=()):
    return {"id": tid, "data": {"prompt": "What is 7 * 8?", "correct_response": correct, "incorrect_response": incorrect},
            "annotations": list(annotations), "predictions": []}


def _ann(aid, *spans, updated="2024-11-04T09:00:00Z", cancelled=False):
    return {"id": aid, "completed_by": aid, "was_cancelled": cancelled, "updated_at": updated,
            "result": [{"type": "labels", "from_name": side.split("_")[0] + "_labels", "to_name": side,
                        "value": {"start": s, "end": e, "text": text, "labels": [label]}}
                       for side, s, e, text, label in spans]}


def _export(tmp_path, *tasks) -> Path:
    path = tmp_path / "export.json"
    path.write_text(json.dumps(list(tasks), ensure_ascii=False), encoding="utf-8")
    return path


def test_side_comes_from_to_name_and_label_meaning_is_fixed(tmp_path):
    path = _export(tmp_path, _task(7, annotations=[_ann(
        1, ("correct_response", 14, 16, "56", "good"), ("incorrect_response", 14, 16, "54", "error"),
        ("incorrect_response", 0, 3, "The", "good"))]))  # a "good" span of the incorrect response: no region
    records, _, notes = load_label_studio(path)
    assert _marked(records[0]) == [("56", GOOD), ("54", BAD)]
    assert notes == ["'good' spans in incorrect responses (not regions): 1 (task 7)"]


def test_error_in_the_correct_response_is_refused_with_the_task_id(tmp_path, capsys):
    path = _export(tmp_path, _task(7, annotations=[_ann(1, ("correct_response", 14, 16, "56", "error"))]),
                   _task(8, annotations=[_ann(2, ("incorrect_response", 14, 16, "54", "error"))]))
    with pytest.raises(DataError, match="task 7: 'error' marked in the correct response") as caught:
        load_label_studio(path)
    assert caught.value.field_name == "annotations[0].result[0].value.labels"
    assert cli(["import", "label-studio", str(path), str(tmp_path / "o.jsonl"), "--skip-invalid"]) == 0
    assert "error_in_correct=1: record 0" in capsys.readouterr().out


@pytest.mark.parametrize(("text", "incorrect", "start", "end", "hint"), [
    ("54", "The answer is 55.", 14, 16, "reads '55'"),  # the task's text was edited after annotation
    ("54", "🙂 The answer is 54.", 17, 19, "UTF-16 code units"),  # old Label Studio: 🙂 counted as 2
])
def test_span_whose_text_differs_from_the_response_is_refused(tmp_path, text, incorrect, start, end, hint):
    path = _export(tmp_path, _task(41, incorrect=incorrect,
                                   annotations=[_ann(1, ("incorrect_response", start, end, text, "error"))]))
    with pytest.raises(DataError, match=f"task 41: '54' is not the incorrect_response's text.*{hint}") as caught:
        load_label_studio(path)
    assert (caught.value.index, caught.value.code) == (0, "span_text_mismatch")
    assert caught.value.field_name == "annotations[0].result[0].value.text"


def test_code_point_offsets_after_an_emoji_are_read_as_python_indices(tmp_path):
    incorrect = "🙂 The answer is 54."
    start = incorrect.index("54")  # 16 code points (Label Studio since its emoji fix), 17 UTF-16 units
    path = _export(tmp_path, _task(5, incorrect=incorrect,
                                   annotations=[_ann(1, ("incorrect_response", start, start + 2, "54", "error"))]))
    assert _marked(load_label_studio(path)[0][0]) == [("54", BAD)]


def test_merge_joins_overlapping_spans_of_two_annotators_and_latest_ignores_list_order(tmp_path):
    older = _ann(1, ("incorrect_response", 4, 10, "answer", "error"), updated="2024-11-04T09:00:00Z")
    newer = _ann(2, ("incorrect_response", 6, 15, "swer is 5", "error"), updated="2024-11-05T09:00:00.5+00:00")
    path = _export(tmp_path, _task(9, annotations=[newer, older]))
    merged, _, _ = load_label_studio(path, "merge")
    assert _marked(merged[0]) == [("answer is 5", BAD)]  # one region, not two overlapping ones
    latest, _, _ = load_label_studio(path, "latest")
    assert _marked(latest[0]) == [("swer is 5", BAD)]


def test_tasks_nobody_annotated_or_only_cancelled_are_skipped_and_counted(tmp_path):
    path = _export(tmp_path, _task(1), _task(2, annotations=[_ann(1, cancelled=True), _ann(2, cancelled=True)]),
                   _task(3, annotations=[_ann(3)]))  # submitted without a span: a response-level pair
    records, report, _ = load_label_studio(path)  # filters: never raised, even with on_invalid="error"
    assert report.skipped_indices == {"no_annotation": [0], "all_cancelled": [1]}
    assert [(r.index, r.regions) for r in records] == [(2, ())]


@pytest.mark.parametrize(("change", "code", "words"), [
    (lambda t: t["annotations"][0]["result"][0].update(to_name="prompt"), "unknown_target", "labels a string 'prompt'"),
    (lambda t: t["annotations"][0]["result"][0]["value"].update(labels=["wrong"]), "unknown_label", "'good' or 'error'"),
    (lambda t: t["annotations"][0]["result"][0]["value"].update(end=99), "bad_region", "length 17"),
    (lambda t: t["data"].pop("correct_response"), "missing_field", "missing"),
])
def test_malformed_tasks_name_the_task_and_field(tmp_path, change, code, words):
    task = _task(12, annotations=[_ann(1, ("incorrect_response", 14, 16, "54", "error"))])
    change(task)
    with pytest.raises(DataError, match=words) as caught:
        load_label_studio(_export(tmp_path, task))
    assert caught.value.code == code and "task 12" in str(caught.value)


def test_other_exports_are_refused_with_what_to_do(tmp_path, capsys):
    json_min = _export(tmp_path, {"id": 1, "prompt": "p", "correct_response": "a", "incorrect_labels": []})
    assert cli(["import", "label-studio", str(json_min), str(tmp_path / "o.jsonl")]) == 2
    assert "JSON-MIN export" in capsys.readouterr().err
    csv = tmp_path / "export.csv"
    csv.write_text("id,prompt\n1,p\n", encoding="utf-8")
    assert cli(["import", "label-studio", str(csv), str(tmp_path / "o.jsonl")]) == 2
    assert "export the project as JSON" in capsys.readouterr().err


def test_config_names_match_the_reader_and_the_example_export():
    """config.xml's <Text> names are the reader's sides and the data keys; each response has one <Labels>
    with "good" and "error"; the example export's from_name / to_name are the config's."""
    view = ET.parse(EXAMPLE / "config.xml").getroot()
    texts = {t.get("name"): t.get("value") for t in view.iter("Text")}
    assert texts == {"prompt": "$prompt", "correct_response": "$correct_response",
                     "incorrect_response": "$incorrect_response"}
    labels = {lab.get("name"): (lab.get("toName"), sorted(x.get("value") for x in lab.iter("Label")))
              for lab in view.iter("Labels")}
    assert sorted(to for to, _ in labels.values()) == sorted(SIDES)
    assert all(values == ["error", "good"] for _, values in labels.values())
    tasks = json.loads((EXAMPLE / "export.json").read_text(encoding="utf-8"))
    pairs = {(r["from_name"], r["to_name"]) for t in tasks for a in t["annotations"] for r in a["result"]}
    assert pairs == {(name, to) for name, (to, _) in labels.items()}


@pytest.mark.parametrize("source", ["qa-feedback", "label-studio"])
def test_every_import_option_has_help_and_its_default(source, capsys):
    import argparse

    from granular_po.apps.importers import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = subparsers.choices[source]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = formatter._expand_help(action)
        assert text.strip() and "(default: None)" not in text, f"{source} {action.dest}"
        if action.option_strings and action.default not in (None, False):
            assert "default" in text.lower(), f"{source} {action.option_strings}: default not shown"
    with pytest.raises(SystemExit) as done:
        cli(["import", source, "--help"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith(f"usage: granular-po import {source}")

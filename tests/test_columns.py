"""`--column KEY=NAME` on eval and compare, as train's `columns.KEY=NAME` (and inspect's / annotate's flag):
one parser of the flag, one renaming of a row (`rows.rename_columns`), errors naming the file's spelling."""

from __future__ import annotations

import json

import pytest

from granular_po.apps import annotate as annotate_cmd
from granular_po.apps import compare
from granular_po.apps import eval as evaluate
from granular_po.apps import inspect as inspect_cmd
from granular_po.data.formats import load_data
from granular_po.data.records import load_records

COLUMNS = ["--column", "prompt=question", "--column", "chosen=good", "--column", "rejected=bad",
           "--column", "regions=spans"]
MAPPING = {"prompt": "question", "chosen": "good", "rejected": "bad", "regions": "spans"}


def renamed_rows(n: int = 10) -> list[dict]:
    return [{"question": f"What is {i} + 1?", "good": f"It is {i + 1}.", "bad": f"It is {i}.",
             "spans": [[6, 6 + len(str(i)), -1]]} for i in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_eval_grades_renamed_columns(tmp_path, capsys):
    rows = renamed_rows(3) + [{"question": "", "good": "It is 2.", "bad": "It is 3.", "spans": []}]
    data = write_jsonl(tmp_path / "q.jsonl", rows)
    questions, ungraded, total = evaluate.load_questions(data, columns=MAPPING)
    assert [(q.index, q.prompt, q.answer) for q in questions] == [(i, f"What is {i} + 1?", i + 1) for i in range(3)]
    assert total == 4 and ungraded[0][0] == 3
    assert ungraded[0][1].startswith("field 'question' missing or not a non-empty string")  # the file's name
    # without the mapping nothing can be graded: the fields are not where eval looks
    assert evaluate.load_questions(data)[0] == []
    # the command: the data is read (and graded records found) before the model loads
    assert evaluate.main(["--model", str(tmp_path / "no_model"), "--data", str(data), *COLUMNS]) == 2
    assert "cannot load model" in capsys.readouterr().err
    assert evaluate.main(["--model", str(tmp_path / "no_model"), "--data", str(data)]) == 1
    assert "nothing to grade" in capsys.readouterr().err
    missing = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "What is 1 + 1?", "answer": 2}])
    assert evaluate.main(["--model", "unused", "--data", str(missing), "--column", "prompt=question"]) == 1
    assert "field 'question': missing (columns.prompt=question)" in capsys.readouterr().err


def test_the_flag_is_one_parser_in_every_command(tmp_path, capsys):
    data = write_jsonl(tmp_path / "q.jsonl", renamed_rows(2))
    message = "--column: answer: unknown; the keys are prompt, chosen, rejected, regions"
    runs = [lambda extra: evaluate.main(["--model", "unused", "--data", str(data), *extra]),
            lambda extra: inspect_cmd.main([str(data), "--tokenizer", "unused", *extra]),
            lambda extra: annotate_cmd.main([str(data), str(tmp_path / "a.jsonl"), *extra])]
    for run in runs:
        assert run(["--column", "answer=good"]) == 2
        assert message in capsys.readouterr().err
        assert run(["--column", "prompt=good", "--column", "chosen=good"]) == 2
        assert "the same column is named for two keys" in capsys.readouterr().err
    args = compare.build_parser().parse_args(["--data", str(data), "--column", "answer=good"])
    with pytest.raises(SystemExit, match=message):
        compare.file_data(tmp_path / "out", args)


def test_compare_reads_renamed_columns_and_writes_them_under_our_names(tmp_path):
    rows = renamed_rows(10)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    test = write_jsonl(tmp_path / "test.jsonl", rows[:2])
    args = compare.build_parser().parse_args(["--train", str(train), "--val", str(test), "--test", str(test),
                                              *COLUMNS])
    paths = compare.file_data(tmp_path / "out", args)
    # the runs read these files without a mapping: each is written under our names, never the user's file
    assert paths == {name: tmp_path / "out" / "data" / f"{name}.json" for name in ("train", "val", "test")}
    expected = load_data(train, columns=MAPPING)[0]
    got = load_records(paths["train"])[0]
    assert [(r.prompt, r.chosen, r.rejected, r.regions) for r in got] == \
        [(r.prompt, r.chosen, r.rejected, r.regions) for r in expected]
    assert len(expected) == 10 and all(r.regions for r in expected)
    # --data split here, renamed the same way
    args = compare.build_parser().parse_args(["--data", str(train), "--split", "0.6,0.2,0.2", *COLUMNS])
    parts = compare.file_data(tmp_path / "split", args)
    read = [r for p in parts.values() for r in load_records(p)[0]]
    assert sorted(r.prompt for r in read) == sorted(r["question"] for r in rows)
    # without the mapping the same file is invalid, named with its record and field
    args = compare.build_parser().parse_args(["--train", str(train), "--val", str(test), "--test", str(test)])
    with pytest.raises(SystemExit, match=r"train.jsonl, record 0.*prompt"):
        compare.file_data(tmp_path / "bad", args)

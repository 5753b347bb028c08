"""The formats people have (JSON / JSONL, parquet, CSV, save_to_disk, hub id, TRL's conversational format)
all read into the same PreferenceRecords; errors still name file, record and field; no network."""

from __future__ import annotations

import csv
import json

import datasets
import pytest

from granular_po.data.formats import DataSource, load_data, locate, looks_like_hub_id
from granular_po.data.records import load_records
from granular_po.data.schema import DataError, PreferenceRecord, Region, RegionFlag

ROWS = [
    {"prompt": "What is 7 * 8?", "correct_response": "7 * 8 = 56.", "incorrect_response": "7 * 8 = 54.",
     "masked_regions": [[8, 10, -1]]},
    {"prompt": "Capital of Australia?", "correct_response": "Canberra.", "incorrect_response": "Sydney.",
     "masked_regions": [[0, 8, 1], [0, 6, -1]]},
    {"prompt": "42", "correct_response": "56", "incorrect_response": "", "masked_regions": []},  # bad: empty
]


def expected(source: str) -> list[PreferenceRecord]:
    """ROWS 0 and 1 as records of `source` (row 2 is invalid)."""
    return [
        PreferenceRecord("What is 7 * 8?", "7 * 8 = 56.", "7 * 8 = 54.", (Region(8, 10, RegionFlag.INCORRECT),),
                         source, 0),
        PreferenceRecord("Capital of Australia?", "Canberra.", "Sydney.",
                         (Region(0, 8, RegionFlag.CORRECT), Region(0, 6, RegionFlag.INCORRECT)), source, 1),
    ]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path, rows, delimiter=","):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(list(rows[0]))
        for row in rows:
            writer.writerow([json.dumps(v) if isinstance(v, list) else v for v in row.values()])
    return path


def check_loaded(path, source=None):
    """Rows 0 and 1 kept as the JSON reader keeps them; row 2 skipped, counted and named."""
    source = source or str(path)
    records, report = load_data(path, on_invalid="skip")
    assert records == expected(source)
    assert (report.n_read, report.n_kept, report.n_regions, report.skipped) == (3, 2, 3, {"empty_response": 1})
    with pytest.raises(DataError) as err:
        load_data(path)
    assert (err.value.source, err.value.index, err.value.code) == (source, 2, "empty_response")
    return err.value


def test_json_and_jsonl_read_as_before(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    err = check_loaded(path)
    assert err.field_name == "incorrect_response" and "line 3" in str(err)
    assert load_data(path, on_invalid="skip")[0] == load_records(path, on_invalid="skip")[0]
    listed = tmp_path / "d.json"
    listed.write_text(json.dumps(ROWS), encoding="utf-8")
    check_loaded(listed)


# --------------------------------------------------------------------------------------- parquet


def test_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    assert locate(path).kind == "parquet"
    check_loaded(path)
    renamed = tmp_path / "export.bin"  # told by its magic bytes, whatever its name
    renamed.write_bytes(path.read_bytes())
    assert locate(renamed).kind == "parquet"


def test_parquet_field_errors_name_the_record_and_field(tmp_path):
    path = tmp_path / "d.parquet"
    rows = [dict(ROWS[0]), dict(ROWS[1], masked_regions=[[0, 99, 1]])]
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(DataError, match=r"d.parquet, record 1, field 'masked_regions\[0\]': end 99 is beyond"):
        load_data(path)


def test_corrupt_parquet_is_a_named_file_error(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1" + b"\x00" * 20)
    with pytest.raises(DataError, match="d.parquet: cannot read the parquet file") as err:
        load_data(path)
    assert err.value.code == "file_unreadable"


# --------------------------------------------------------------------------------------- inspect and train


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from tiny import tiny_tokenizer

    path = tmp_path_factory.mktemp("tok") / "byte_level_chat"
    tiny_tokenizer("byte_level", chat=True).save_pretrained(path)
    return path


def test_inspect_reads_parquet_and_renamed_columns(tmp_path, tok_dir, capsys):
    from granular_po.apps import inspect as inspect_cmd

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list(ROWS[:2]).to_parquet(str(path))
    assert inspect_cmd.main([str(path), "--tokenizer", str(tok_dir)]) == 0
    assert "read 2 records, kept 2, 3 regions" in capsys.readouterr().out
    renamed = [{"question": r["prompt"], "good": r["correct_response"], "bad": r["incorrect_response"],
                "spans": r["masked_regions"]} for r in ROWS[:2]]
    path = write_csv(tmp_path / "r.csv", renamed)
    args = [str(path), "--tokenizer", str(tok_dir), "--column", "prompt=question", "--column", "chosen=good",
            "--column", "rejected=bad", "--column", "regions=spans"]
    assert inspect_cmd.main(args) == 0
    assert "read 2 records, kept 2, 3 regions" in capsys.readouterr().out
    assert inspect_cmd.main([*args, "--column", "answer=good"]) == 2
    assert "--column: answer: unknown" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- CSV


def test_csv_and_tsv(tmp_path):
    err = check_loaded(write_csv(tmp_path / "d.csv", ROWS))
    assert err.field_name == "incorrect_response" and "(line 4)" in str(err)  # header is line 1
    check_loaded(write_csv(tmp_path / "d.tsv", ROWS, delimiter="\t"))


def test_csv_cells_stay_text_and_errors_name_the_line(tmp_path):
    rows = [{"prompt": "7 * 8?", "chosen": "56", "rejected": "54\nor so", "masked_regions": ""},  # no region
            {"prompt": "", "chosen": "NaN", "rejected": "null", "masked_regions": "[[0, 3, 1]]"}]
    records, _ = load_data(write_csv(tmp_path / "d.csv", rows))
    assert [(r.prompt, r.chosen, r.rejected, r.regions) for r in records] == [
        ("7 * 8?", "56", "54\nor so", ()), ("", "NaN", "null", (Region(0, 3, RegionFlag.CORRECT),))]
    path = tmp_path / "bad.csv"
    path.write_text("prompt,chosen,rejected,masked_regions\nq,a,b,\"[[0, 1, 1]\"\nq,a,b\nq,a,b,,\n", encoding="utf-8")
    _, report = load_data(path, on_invalid="skip")
    assert report.skipped == {"bad_region": 1, "bad_csv": 2}
    assert report.skipped_indices == {"bad_region": [0], "bad_csv": [1, 2]}
    assert "bad.csv, record 0, field 'masked_regions': must be JSON text" in report.first_errors[0]
    assert "record 1: has 3 cells, the header 4" in report.first_errors[1]
    assert report.first_errors[1].endswith("(line 3)")


@pytest.mark.parametrize("text, message", [
    (b"", "the file is empty"),
    (b"prompt,chosen,rejected\n", "a header but no records"),
    (b"prompt,prompt,rejected\nq,a,b\n", "field 'prompt': is the name of two columns"),
    (b"prompt,chosen,rejected\nq,\xff,b\n", "not valid UTF-8 on line 2"),
])
def test_csv_file_faults(tmp_path, text, message):
    path = tmp_path / "d.csv"
    path.write_bytes(text)
    with pytest.raises(DataError, match=message):
        load_data(path, on_invalid="skip")


# --------------------------------------------------------------------------------------- save_to_disk


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert locate(tmp_path / "one") == DataSource("disk", str(tmp_path / "one"))
    check_loaded(tmp_path / "one")
    both = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                                 "test": datasets.Dataset.from_list(ROWS[:1])})
    both.save_to_disk(str(tmp_path / "dd"))
    check_loaded(f"{tmp_path / 'dd'}:train")
    assert [r.index for r in load_data(f"{tmp_path / 'dd'}:test")[0]] == [0]
    with pytest.raises(DataError, match="holds several splits: name one of train, test as .*dd:train"):
        load_data(tmp_path / "dd")
    with pytest.raises(DataError, match="has no split 'dev'"):
        load_data(f"{tmp_path / 'dd'}:dev")
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        load_data(tmp_path)


# --------------------------------------------------------------------------------------- hub id


@pytest.mark.parametrize("text, source", [
    ("org/name:train", DataSource("hub", "org/name", "train")),
    ("org/name", DataSource("hub", "org/name", None)),
    ("my-org/my.data_v2:test[:10%]", DataSource("hub", "my-org/my.data_v2", "test[:10%]")),
])
def test_hub_ids_are_parsed(tmp_path, monkeypatch, text, source):
    monkeypatch.chdir(tmp_path)
    assert looks_like_hub_id(text) and locate(text) == source


@pytest.mark.parametrize("text", ["train.json", "data/train.jsonl", "data/train.parquet", "./org/name",
                                  "/abs/org/name", "a/b/c", "~/name", "org/name:", "data/d.csv:train"])
def test_local_paths_that_do_not_exist_are_missing_files_never_hub_ids(tmp_path, monkeypatch, text):
    monkeypatch.chdir(tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError(f"{text!r} was sent to the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    assert not looks_like_hub_id(text)
    with pytest.raises(DataError, match="no such file") as err:
        load_data(text)
    assert err.value.code == "file_missing"


def test_a_hub_id_goes_through_load_dataset_with_its_split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = []

    def load_dataset(path, split=None, cache_dir=None):  # the network's stand-in: the rows it would give
        calls.append((path, split, cache_dir))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    check_loaded("org/name:train", source="org/name:train")
    assert calls[0] == ("org/name", "train", None)
    load_data("org/name:train", on_invalid="skip", cache_dir="c")
    assert calls[-1] == ("org/name", "train", "c")

    def unavailable(path, split=None, cache_dir=None):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", unavailable)
    with pytest.raises(DataError, match="org/name:train: no such local file, and loading it as a hub dataset "
                                        "failed: ConnectionError: offline"):
        load_data("org/name:train")


# --------------------------------------------------------------------------------------- TRL conversational


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_trl_conversational_explicit_and_implicit_prompt(tmp_path):
    explicit = {"prompt": [user("What is 7 * 8?")], "chosen": [assistant("7 * 8 = 56.")],
                "rejected": [assistant("7 * 8 = 54.")], "masked_regions": [[8, 10, -1]]}  # offsets in content
    implicit = {"chosen": [user("Capital of Australia?"), assistant("Canberra.")],
                "rejected": [user("Capital of Australia?"), assistant("Sydney.")],
                "masked_regions": [[0, 8, 1], [0, 6, -1]]}
    bad = dict(explicit, rejected=[assistant("")])
    rows = [explicit, implicit, bad]
    path = write_jsonl(tmp_path / "conv.jsonl", rows)
    err = check_loaded(path)
    assert err.field_name == "rejected[0].content"  # named as the file spells it
    parquet = tmp_path / "conv.parquet"  # a list of messages as parquet stores it: list<struct<role, content>>
    datasets.Dataset.from_list([implicit, implicit]).to_parquet(str(parquet))
    records, _ = load_data(parquet)
    assert [(r.prompt, r.chosen, r.rejected) for r in records] == [("Capital of Australia?", "Canberra.", "Sydney.")] * 2
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "conv_disk"))
    check_loaded(tmp_path / "conv_disk")


@pytest.mark.parametrize("row, code, field", [
    ({"prompt": [{"role": "system", "content": "Be brief."}, user("7 * 8?")], "chosen": [assistant("56")],
      "rejected": [assistant("54")]}, "multi_turn_prompt", "prompt"),
    ({"chosen": [user("hi"), assistant("a"), user("and?"), assistant("56")],
      "rejected": [user("hi"), assistant("a"), user("and?"), assistant("54")]}, "multi_turn_prompt", "chosen"),
    ({"chosen": [user("7 * 8?"), assistant("56")], "rejected": [user("7 * 9?"), assistant("54")]},
     "bad_message", "rejected"),
    ({"chosen": [assistant("56")], "rejected": [assistant("54")]}, "bad_message", "chosen"),
    ({"prompt": [user("7 * 8?")], "chosen": [assistant("56"), assistant("!")], "rejected": [assistant("54")]},
     "bad_message", "chosen"),
    ({"prompt": [user("7 * 8?")], "chosen": [user("56")], "rejected": [assistant("54")]}, "bad_message", "chosen[0]"),
    ({"prompt": [user("7 * 8?")], "chosen": [{"role": "assistant"}], "rejected": [assistant("54")]},
     "bad_message", "chosen[0]"),
    ({"prompt": [user("7 * 8?")], "chosen": [assistant("56")], "rejected": "54"}, "bad_message", "rejected"),
    ({"prompt": [user("7 * 8?")], "chosen": [assistant("56")], "rejected": [assistant("54")],
      "masked_regions": [[0, 3, 1]]}, "region_out_of_range", "masked_regions[0]"),
])
def test_conversational_shapes_we_cannot_keep_are_refused_by_name(row, code, field):
    from granular_po.data.rows import RowParser

    with pytest.raises(DataError) as err:
        RowParser()(row, "conv.jsonl", 4)
    assert (err.value.index, err.value.code, err.value.field_name) == (4, code, field)


# --------------------------------------------------------------------------------------- renamed columns


def test_columns_are_renamed_and_errors_name_the_file_spelling(tmp_path):
    renamed = [{"question": r["prompt"], "good": r["correct_response"], "bad": r["incorrect_response"],
                "spans": r["masked_regions"]} for r in ROWS]
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad", "regions": "spans"}
    path = tmp_path / "r.parquet"
    datasets.Dataset.from_list(renamed).to_parquet(str(path))
    records, report = load_data(path, on_invalid="skip", columns=columns)
    assert records == expected(str(path)) and report.skipped == {"empty_response": 1}
    with pytest.raises(DataError, match=r"record 2, field 'bad': is empty"):
        load_data(path, columns=columns)
    csv_path = write_csv(tmp_path / "r.csv", renamed)  # the renamed region column is JSON text too
    assert load_data(csv_path, on_invalid="skip", columns=columns)[0] == expected(str(csv_path))
    with pytest.raises(DataError, match=r"record 0, field 'spans\[0\]': end 99"):
        load_data(write_jsonl(tmp_path / "s.jsonl", [dict(renamed[0], spans=[[0, 99, 1]])]), columns=columns)
    with pytest.raises(DataError, match="record 0, field 'answer': missing \\(columns.chosen=answer\\)"):
        load_data(path, columns={"chosen": "answer"})
    with pytest.raises(DataError, match="columns.prompt=question reads this field, but the record also has 'prompt'"):
        load_data(write_jsonl(tmp_path / "both.jsonl", [dict(ROWS[0], question="x")]), columns={"prompt": "question"})
    conv = [{"q": [user("7 * 8?")], "good": [assistant("")], "bad": [assistant("54")]}]
    with pytest.raises(DataError, match=r"field 'good\[0\].content': is empty"):  # renamed and conversational
        load_data(write_jsonl(tmp_path / "c.jsonl", conv), columns={"prompt": "q", "chosen": "good", "rejected": "bad"})


@pytest.mark.parametrize("columns, message", [
    ({"answer": "x"}, "columns.answer: unknown"),
    ({"prompt": ""}, "columns.prompt='': must be a column name"),
    ({"chosen": "text", "rejected": "text"}, "the same column is named for two keys"),
])
def test_bad_column_settings(tmp_path, columns, message):
    with pytest.raises(ValueError, match=message):
        load_data(write_jsonl(tmp_path / "d.jsonl", ROWS), columns=columns)


def test_train_reads_every_format_through_the_same_loader(tmp_path):
    from dataclasses import asdict

    from granular_po.training.config import ConfigError, compose_config, validate
    from granular_po.training.inputs import check_inputs
    from granular_po.training.recipe import _split_sources

    datasets.Dataset.from_list(ROWS[:2]).save_to_disk(str(tmp_path / "disk"))
    renamed = [{"q": r["prompt"], "good": r["correct_response"], "bad": r["incorrect_response"]} for r in ROWS[:2]]
    write_csv(tmp_path / "r.csv", renamed)
    cfg = compose_config([f"local_dirs=[{tmp_path}]", f"custom_train_path={tmp_path / 'disk'}",
                          f"custom_eval_path={tmp_path / 'r.csv'}", "columns.prompt=q", "columns.chosen=good",
                          "columns.rejected=bad"])
    validate(cfg)
    check_inputs(cfg)  # a directory is data now, not "no such file"
    assert asdict(cfg.columns) == {"prompt": "q", "chosen": "good", "rejected": "bad", "regions": None}
    with pytest.raises(DataError, match="field 'q': missing"):  # columns.* apply to both; the disk copy has ours
        next(_split_sources(cfg, "train", None, False))
    (train, _), = _split_sources(compose_config([f"local_dirs=[{tmp_path}]", f"custom_train_path={tmp_path / 'disk'}"]),
                                 "train", None, False)
    (evaluation, _), = _split_sources(cfg, "eval", None, False)
    assert [(r.prompt, r.chosen) for r in train] == [(r.prompt, r.chosen) for r in evaluation]
    hub = compose_config([f"local_dirs=[{tmp_path}]", "custom_train_path=org/name:train"])
    check_inputs(hub)  # a hub id passes without the network; loading it is what reaches the hub
    with pytest.raises(ConfigError, match="custom_train_path=data/t.jsonl: no such file"):
        check_inputs(compose_config([f"local_dirs=[{tmp_path}]", "custom_train_path=data/t.jsonl"]))
    with pytest.raises(ConfigError, match="columns.chosen=text: the same column"):
        validate(compose_config([f"local_dirs=[{tmp_path}]", "columns.chosen=text", "columns.rejected=text"]))

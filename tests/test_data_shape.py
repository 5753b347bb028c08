"""Issue 23.1: data-shape warnings in `inspect` and at `train` start-up, each with numbers and a key.

From a real user's first run: `masked_regons` in every record trained plain DPO under a granular banner
("0 regions", no warning), and regions flagged -1 only left the chosen response weighing 0 in 152 of
160 pairs, silently.
"""

from __future__ import annotations

import json

import pytest
from tiny import mixed_preference_pairs, tiny_tokenizer, tiny_workspace

from granular_po.apps import inspect as inspect_cmd
from granular_po.apps.cli import train_main
from granular_po.data.masks import GranularOptions
from granular_po.data.records import load_records
from granular_po.data.schema import DataError
from granular_po.data.shape import check_fields, region_sides, shape_warnings, unread_fields
from granular_po.training.config import compose_config
from granular_po.training.recipe import run_training
from granular_po.training.trainer import GranularTrainer


def misspelt(pairs: list[dict]) -> list[dict]:
    """The pairs with their region field spelt `masked_regons`, as the user's file had it."""
    out = []
    for pair in pairs:
        pair = dict(pair)
        pair["masked_regons"] = pair.pop("masked_regions")
        out.append(pair)
    return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "byte_level"
    tiny_tokenizer("byte_level").save_pretrained(path)
    return path


def write(path, rows):
    path.write_text(json.dumps(rows))
    return path


def test_unread_fields_are_named_with_did_you_mean(tmp_path):
    rows = misspelt(mixed_preference_pairs())
    rows[0]["id"] = "q-0"
    records, report = load_records(write(tmp_path / "d.json", rows), on_invalid="skip")
    found = {f.name: f for f in unread_fields(report)}
    assert found["masked_regons"].count == 4 and found["masked_regons"].meant == "masked_regions"
    assert found["id"].count == 1 and found["id"].meant is None
    assert "answer" not in found  # read by eval
    lines = shape_warnings(report, records, GranularOptions(enabled=True))
    assert "'masked_regons' in 4 of 4 records (did you mean 'masked_regions'?)" in lines[0]
    assert "'id' in 1 of 4 records" in lines[0]


def test_a_field_misspelt_in_every_record_is_an_error_under_on_invalid_error(tmp_path):
    path = write(tmp_path / "d.json", misspelt(mixed_preference_pairs()))
    _, report = load_records(path, on_invalid="error")
    with pytest.raises(DataError) as error:
        check_fields(report, "error")
    assert error.value.field_name == "masked_regons"  # as the file spells it
    assert "did you mean 'masked_regions'" in str(error.value) and str(path) in str(error.value)
    check_fields(report, "skip")  # skip: a warning, not an error
    # in some records only, or a field that looks like nothing we read: a warning, never an error
    rows = mixed_preference_pairs()
    rows[0]["masked_regons"] = [[0, 1, 1]]
    for row in rows:
        row["id"] = 1
    _, report = load_records(write(tmp_path / "e.json", rows), on_invalid="error")
    check_fields(report, "error")


def test_a_misspelt_text_field_says_what_the_record_has(tmp_path):
    rows = [{"promt": "p", "correct_response": "a", "incorrect_response": "b"}]
    with pytest.raises(DataError, match="field 'prompt': missing; the record has 'promt'"):
        load_records(write(tmp_path / "d.json", rows))


def test_one_sided_regions_are_counted_with_the_keys_that_change_them(tmp_path):
    records, report = load_records(write(tmp_path / "d.json", mixed_preference_pairs()))
    sides = region_sides(records)
    assert (sides.both, sides.chosen_only, sides.rejected_only) == (2, (2,), (1,))
    line, = shape_warnings(report, records, GranularOptions(enabled=True))
    assert line.startswith("warning: 2 of 4 annotated pairs have regions on one side only")
    assert "1 only in the rejected response (records 1)" in line and "1 only in the chosen response (records 2)" in line
    assert "granular.unannotated_weight=0" in line and "granular.unannotated_weight=1" in line
    assert "granular.sides=rejected|chosen" in line
    assert shape_warnings(report, records, GranularOptions(enabled=True, unannotated_weight=1.0)) == []
    # granular.sides=rejected: the chosen response of a rejected-only pair weighs 1; the chosen-only pair stays
    line, = shape_warnings(report, records, GranularOptions(enabled=True, sides="rejected"))
    assert line.startswith("warning: 1 of 4 annotated pairs") and "only in the chosen response (records 2)" in line
    assert "only in the rejected" not in line
    assert shape_warnings(report, records, GranularOptions(enabled=True), preference=False) == []  # SFT
    assert shape_warnings(report, records, GranularOptions(enabled=False)) == []


def test_inspect_prints_the_warnings_and_refuses_a_misspelling_in_every_record(tmp_path, tok_dir, capsys):
    data = write(tmp_path / "d.json", mixed_preference_pairs())
    assert inspect_cmd.main([str(data), "--tokenizer", str(tok_dir)]) == 0
    assert "2 of 4 annotated pairs have regions on one side only" in capsys.readouterr().out

    bad = write(tmp_path / "bad.json", misspelt(mixed_preference_pairs()))
    assert inspect_cmd.main([str(bad), "--tokenizer", str(tok_dir)]) == 1
    err = capsys.readouterr().err
    assert "field 'masked_regons'" in err and "did you mean 'masked_regions'" in err
    assert inspect_cmd.main([str(bad), "--tokenizer", str(tok_dir), "--on-invalid", "skip"]) == 0
    out = capsys.readouterr().out
    assert "fields not read: 'masked_regons' in 4 of 4 records" in out
    assert "granular is on but none of 4 records has a region" in out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    pairs = mixed_preference_pairs()
    return tiny_workspace(tmp_path_factory.mktemp("shape"), pairs, bad=misspelt(pairs))


def argv(root, *extra):
    return [f"model.name_or_path={root / 'tiny'}", "datasets=[ours]", f"custom_train_path={root / 'train.json'}",
            f"local_dirs=[{root / 'runs'}]", f"cache_dir={root / 'cache'}", "prompt_format=raw", "max_length=64",
            "max_prompt_length=32", "debug=true", "loss=dpo", *extra]


def test_train_refuses_granular_without_a_region_naming_the_misspelt_field(root, capsys):
    bad = str(root / "bad.json")
    assert train_main(argv(root, "granular=true", f"custom_train_path={bad}")) == 2
    err = capsys.readouterr().err
    assert "field 'masked_regons'" in err and "did you mean 'masked_regions'" in err
    # on_invalid=skip lets the field through, but granular=true on region-free data is still refused
    assert train_main(argv(root, "granular=true", f"custom_train_path={bad}", "on_invalid=skip")) == 2
    err = capsys.readouterr().err
    assert "granular=true but no record has a region" in err and "did you mean 'masked_regions'?" in err


def test_train_start_block_shows_the_one_sided_warning(root, capsys):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GranularTrainer, "train", lambda self, **kwargs: None)
        run_training(compose_config(argv(root, "granular=true")))
    out = capsys.readouterr().out
    block = out[out.index("train data"):out.index("forward")]
    assert "2 of 4 annotated pairs have regions on one side only" in block
    assert "granular.unannotated_weight=1" in block


def test_the_checks_hold_for_other_formats_and_renamed_columns(tmp_path):
    """Parquet rows go through the same census (`parse_rows`); a column read under another name
    (`columns.prompt=question`) is read, not reported."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from granular_po.data.formats import load_data

    rows = [{"question": r["prompt"], "correct_response": r["correct_response"],
             "incorrect_response": r["incorrect_response"], "masked_regons": json.dumps(r["masked_regions"])}
            for r in mixed_preference_pairs()]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    _, report = load_data(path, on_invalid="error", columns={"prompt": "question"})
    assert [f.name for f in unread_fields(report)] == ["masked_regons"]  # 'question' is read
    with pytest.raises(DataError, match="field 'masked_regons'.*did you mean 'masked_regions'"):
        check_fields(report, "error")

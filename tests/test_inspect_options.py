"""`granular-po inspect --sides / --after-first-error / --kl-weights`: the weights inspect reports are the
tensors training weighs, for each value of the objective options that change which tokens weigh.

Training's side, built here as the recipe builds it: `load_data` -> `build_dataset` (encode_record) ->
`PreferenceCollator` -> `loss_weights` (the margin's) and `LossSettings.statistic_weights` (TDPO's KL, when
`granular.kl_weights=all`; else the KL reads the margin's weights)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_tokenizer

from granular_po.apps import inspect as inspect_cmd
from granular_po.data.collate import PreferenceCollator
from granular_po.data.encode import EncodeOptions, build_dataset
from granular_po.data.formats import load_data
from granular_po.data.masks import GranularOptions
from granular_po.losses import LossType
from granular_po.training.objectives import LossSettings

ROWS = [  # regions on both sides, on the rejected side only (two: the first by position cuts), none
    {"prompt": "What is 7 * 8?", "correct_response": "The answer is 56.", "incorrect_response": "The answer is 54.",
     "masked_regions": [[14, 16, 1], [14, 16, -1]]},
    {"prompt": "Capital of France?", "correct_response": "Paris, of course. The capital is Paris.",
     "incorrect_response": "Madrid, of course. The capital is Madrid.", "masked_regions": [[34, 40, -1], [0, 6, -1]]},
    {"prompt": "No regions here", "correct_response": "Paris.", "incorrect_response": "Madrid."},
]
CASES = [  # (flags, GranularOptions keys)
    ([], {}),
    (["--sides", "rejected"], {"sides": "rejected"}),
    (["--sides", "chosen"], {"sides": "chosen"}),
    (["--after-first-error", "drop"], {"after_first_error": "drop"}),
    (["--sides", "chosen", "--after-first-error", "drop"], {"sides": "chosen", "after_first_error": "drop"}),
    (["--kl-weights", "all"], {"kl_weights": "all"}),
    (["--kl-weights", "all", "--after-first-error", "drop", "--outside-weight", "0.25"],
     {"kl_weights": "all", "after_first_error": "drop", "outside_weight": 0.25}),
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "byte_level_chat"
    tiny_tokenizer("byte_level", chat=True).save_pretrained(path)
    return path


def training_tensors(path, tok, keys):
    """(loss_weights, KL weights, batch) of all records in one batch, as the recipe and trainer build them."""
    gran = GranularOptions(enabled=True, **keys)
    records, report = load_data(path, eos_text=tok.eos_token)
    dataset = build_dataset(records, tok, EncodeOptions(), gran, report=report)
    batch = PreferenceCollator(tok.pad_token_id)([dataset[i] for i in range(len(dataset))])
    settings = LossSettings(loss=LossType.TDPO, kl_weights=gran.kl_weights)
    kl = settings.statistic_weights(batch).get("kl_weights", batch["loss_weights"])
    return batch["loss_weights"], kl, batch


@pytest.mark.parametrize("flags, keys", CASES, ids=[" ".join(f) or "defaults" for f, _ in CASES])
def test_inspect_reports_the_weights_training_weighs(tmp_path, tok_dir, capsys, flags, keys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    out = tmp_path / "w.jsonl"
    assert inspect_cmd.main([str(data), "--tokenizer", str(tok_dir), "--json", str(out), *flags]) == 0
    summary = capsys.readouterr().out
    gran = GranularOptions(enabled=True, **keys)
    assert f"sides={gran.sides}" in summary and f"after_first_error={gran.after_first_error}" in summary
    assert f"kl_weights={gran.kl_weights}" in summary
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    tok = tiny_tokenizer("byte_level", chat=True)
    margin, kl, batch = training_tensors(data, tok, keys)
    n = len(lines)
    host = batch["host"]
    for b, line in enumerate(lines):
        assert line["index"] == batch["host"]["index"][b]
        for side, row in (("chosen", b), ("rejected", n + b)):
            start, end = host["prompt_lengths"][row], host["lengths"][row]
            assert line[f"{side}_ids"] == batch["input_ids"][row, start:end].tolist()
            shown = torch.tensor(line[f"{side}_weights"], dtype=torch.float32)
            torch.testing.assert_close(shown, margin[row, start:end], rtol=0, atol=0)
            if gran.kl_weights == "all":  # the KL's weights differ from the margin's: reported beside them
                shown_kl = torch.tensor(line[f"{side}_kl_weights"], dtype=torch.float32)
                torch.testing.assert_close(shown_kl, kl[row, start:end], rtol=0, atol=0)
            else:  # the KL reads the margin's weights: nothing more to report
                assert f"{side}_kl_weights" not in line
                torch.testing.assert_close(kl[row, start:end], margin[row, start:end], rtol=0, atol=0)
    # the options change what is weighed: not the defaults' weights (each case shows a difference)
    if keys:
        default_margin, default_kl, _ = training_tensors(data, tok, {})
        assert not (torch.equal(margin, default_margin) and torch.equal(kl, default_kl))


def test_inspect_options_take_the_training_keys_choices(tmp_path, tok_dir, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    assert inspect_cmd.main([str(data), "--tokenizer", str(tok_dir), "--sides", "left"]) == 2
    assert "--sides: invalid choice: 'left'" in capsys.readouterr().err
    help_text = inspect_cmd.build_parser().format_help()
    for flag in ("--sides", "--after-first-error", "--kl-weights"):
        assert flag in help_text
    assert "cDPO" in help_text  # the help is the training key's own (GranularOptions' docstring)

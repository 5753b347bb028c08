"""report.py on hand-written metrics files: dedupe of resumed steps, curves, PNGs, markdown tables."""

import json
import math

import pytest

from granular_po.apps.report import (
    curve,
    first_value,
    last_value,
    markdown_table,
    plot_curves,
    plot_panels,
    read_metrics,
    record_split,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, records, torn_tail=True):
    text = "".join(json.dumps(r) + "\n" for r in records)
    if torn_tail:
        text += '{"step": 9, "loss/tra'  # a kill in the middle of a write
    path.write_text(text)


@pytest.fixture
def run_dir(tmp_path):
    """Steps 0..4 of a TDPO run, resumed once at step 2 (steps 3 and 4 logged twice), with a summary."""
    records = [{"step": 0, "eval_loss": 0.69, "loss/eval": 0.69, "rewards_eval/accuracies": 0.0}]
    for step in (1, 2, 3, 4):
        records.append({"step": step, "loss/train": 0.7 - 0.01 * step, "rewards_train/accuracies": 0.5,
                        "grad_norm": 1.0, "learning_rate": 1e-5})
    records.append({"step": 4, "eval_loss": 0.6, "loss/eval": 0.6, "rewards_eval/accuracies": 0.75})
    # the resumed run logs steps 3 and 4 again, with other values: these must win
    records.append({"step": 3, "loss/train": 0.5, "rewards_train/accuracies": 1.0, "grad_norm": 2.0})
    records.append({"step": 4, "loss/train": 0.4, "rewards_train/accuracies": 1.0, "grad_norm": float("nan")})
    records.append({"step": 4, "eval_loss": 0.55, "loss/eval": 0.55, "rewards_eval/accuracies": 0.875})
    records.append({"step": 4, "train_runtime": 12.0, "train_loss": 0.6, "epoch": 1.0})
    write_metrics(tmp_path / "metrics.jsonl", records)
    return tmp_path


def test_record_split_names_train_eval_and_summary():
    assert record_split({"step": 1, "loss/train": 1.0, "rewards_train/margins": 0.1}) == "train"
    assert record_split({"step": 1, "eval_loss": 1.0}) == "eval"
    assert record_split({"step": 1, "loss/eval": 1.0, "weighted_token_share_eval": 0.2}) == "eval"
    assert record_split({"step": 1, "train_runtime": 3.0, "train_loss": 1.0}) == "summary"


def test_read_metrics_keeps_the_last_record_per_step_and_split(run_dir):
    records = read_metrics(run_dir)
    keys = [(r["step"], r["split"]) for r in records]
    assert keys == [(0, "eval"), (1, "train"), (2, "train"), (3, "train"), (4, "train"), (4, "eval"),
                    (4, "summary")]
    by_key = {(r["step"], r["split"]): r for r in records}
    assert by_key[(3, "train")]["loss/train"] == 0.5  # the resumed run's value
    assert by_key[(4, "eval")]["rewards_eval/accuracies"] == 0.875
    assert by_key[(4, "summary")]["train_runtime"] == 12.0  # a summary never replaces step 4's metrics
    assert by_key[(4, "train")]["loss/train"] == 0.4
    assert read_metrics(run_dir / "metrics.jsonl") == records  # the file itself works too
    assert read_metrics(run_dir / "missing") == []


def test_curves_and_end_values(run_dir):
    records = read_metrics(run_dir)
    assert curve(records, "loss/train") == ([1, 2, 3, 4], pytest.approx([0.69, 0.68, 0.5, 0.4]))
    assert curve(records, "rewards_eval/accuracies", "eval") == ([0, 4], [0.0, 0.875])
    assert curve(records, "loss/train", "eval") == ([], [])
    steps, norms = curve(records, "grad_norm")
    assert steps == [1, 2, 3] and all(math.isfinite(v) for v in norms)  # NaN at step 4 left out
    assert first_value(records, "loss/eval", "eval") == 0.69
    assert last_value(records, "loss/eval", "eval") == 0.55
    assert last_value(records, "kl_eval/margin") is None


def assert_png(path):
    from matplotlib.image import imread

    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0  # something is drawn, not a blank canvas


def test_plot_curves_writes_a_png(run_dir, tmp_path):
    records = read_metrics(run_dir)
    path = plot_curves({"train": curve(records, "loss/train", "train"), "eval": curve(records, "loss/eval", "eval")},
                       tmp_path / "plots" / "loss.png", title="loss", ylabel="loss")
    assert path == tmp_path / "plots" / "loss.png"
    assert_png(path)
    assert not list((tmp_path / "plots").glob("*.tmp*"))


def test_plot_panels_long_curves_and_empty_panel(tmp_path):
    xs = list(range(200))
    ys = [math.sin(x / 10) for x in xs]
    path = plot_panels({"long": {"train": (xs, ys)}, "empty": {"eval": ([], [])}}, tmp_path / "p.png",
                       ylabel="y", title="two panels")
    assert_png(path)
    from matplotlib.image import imread

    assert imread(path).shape[1] > imread(plot_curves({"a": (xs, ys)}, tmp_path / "one.png")).shape[1]


def test_markdown_table_formats_cells():
    rows = [{"model": "base", "accuracy": 0.4, "correct": "16/40"},
            {"model": "a|b", "accuracy": None, "note": True},
            {"model": "nan", "accuracy": float("nan")}]
    table = markdown_table(rows)
    lines = table.strip().splitlines()
    assert lines[0] == "| model | accuracy | correct | note |"
    assert lines[1] == "|---|---|---|---|"
    assert lines[2] == "| base | 0.400 | 16/40 | n/a |"
    assert lines[3] == "| a\\|b | n/a | n/a | yes |"
    assert lines[4] == "| nan | n/a | n/a | n/a |"
    assert markdown_table(rows, columns=["accuracy"], float_format=".1%").splitlines()[2] == "| 40.0% |"
    assert markdown_table([]) == ""


def test_binomial_standard_error():
    from granular_po.apps.report import binomial_se

    assert binomial_se(0.5, 100) == pytest.approx(0.05)
    assert binomial_se(1.0, 40) == 0.0
    assert binomial_se(None, 40) is None and binomial_se(0.5, 0) is None

"""trainer=TensorParallelTrainer: its help line, the README and the run say the same (issue 13, item 9).

The research code spread layers over GPUs; here it runs as one process with a notice. The shipped
config once said "layers spread over visible GPUs with Accelerate's device_map", which nothing did.
"""

from __future__ import annotations

import logging
from pathlib import Path

from granular_po.settings import TrainConfig, field_docs
from granular_po.training.config import CONFIG_DIR, compose_config, validate
from granular_po.training.recipe import build_training_arguments

README = Path(__file__).resolve().parents[1] / "README.md"


def test_help_readme_and_config_agree_on_tensor_parallel():
    help_line = " ".join(field_docs(TrainConfig)["trainer"].split())
    assert "TensorParallelTrainer: accepted for the research code's commands, runs one process here" in help_line
    readme = " ".join(README.read_text(encoding="utf-8").split())
    assert ("`trainer=TensorParallelTrainer`: the research code's naive tensor parallelism is not carried over; "
            "it runs as one process (a notice says so)") in readme
    for path in CONFIG_DIR.rglob("*.yaml"):  # no shipped comment promises model parallelism
        text = path.read_text(encoding="utf-8")
        assert "device_map" not in text and "model parallel" not in text.lower(), path


def test_tensor_parallel_runs_one_process_with_a_notice(tmp_path, caplog):
    cfg = compose_config(["trainer=TensorParallelTrainer", f"local_dirs=[{tmp_path}]", "debug=true"])
    with caplog.at_level(logging.WARNING, logger="granular_po"):
        args = build_training_arguments(cfg, validate(cfg))
    assert not args.fsdp and args.world_size == 1
    assert any("notice: trainer=TensorParallelTrainer runs one process here" in r.getMessage()
               for r in caplog.records)

"""`granular-po` command line: train | inspect | annotate | eval | demo | compare | import | chat.

`granular-po train` takes the research code's Hydra overrides exactly as `python -u train.py` does.
Each sub-command lives in its own module and exposes `main(argv) -> int`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

COMMANDS = {
    "inspect": "granular_po.apps.inspect",
    "annotate": "granular_po.apps.annotate",
    "eval": "granular_po.apps.eval",
    "demo": "granular_po.apps.demo",
    "compare": "granular_po.apps.compare",
    "import": "granular_po.apps.importers",
    "chat": "granular_po.apps.chat",
}

USAGE = """usage: granular-po <command> [args]

commands:
  train OVERRIDES...   SFT / DPO / TDPO with Hydra overrides (as the research code's train.py);
                       `granular-po train --help` lists every key, its default and what it does
  inspect DATA ...     validate data and show exact token weights (HTML / JSONL)
  annotate IN OUT      derive masked_regions of minimally edited pairs from a character diff
  eval ...             task accuracy by greedy generation
  demo                 the arithmetic-correction experiment end to end, with a report
  compare ...          {DPO, TDPO2} x {granular, response-level} x lr x seeds from one SFT model
  import SOURCE IN OUT records from QA-FEEDBACK or a Label Studio export (qa-feedback | label-studio)
  chat --model DIR     talk to a model (a run's LATEST, merged/ or a LoRA adapter), as it was trained
"""


# Hydra's command-line flags, handled by Hydra's own app (`@hydra.main`)
HYDRA_FLAGS = ("-m", "--multirun", "--cfg", "-c", "--info", "-i", "--resolve", "--package", "-p",
               "--hydra-help", "--run", "-r", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def train_main(argv: list[str] | None = None) -> int:
    """Compose the config from Hydra overrides (`-m` for multirun sweeps) and train."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from granular_po.training.config import normalize_overrides

    if "-h" in argv or "--help" in argv:
        from granular_po.apps.help import train_help

        print(train_help("python -u train.py" if sys.argv[0].endswith("train.py") else "granular-po train"))
        return 0
    if any(arg.split("=", 1)[0] in HYDRA_FLAGS for arg in argv):  # --cfg job, --info, -m ...: Hydra's own
        return _hydra_app(normalize_overrides(argv))  # (Hydra sets up its own logging)
    _setup_logging()
    from granular_po.training.config import ConfigError, compose_config, validate
    from granular_po.training.inputs import check_inputs

    try:  # the whole configuration, before torch, data or models are touched
        cfg = compose_config(argv)
        settings = validate(cfg)
        check_inputs(cfg)
    except ConfigError as error:  # names the key, the value and what to do
        print(f"config error: {error}", file=sys.stderr)
        return 2
    from granular_po.data.schema import DataError
    from granular_po.models import ModelLoadError
    from granular_po.training.recipe import run_training
    from granular_po.training.trainer import NonFiniteError

    try:
        run_training(cfg, argv=[sys.argv[0], *argv] if sys.argv[0].endswith("train.py") else None,
                     settings=settings, overrides=argv)
    except (DataError, ValueError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NonFiniteError as error:  # the run stopped; its last complete checkpoint is intact
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Tear down the process group of a launched run (WORLD_SIZE > 1) before the interpreter exits:
    left to exit-time destructors, gloo's worker threads can abort a finished rank
    ("terminate called without an active exception")."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _hydra_app(overrides: list[str]) -> int:
    """Hydra's own app, for its flags (--cfg job, --info, ...) and multirun sweeps (each job runs
    `run_training` in this process, one after another)."""
    import hydra

    from granular_po.training.config import CONFIG_DIR, to_settings

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
    def app(cfg):
        from granular_po.training.recipe import run_training  # torch: only when a job runs

        run_training(to_settings(cfg))

    sys.argv = [sys.argv[0], *overrides]
    app()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_main(rest)
    if command not in COMMANDS:
        print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    _setup_logging()
    module = importlib.import_module(COMMANDS[command])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

"""The training command line as a user meets it, each case through the real command in a subprocess:
bad configurations refused in one line before anything heavy is imported (issues 11.11, 13.2), and
`--help` (issue 13.1)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path | None = None, script: bool = False, timeout: int = 120) -> subprocess.CompletedProcess:
    """`granular-po train ARGS` (or `python train.py ARGS`), as a user types it."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    command = [sys.executable, str(REPO / "train.py")] if script else [
        sys.executable, "-m", "granular_po.apps.cli", "train"]
    return subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("override", ["loss.betta=0.1", "+loss.betta=0.1", "++loss.betta=0.1"])
def test_unknown_loss_key_refused_also_when_appended(override, tmp_path):
    """Issue 11.11: Hydra's own advice (`+loss.betta=0.1`) used to train with the key silently dropped."""
    done = cli("loss=dpo", override, f"local_dirs=[{tmp_path}]", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == ("config error: unknown key 'loss.betta'; did you mean loss.beta? (keys here: "
                                   "name, beta, reference_free, average_log_prob, nll_alpha, label_smoothing, alpha)")
    assert list(tmp_path.iterdir()) == []


def settings_keys() -> dict[str, str]:
    """Every key of the typed settings (the keys of every loss group) with its help line."""
    from dataclasses import fields, is_dataclass

    from granular_po.settings import LOSS_GROUPS, field_docs
    from granular_po.training.config import compose_config

    keys = {}

    def walk(node, prefix):
        for f in fields(node):
            value = getattr(node, f.name)
            if f.name == "loss" and not prefix:
                for loss in LOSS_GROUPS.values():
                    walk(loss(), "loss.")
            elif is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif (prefix, f.name) != ("loss.", "name"):  # chosen with loss=NAME
                keys[f"{prefix}{f.name}"] = field_docs(type(node)).get(f.name, "")

    walk(compose_config([]), "")
    return keys


@pytest.mark.parametrize("how", ["--help", "-h", "train.py"])
def test_train_help_lists_groups_keys_defaults_and_help(how, tmp_path):
    """Issue 13.1: `granular-po train --help` failed with a Hydra lexer error after 13 s."""
    done = cli("--help", script=True, cwd=tmp_path) if how == "train.py" else cli(how, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    flat = " ".join(out.split())
    assert out.startswith("usage: python -u train.py" if how == "train.py" else "usage: granular-po train")
    assert "model: gpt2-large, gpt2-xl, gptj, llama7b, llama8b-fine-tuned, pythia28, pythia69, smollm2-135m" in flat
    assert "  loss:  sft, dpo, tdpo (default sft)" in out

    keys = settings_keys()
    assert len(keys) > 60
    for key, help_text in keys.items():
        assert f"\n  {key}=" in out, key
        assert help_text and " ".join(help_text.split()) in flat, key  # every key has its help line
    for line in ("  lr=5e-06 ", "  optimizer=SGD ", "  warmup_steps=150 ", "  loss.if_tdpo2=false ",
                 "  model.name_or_path=smollm2-135m ", "  granular.include_eos=true ", "  datasets=[ours] "):
        assert line in out, line
    assert "--cfg job" in out and list(tmp_path.iterdir()) == []


def test_hydra_flags_keep_working(tmp_path):
    done = cli("--cfg", "job", "loss=dpo", "lr=1e-4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "loss:\n  name: dpo\n  beta: 0.1" in done.stdout and "lr: 0.0001" in done.stdout
    info = cli("--info", cwd=tmp_path)
    assert info.returncode == 0 and "Hydra" in info.stdout and "Config search path" in info.stdout


SUBCOMMANDS = ["inspect", "annotate", "eval", "demo", "compare"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_option_of_every_subcommand_has_help_and_its_default(command):
    import argparse
    import importlib

    from granular_po.apps.cli import COMMANDS

    parser = importlib.import_module(COMMANDS[command]).build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        text = formatter._expand_help(action)
        assert text.strip(), f"{command} {action.option_strings or action.dest}: no help"
        assert "(default: None)" not in text
        if action.option_strings and action.default not in (None, False):
            assert "default" in text.lower(), f"{command} {action.option_strings}: default not shown"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
               COLUMNS="200")
    done = subprocess.run([sys.executable, "-m", "granular_po.apps.cli", command, "--help"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith(f"usage: granular-po {command}"), done.stderr
    assert "(default: None)" not in done.stdout and "default: None" not in done.stdout


def no_heavy_imports(root: Path) -> Path:
    """A directory to put first on PYTHONPATH where `import torch` / `import transformers` fail loudly:
    a command that gets through it never imported them."""
    for name in ("torch", "transformers", "datasets"):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(f"raise ImportError('{name} imported before the config was checked')\n")
    return root


@pytest.mark.parametrize("override, message", [
    ("lr=abc", "config error: Error merging override lr=abc: Value 'abc' of type 'str' could not be converted to Float"),
    ("optimizer=Adamw", "config error: optimizer='Adamw': did you mean AdamW? expected one of SGD, "),
    ("model.name_or_path=/no/such/model", "config error: model.name_or_path=/no/such/model: no such directory "
                                          "(a local Hugging Face model directory, a hub id like org/name, or smollm2-135m)"),
    ("model.name_or_path=my-org/my--model", "config error: model.name_or_path=my-org/my--model: neither an existing "
                                            "directory nor a hub id (Cannot have -- or .. in repo_id"),
    ("max_length=128", "config error: max_length=128 must be at least max_prompt_length + 2 = 258 (room for one "
                       "response token and the end token): lower max_prompt_length too (e.g. max_prompt_length=64), "
                       "or raise max_length"),
    ("custom_train_path=missing.json", "config error: custom_train_path=missing.json: no such file"),
    ("model.archive=runs/sft/LATEST", "config error: model.archive=runs/sft/LATEST: no such file or directory"),
    ("datasets=[ourz]", "config error: datasets='ourz': did you mean ours? expected one of ours, hh, shp, se"),
    ("loss=DPO", "config error: loss='DPO': did you mean dpo? expected one of dpo, sft, tdpo"),
    ("model=smollm2", "config error: model='smollm2': did you mean smollm2-135m? expected one of gpt2-large, "),
])
def test_bad_configuration_refused_in_one_line_before_torch(override, message, tmp_path):
    """Issue 13.2: each of these once failed after 13 s with a traceback (or a raw OSError), after the
    run directory was made. Now: one line, exit 2, torch never imported, nothing written."""
    (tmp_path / "train.json").write_text("[]")
    env_path = no_heavy_imports(tmp_path / "blocked")
    work = tmp_path / "work"
    work.mkdir()
    args = [f"custom_train_path={tmp_path / 'train.json'}", "loss=dpo", override, "local_dirs=[runs]"]
    env = dict(os.environ, HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(env_path), str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "granular_po.apps.cli", "train", *args], cwd=work, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr
    assert list(work.iterdir()) == []  # no run directory, not even local_dirs

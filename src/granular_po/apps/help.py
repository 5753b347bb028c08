"""Help texts of the command lines: `granular-po train --help` from the typed settings, and the argparse
formatter every sub-command uses (each option's default, without "(default: None)" noise)."""

from __future__ import annotations

import argparse
import textwrap
from dataclasses import fields, is_dataclass

from granular_po.data.rows import COLUMN_KEYS, check_columns
from granular_po.settings import LOSS_GROUPS, field_docs

WIDTH = 100
KEY_COLUMN = 38


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Like argparse's ArgumentDefaultsHelpFormatter, but silent where the default says nothing (None,
    a flag's False) or the help already states it ("(default: all)")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or not action.option_strings
                or action.default is None or action.default is False or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def add_column_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--column KEY=NAME` (repeatable): train's `columns.KEY=NAME`, for every command that reads data."""
    parser.add_argument("--column", action="append", default=[], metavar="KEY=NAME",
                        help=f"read KEY ({', '.join(COLUMN_KEYS)}) from the field NAME (train: columns.KEY=NAME); "
                             "default: none, every key read under its own name")


def column_option(items: list[str]) -> dict[str, str]:
    """The `--column KEY=NAME` items as train's `columns` mapping, checked as train checks it
    (`rows.check_columns`); ValueError "--column: ..." names the fault."""
    try:
        return check_columns(dict(item.split("=", 1) if "=" in item else (item, "") for item in items))
    except ValueError as e:
        raise ValueError(f"--column: {str(e).replace('columns.', '')}") from None


def _value(value) -> str:
    """A value as it is written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value(v) for v in value) + "]"
    return str(value)


def _line(key: str, value, help_text: str) -> str:
    head = f"  {key}={_value(value)}"
    if len(head) >= KEY_COLUMN:
        head += "\n" + " " * KEY_COLUMN
    else:
        head = head.ljust(KEY_COLUMN)
    body = textwrap.wrap(help_text, WIDTH - KEY_COLUMN, break_on_hyphens=False) or [""]
    return head + ("\n" + " " * KEY_COLUMN).join(body)


def _keys(node, prefix: str = "") -> list[str]:
    """`key=default  help` for every key of a settings object, groups flattened (`lora.r`)."""
    docs = field_docs(type(node))
    out = []
    for f in fields(node):
        value = getattr(node, f.name)
        if f.name == "loss":
            continue  # listed per loss below
        if is_dataclass(value):
            out.extend(_keys(value, f"{prefix}{f.name}."))
        else:
            out.append(_line(f"{prefix}{f.name}", value, docs.get(f.name, "")))
    return out


def train_help(prog: str = "granular-po train") -> str:
    """The keys of `granular-po train` / `train.py`, their defaults (the composed default config, model
    preset included) and help lines, the config groups and their options, and Hydra's own flags."""
    from granular_po.training.config import CONFIG_DIR, compose_config

    defaults = compose_config([])
    chosen = _group_defaults(CONFIG_DIR)
    models = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
    parts = [
        f"usage: {prog} [KEY=VALUE ...]   (Hydra overrides, as the research code's train.py)",
        "",
        "  e.g. loss=tdpo loss.beta=0.1 granular=true custom_train_path=train.json exp_name=tdpo",
        "",
        "config groups (choose with GROUP=OPTION):",
        textwrap.fill(f"model: {', '.join(models)} (default {chosen['model']}); any key as model.KEY=...", WIDTH,
                      initial_indent="  ", subsequent_indent="         ", break_on_hyphens=False),
        f"  loss:  {', '.join(LOSS_GROUPS)} (default {chosen['loss']})",
        "",
        "keys (KEY=DEFAULT  help); `granular=true` is short for granular.enabled=true:",
        *_keys(defaults),
        "",
    ]
    for name, cls in LOSS_GROUPS.items():
        loss = cls()
        docs = field_docs(cls)
        keys = [f for f in fields(loss) if f.name != "name"]
        parts.append(f"loss={name}: {(cls.__doc__ or '').strip()}" + ("" if keys else " No other key."))
        parts.extend(_line(f"loss.{f.name}", getattr(loss, f.name), docs.get(f.name, "")) for f in keys)
        parts.append("")
    parts += [
        "Hydra's flags work as usual: --cfg job (print the composed configuration), --info, -m (multirun",
        "sweeps over comma-separated values), --hydra-help.",
    ]
    return "\n".join(parts)


def _group_defaults(config_dir) -> dict[str, str]:
    """`{group: default option}` from the defaults list of `config.yaml`."""
    from omegaconf import OmegaConf

    entries = OmegaConf.load(config_dir / "config.yaml").get("defaults", [])
    return {k: str(v) for entry in entries if not isinstance(entry, str) for k, v in entry.items()}

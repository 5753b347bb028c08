"""One row as its file spells it -> the record `parse_record` reads: renamed columns, TRL's chat messages.

Every format (`formats`) yields rows, dicts of column -> value; `RowParser` turns each into a
`PreferenceRecord` through `records.parse_record`, after two steps:

- columns named otherwise (`columns.prompt=question` ...) are read under our names, and an error about
  them names the column as the file spells it ('question', not 'prompt');
- TRL's conversational preference format becomes text: `prompt` a list of messages with `chosen` /
  `rejected` each one assistant message, or the implicit-prompt form (`chosen` / `rejected` whole
  conversations that share every message before the last). The response is the assistant message's
  `content`, so region offsets count characters of that content. A prompt must be one user message:
  a record's prompt is one text (the chat template wraps it as the user turn), so a system message or
  earlier turns could not be kept, and such a record is refused (`multi_turn_prompt`), never flattened.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from granular_po.data.records import TEXT_FIELDS, _describe, parse_record
from granular_po.data.schema import DataError, PreferenceRecord, SFTRecord
from granular_po.data.sft_rows import is_sft_row, not_a_pair, parse_sft_row

# columns.<key> -> the field parse_record reads it as
COLUMN_KEYS: dict[str, str] = {
    "prompt": "prompt",
    "chosen": "correct_response",
    "rejected": "incorrect_response",
    "regions": "masked_regions",
}
REGION_FIELDS = ("masked_regions", "masked_region")


def check_columns(columns: Mapping[str, str | None] | None) -> dict[str, str]:
    """The renamed columns, {key: column}; unknown keys, empty names and one column for two keys raise."""
    given = {k: v for k, v in (columns or {}).items() if v is not None}
    for key, name in given.items():
        if key not in COLUMN_KEYS:
            raise ValueError(f"columns.{key}: unknown; the keys are {', '.join(COLUMN_KEYS)}")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"columns.{key}={name!r}: must be a column name")
    names = list(given.values())
    for key, name in given.items():
        if names.count(name) > 1:
            raise ValueError(f"columns.{key}={name}: the same column is named for two keys")
    return given


class RowParser:
    """`parse(row, source, index, eos_text) -> PreferenceRecord` for `records.parse_rows`; with `sft`, a row
    of one of TRL's SFT types (`sft_rows`) gives an `SFTRecord`; without, it is refused (`sft_record`)."""

    def __init__(self, columns: Mapping[str, str | None] | None = None, sft: bool = False):
        self.columns = check_columns(columns)
        self.sft = sft

    def __call__(self, row: Any, source: str, index: int, eos_text: str | None = None) -> PreferenceRecord | SFTRecord:
        spelled: dict[str, str] = {}  # field parse_record names -> the field as the file spells it
        if isinstance(row, dict):
            row = rename_columns(row, self.columns, source, index, spelled)
            if is_sft_row(row):
                try:
                    if not self.sft:
                        raise not_a_pair(row, source, index)
                    return parse_sft_row(row, source, index, eos_text)
                except DataError as e:
                    raise _respelled(e, spelled) from None
            row = from_conversation(row, source, index, spelled)
        try:
            return parse_record(row, source, index, eos_text)
        except DataError as e:
            raise _respelled(e, spelled) from None


def rename_columns(row: dict, columns: Mapping[str, str], source: str, index: int,
                   spelled: dict[str, str] | None = None) -> dict:
    """The row with the columns named by `columns.*` ({key: column}, from `check_columns`) moved under our
    names, the rest as it is; `spelled` receives our name -> the column. A named column the row lacks, or one
    beside a field of the same meaning, raises DataError naming it. Every reader of renamed columns goes
    through here: training's records (`RowParser`), eval's questions and compare's rows (`iter_data_rows`)."""
    spelled = spelled if spelled is not None else {}
    row = dict(row) if columns else row
    for key, name in columns.items():
        ours = COLUMN_KEYS[key]
        if name == ours:
            continue
        if name not in row:
            raise DataError(source, index, name, f"missing (columns.{key}={name})", "missing_field")
        clash = [n for n in (REGION_FIELDS if key == "regions" else TEXT_FIELDS[ours]) if n in row]
        if clash:
            raise DataError(source, index, name, f"columns.{key}={name} reads this field, but the record "
                            f"also has '{clash[0]}' (same meaning): rename or drop one", "conflicting_fields")
        row[ours] = row.pop(name)
        spelled[ours] = name
    return row


def _respelled(error: DataError, spelled: dict[str, str]) -> DataError:
    """The error with its field named as the file spells it ('good[1].content', 'spans[2]')."""
    field = error.field_name
    base = field.split("[", 1)[0] if field else None
    if base not in spelled:
        return error
    return DataError(error.source, error.index, spelled[base] + field[len(base):], error.reason, error.code)


# ---------------------------------------------------------------------------------------------------
# TRL's conversational preference format


def _present(row: Mapping[str, Any], ours: str) -> str | None:
    """The first field the row has among the accepted spellings of `ours`; null is absent (a table with
    explicit- and implicit-prompt rows has a null `prompt` in the implicit ones)."""
    return next((n for n in TEXT_FIELDS[ours] if row.get(n) is not None), None)


def _messages(value: Any, field: str, source: str, index: int) -> list[dict[str, str]]:
    """A list of {"role": str, "content": str} messages, or a DataError naming the message at fault."""
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(source, index, field, f"must be a non-empty list of messages, got {_describe(value)}",
                        "bad_message")
    for k, message in enumerate(value):
        if not isinstance(message, Mapping) or not all(isinstance(message.get(n), str) for n in ("role", "content")):
            raise DataError(source, index, f"{field}[{k}]", "a message must be an object with string 'role' and "
                            f"'content', got {_describe(message)}", "bad_message")
    return [dict(m) for m in value]


def _reply(messages: list[dict[str, str]], field: str, source: str, index: int) -> str:
    """The content of the last message, which must be the assistant's."""
    last = messages[-1]
    if last["role"] != "assistant":
        raise DataError(source, index, f"{field}[{len(messages) - 1}]", "the response must be an assistant "
                        f"message, got role {last['role']!r}", "bad_message")
    return last["content"]


def _prompt_text(messages: list[dict[str, str]], field: str, source: str, index: int) -> str:
    """The text of a prompt of one user message; anything else is refused, never flattened."""
    if len(messages) != 1 or messages[0]["role"] != "user":
        roles = ", ".join(m["role"] for m in messages)
        raise DataError(source, index, field, f"holds {len(messages)} message(s) ({roles}): only a prompt of one "
                        "user message is read (a record's prompt is one text, wrapped by the chat template as "
                        "the user turn), so a system message or earlier turns cannot be kept", "multi_turn_prompt")
    return messages[0]["content"]


def from_conversation(row: dict, source: str, index: int, spelled: dict[str, str] | None = None) -> dict:
    """A row of TRL's conversational preference format as text fields (any other row as it is).

    Explicit prompt: `prompt` [user], `chosen` / `rejected` [assistant]. Implicit prompt: no `prompt`;
    `chosen` / `rejected` [user, assistant], the same before the last message. `spelled` receives the
    message each text came from, so an error about the text names it ('chosen[1].content').
    """
    spelled = spelled if spelled is not None else {}
    keys = {ours: _present(row, ours) for ours in TEXT_FIELDS}
    if not any(k is not None and isinstance(row[k], (list, tuple)) for k in keys.values()):
        return row
    pk, ck, rk = keys["prompt"], keys["correct_response"], keys["incorrect_response"]
    if ck is None or rk is None:
        return row  # parse_record names the missing response
    name = {k: spelled.get(k, k) for k in (pk, ck, rk) if k is not None}
    chosen = _messages(row[ck], name[ck], source, index)
    rejected = _messages(row[rk], name[rk], source, index)
    out = dict(row)
    if pk is None:  # implicit prompt: the messages before the last, the same on both sides
        if len(chosen) < 2:
            raise DataError(source, index, name[ck], "without a 'prompt' field, chosen and rejected must be whole "
                            "conversations: the prompt's message(s), then the assistant's reply", "bad_message")
        if chosen[:-1] != rejected[:-1]:
            raise DataError(source, index, name[rk], "its messages before the last differ from chosen's: the "
                            "implicit prompt (the messages before the reply) must be the same", "bad_message")
        pk, prompt_field = "prompt", f"{name[ck]}[0].content"
        out["prompt"] = _prompt_text(chosen[:-1], name[ck], source, index)
    else:
        for messages, k in ((chosen, ck), (rejected, rk)):
            if len(messages) != 1:
                raise DataError(source, index, name[k], f"holds {len(messages)} messages: with a 'prompt' field "
                                "it must be the one assistant reply", "bad_message")
        prompt_field = f"{name[pk]}[0].content"
        if isinstance(row[pk], str):
            out[pk] = row[pk]
            prompt_field = name[pk]
        else:
            out[pk] = _prompt_text(_messages(row[pk], name[pk], source, index), name[pk], source, index)
    out[ck], out[rk] = _reply(chosen, name[ck], source, index), _reply(rejected, name[rk], source, index)
    spelled.update({pk: prompt_field, ck: f"{name[ck]}[{len(chosen) - 1}].content",
                    rk: f"{name[rk]}[{len(rejected) - 1}].content"})
    return out


def text_row(row: dict, source: str, index: int) -> dict:
    """The row with TRL's chat messages as text, for readers of rows that need not be pairs (eval's
    questions): `from_conversation`, and a `prompt` of one user message read as its text even when the
    row has no responses (`{"prompt": [user], "answer": ...}`)."""
    row = from_conversation(row, source, index)
    key = _present(row, "prompt")
    if key is not None and isinstance(row[key], (list, tuple)):
        row = dict(row)
        row[key] = _prompt_text(_messages(row[key], key, source, index), key, source, index)
    return row

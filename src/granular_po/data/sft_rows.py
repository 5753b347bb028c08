"""TRL's SFT dataset types -> `SFTRecord`s, for stage 1 (`loss=sft`) only.

The four types of TRL's "Dataset formats and types" that its SFTTrainer trains on, in every file format
`formats` reads:

| type | row | trains on |
|---|---|---|
| language modeling | `{"text": ...}` | every token (and EOS), as TRL's language modeling |
| prompt-completion | `{"prompt": ..., "completion": ...}` | the completion (and its end token): TRL's `completion_only_loss` |
| conversational | `{"messages": [{"role", "content"}, ...]}` | every assistant message (and its end-of-turn token); the other messages are context |
| conversational prompt-completion | `prompt` and `completion` message lists | the completion's assistant messages; the prompt is context |

A conversation that is one user message then one assistant message is read as the text pair it is
(as `rows` reads TRL's conversational preference rows), so it trains the same under a raw prompt format;
any other conversation needs the tokenizer's chat template (`sft_encode`). TRL trains a `messages` row
on every token unless `assistant_only_loss=True`; here the assistant messages alone train, as the
prompt of a preference pair is never trained either.

A malformed row raises a `DataError` naming file, record and field (a message without a role, a
conversation without an assistant message): `records.parse_rows` raises it or, under `on_invalid=skip`,
counts it by reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from granular_po.data.records import SFT_FIELDS, TEXT_FIELDS, _check_text, _describe
from granular_po.data.schema import DataError, SFTRecord

# the fields of a preference pair's responses (any spelling): a row with one is a pair, not an SFT row
_PAIR_FIELDS = (*TEXT_FIELDS["correct_response"], *TEXT_FIELDS["incorrect_response"])


def _has(row: Mapping[str, Any], name: str) -> bool:
    return row.get(name) is not None  # a table's null cell is the field absent


def is_sft_row(row: Any) -> bool:
    """A row of one of TRL's SFT types: a `text`, `completion` or `messages` field and no response of a pair."""
    return (isinstance(row, Mapping) and any(_has(row, n) for n in SFT_FIELDS)
            and not any(_has(row, n) for n in _PAIR_FIELDS))


def not_a_pair(row: Mapping[str, Any], source: str, index: int) -> DataError:
    """What DPO / TDPO (and every reader of pairs) say of an SFT row: it has no rejected response."""
    field = next(n for n in SFT_FIELDS if _has(row, n))
    return DataError(source, index, field, "is a field of an SFT record (TRL's text / prompt-completion / messages "
                     "types): it has no rejected response, so DPO / TDPO cannot train on it; train it with "
                     "loss=sft (stage 1), and give stage 2 pairs (correct_response / incorrect_response, or "
                     "chosen / rejected)", "sft_record")


def _message_list(value: Any, field: str, source: str, index: int, eos_text: str | None) -> list[dict]:
    """A non-empty list of messages, each an object with string 'role' and 'content' (other keys, such as
    tool calls, are kept for the chat template); contents are checked as any text field is."""
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(source, index, field, f"must be a non-empty list of messages, got {_describe(value)}",
                        "bad_message")
    out = []
    for k, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise DataError(source, index, f"{field}[{k}]", f"a message must be an object with 'role' and "
                            f"'content', got {_describe(message)}", "bad_message")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                got = "missing" if message.get(key) is None else f"got {_describe(message[key])}"
                raise DataError(source, index, f"{field}[{k}].{key}", f"a message needs a string '{key}': {got}",
                                "bad_message")
        _check_text(message["content"], f"{field}[{k}].content", source, index, eos_text, False)
        out.append({key: v for key, v in message.items() if v is not None})
    return out


def _require_assistant(messages: list[dict], first: int, field: str, source: str, index: int) -> None:
    """At least one assistant message from `first` on, none of them empty: the tokens the record trains."""
    trained = [k for k in range(first, len(messages)) if messages[k]["role"] == "assistant"]
    if not trained:
        roles = ", ".join(repr(m["role"]) for m in messages[first:])
        raise DataError(source, index, field, f"has no assistant message (roles {roles}): an SFT conversation "
                        "trains on its assistant messages, so this one would train on nothing", "no_assistant_turn")
    for k in trained:
        if not messages[k]["content"].strip():
            raise DataError(source, index, f"{field}[{k - first}].content", "is empty or whitespace only: an "
                            "assistant message trains on its content", "empty_response")


def _conversation(prompt: list[dict], rest: list[dict], names: list[str], source: str, index: int) -> SFTRecord:
    """A conversation record, or the text pair when it is one user message then one assistant message."""
    messages = [*prompt, *rest]
    if [m["role"] for m in messages] == ["user", "assistant"] and set(messages[0]) == set(messages[1]) == {"role", "content"}:
        return SFTRecord("prompt_completion", prompt=messages[0]["content"], completion=messages[1]["content"],
                         names=(f"{names[0]}.content", f"{names[1]}.content"), source=source, index=index)
    return SFTRecord("conversation", messages=tuple(messages), n_context=len(prompt), names=tuple(names),
                     source=source, index=index)


def parse_sft_row(row: Mapping[str, Any], source: str, index: int, eos_text: str | None = None) -> SFTRecord:
    """One row of an SFT type (`is_sft_row`) as an `SFTRecord`, or a DataError naming the field at fault."""
    present = [n for n in SFT_FIELDS if _has(row, n)]
    if len(present) > 1:
        raise DataError(source, index, present[1], f"a record holds one SFT type, but it has both '{present[0]}' "
                        f"and '{present[1]}'", "conflicting_fields")
    kind, prompt = present[0], row.get("prompt")
    if kind == "text":
        if prompt is not None:
            raise DataError(source, index, "prompt", "a 'text' record trains on all of its text; give 'prompt' "
                            "and 'completion' to keep a prompt out of the loss", "conflicting_fields")
        if isinstance(row["text"], (list, tuple)):
            raise DataError(source, index, "text", "must be a string (a conversation goes in 'messages'), got "
                            f"{_describe(row['text'])}", "bad_type")
        text = _check_text(row["text"], "text", source, index, eos_text, True)
        return SFTRecord("text", completion=text, names=("text",), source=source, index=index)
    if kind == "messages":
        if prompt is not None:
            raise DataError(source, index, "prompt", "a 'messages' record holds its prompt as its first messages; "
                            "give 'prompt' and 'completion' message lists instead to keep every turn of the "
                            "prompt as context", "conflicting_fields")
        messages = _message_list(row["messages"], "messages", source, index, eos_text)
        _require_assistant(messages, 0, "messages", source, index)
        return _conversation([], messages, [f"messages[{k}]" for k in range(len(messages))], source, index)
    completion = row["completion"]
    if _has(row, "label"):  # KTO's rows: a completion judged good or bad, not a completion to imitate
        raise DataError(source, index, "label", "a 'completion' with a 'label' is TRL's unpaired preference type "
                        "(KTO): neither an SFT record (its bad completions would be trained) nor a pair",
                        "unpaired_preference")
    if prompt is None:
        raise DataError(source, index, "prompt", "missing: a 'completion' record needs its 'prompt' (a record "
                        "trained on all of its text is {\"text\": ...})", "missing_field")
    conversational = [isinstance(v, (list, tuple)) for v in (prompt, completion)]
    if conversational == [False, False]:
        return SFTRecord("prompt_completion", prompt=_check_text(prompt, "prompt", source, index, eos_text, False),
                         completion=_check_text(completion, "completion", source, index, eos_text, True),
                         names=("prompt", "completion"), source=source, index=index)
    if conversational != [True, True]:
        text, listed = ("prompt", "completion") if conversational[1] else ("completion", "prompt")
        raise DataError(source, index, text, f"is a string but '{listed}' a list of messages: give both as text "
                        "or both as message lists (TRL's conversational prompt-completion)", "bad_type")
    head = _message_list(prompt, "prompt", source, index, eos_text)
    tail = _message_list(completion, "completion", source, index, eos_text)
    _require_assistant([*head, *tail], len(head), "completion", source, index)
    names = [f"prompt[{k}]" for k in range(len(head))] + [f"completion[{k}]" for k in range(len(tail))]
    return _conversation(head, tail, names, source, index)


def sft_record_dict(record: SFTRecord) -> dict[str, Any]:
    """The fields `sft_encode` needs to encode the record again (one column of the encoding table)."""
    return {"kind": record.kind, "prompt": record.prompt, "completion": record.completion,
            "messages": list(record.messages), "n_context": record.n_context, "names": list(record.names)}


def sft_record_from_dict(data: Mapping[str, Any], index: int, source: str = "<memory>") -> SFTRecord:
    return SFTRecord(data["kind"], data["prompt"], data["completion"], tuple(data["messages"]), data["n_context"],
                     tuple(data["names"]), source, index)

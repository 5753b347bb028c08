"""Load and validate preference records from JSON / JSONL files (the hub datasets: `hub`).

A bad record raises a `DataError` naming file, record and field (`on_invalid="error"`) or is skipped and
counted by reason in the `LoadReport` (`"skip"`); nothing is dropped silently. Region offsets are Python
`str` indices (code points), the unit of the offset mappings of Hugging Face fast tokenizers.

(Over 350 lines: every field's validation with its own one-line message, the code that makes
"nothing is dropped silently" true.)
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from granular_po.data.schema import DataError, LoadReport, PreferenceRecord, Region, RegionFlag, SFTRecord
from granular_po.data.streams import open_binary, source_name

# Accepted spellings of each text field, canonical (research-code) name first.
TEXT_FIELDS: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt",),
    "correct_response": ("correct_response", "correct", "chosen"),
    "incorrect_response": ("incorrect_response", "incorrect", "rejected"),
}
# The fields of TRL's SFT types (`sft_rows`): language modeling, prompt-completion, conversational.
SFT_FIELDS = ("text", "completion", "messages")
ON_INVALID = ("error", "skip")
# Markers and filters, not errors: always skipped and counted, even with on_invalid="error".
FILTER_CODES = frozenset({"invalidated", "identical_responses", "shp_low_ratio", "se_empty_answer"})
_BOM = b"\xef\xbb\xbf"


# ---------------------------------------------------------------------------------------------------
# One record


def _describe(value: Any) -> str:
    """A short description of a JSON value for error messages: its JSON type and (clipped) value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    kind = {int: "integer", float: "float", str: "string", list: "list", tuple: "list", dict: "object"}
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{kind.get(type(value), type(value).__name__)} {text}"


def _check_text(value: Any, field: str, source: str, index: int | None, eos_text: str | None,
                is_response: bool) -> str:
    """Validate one text field: a string, encodable as UTF-8, non-empty if a response, free of EOS text."""
    if not isinstance(value, str):
        raise DataError(source, index, field, f"must be a string, got {_describe(value)}", "bad_type")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(source, index, field, f"contains a lone surrogate U+{ord(value[e.start]):04X} at "
                        f"character {e.start}: it cannot be encoded as UTF-8 or tokenised", "bad_unicode") from None
    if is_response and not value.strip():
        raise DataError(source, index, field, "is empty or whitespace only", "empty_response")
    if eos_text and eos_text in value:
        raise DataError(source, index, field, f"contains the EOS text {eos_text!r} at character "
                        f"{value.index(eos_text)}: the sequence would end there", "eos_in_text")
    return value


def _get_text(obj: Mapping[str, Any], canonical: str, source: str, index: int, eos_text: str | None) -> str:
    """Read a text field under any of its aliases; two aliases with different values are an error."""
    names = TEXT_FIELDS[canonical]
    present = [n for n in names if n in obj]
    if not present:
        also = f" (also accepted: {', '.join(names[1:])})" if len(names) > 1 else ""
        close = difflib.get_close_matches(canonical, [str(k) for k in obj], n=1, cutoff=0.75)
        also += f"; the record has '{close[0]}': a misspelling?" if close else ""
        raise DataError(source, index, canonical, f"missing{also}", "missing_field")
    if len(present) > 1 and any(obj[n] != obj[present[0]] for n in present[1:]):
        raise DataError(source, index, present[0], f"conflicts with field '{present[1]}' (same meaning, "
                        "different values)", "conflicting_fields")
    return _check_text(obj[present[0]], present[0], source, index, eos_text, canonical != "prompt")


def _raw_regions(obj: Mapping[str, Any], source: str, index: int) -> list[tuple[str, Any]]:
    """The record's region triples, unvalidated, each with the field name to blame."""
    one, many = obj.get("masked_region"), obj.get("masked_regions")
    if one is not None and many is not None:
        raise DataError(source, index, "masked_region", "give either 'masked_region' or 'masked_regions', "
                        "not both", "conflicting_fields")
    if one is not None:
        if not isinstance(one, (list, tuple)):
            raise DataError(source, index, "masked_region", f"must be a [start, end, flag] list, got "
                            f"{_describe(one)}", "bad_region")
        return [("masked_region", one)]
    if many is not None:
        if not isinstance(many, (list, tuple)):
            raise DataError(source, index, "masked_regions", "must be a list of [start, end, flag] lists, got "
                            f"{_describe(many)}", "bad_region")
        return [(f"masked_regions[{k}]", t) for k, t in enumerate(many)]
    return []


def _is_invalidate_marker(triple: Any) -> bool:
    return isinstance(triple, (list, tuple)) and len(triple) == 3 and type(triple[2]) is int and triple[2] == 0


def _index_value(value: Any, what: str, field: str, source: str, index: int) -> int:
    """A region offset: a non-negative int (not a bool, not a float even if whole, not a string)."""
    if type(value) is not int:  # bool is an int subclass; 3.0 is not an offset either
        raise DataError(source, index, field, f"{what} must be an integer, got {_describe(value)}", "bad_index")
    if value < 0:
        raise DataError(source, index, field, f"{what} must be non-negative, got {value}", "bad_index")
    return value


def _region(triple: Any, field: str, record: PreferenceRecord) -> Region:
    """Validate one [start, end, flag] triple against the response it indexes into."""
    source, index = record.source, record.index
    if not isinstance(triple, (list, tuple)) or len(triple) != 3 or isinstance(triple[0], (list, tuple)):
        got = f"a list of length {len(triple)}" if isinstance(triple, (list, tuple)) else _describe(triple)
        if isinstance(triple, (list, tuple)) and triple and isinstance(triple[0], (list, tuple)):
            got = "a list of lists (use 'masked_regions' for several regions)"
        raise DataError(source, index, field, f"a region must be a [start, end, flag] triple, got {got}",
                        "bad_region")
    start = _index_value(triple[0], "start", field, source, index)
    end = _index_value(triple[1], "end", field, source, index)
    flag = triple[2]
    if type(flag) is not int or flag not in (1, -1):
        raise DataError(source, index, field, "flag must be 1 (span in the correct response), -1 (in the "
                        f"incorrect response) or 0 (invalidate the record), got {_describe(flag)}", "bad_flag")
    if start > end:
        raise DataError(source, index, field, f"start {start} is after end {end}", "region_order")
    which, text = ("correct", record.chosen) if flag == 1 else ("incorrect", record.rejected)
    if end > len(text):
        raise DataError(source, index, field, f"end {end} is beyond the {which} response's length {len(text)} "
                        "(offsets count Python characters, i.e. Unicode code points)", "region_out_of_range")
    return Region(start, end, RegionFlag(flag))


def parse_record(obj: Any, source: str, index: int, eos_text: str | None = None) -> PreferenceRecord:
    """Validate one decoded JSON value into a PreferenceRecord, or raise a DataError saying what is wrong."""
    if not isinstance(obj, dict):
        raise DataError(source, index, None, f"a record must be a JSON object, got {_describe(obj)}", "not_object")
    raw = _raw_regions(obj, source, index)
    for field, triple in raw:  # checked first: the annotator asked for this record to be dropped
        if _is_invalidate_marker(triple):
            raise DataError(source, index, field, "flag 0 marks the record invalid (research-code marker)",
                            "invalidated")
    record = PreferenceRecord(
        prompt=_get_text(obj, "prompt", source, index, eos_text),
        chosen=_get_text(obj, "correct_response", source, index, eos_text),
        rejected=_get_text(obj, "incorrect_response", source, index, eos_text),
        source=source,
        index=index,
    )
    if record.chosen == record.rejected:
        raise DataError(source, index, "incorrect_response", "is identical to the correct response: the pair "
                        "has nothing to prefer", "identical_responses")
    regions = tuple(_region(triple, field, record) for field, triple in raw)
    return PreferenceRecord(record.prompt, record.chosen, record.rejected, regions, source, index)


def make_record(prompt: str, chosen: str, rejected: str, source: str, index: int,
                regions: tuple[Region, ...] = (), eos_text: str | None = None,
                fields: Sequence[str] = ("prompt", "chosen", "rejected")) -> PreferenceRecord:
    """Build a record from texts made in code (hub converters), with the same text checks as a file."""
    _check_text(prompt, fields[0], source, index, eos_text, False)
    _check_text(chosen, fields[1], source, index, eos_text, True)
    _check_text(rejected, fields[2], source, index, eos_text, True)
    return PreferenceRecord(prompt, chosen, rejected, tuple(regions), source, index)


# ---------------------------------------------------------------------------------------------------
# Files


def _open(path: str | os.PathLike[str], source: str):
    """`path` opened for bytes, seekable (a stream such as stdin `-` read into memory: `streams`)."""
    try:
        return open_binary(path)
    except FileNotFoundError:
        raise DataError(source, None, None, "file not found", "file_missing") from None
    except OSError as e:
        raise DataError(source, None, None, f"cannot read file: {e.strerror or e}", "file_unreadable") from None


def _first_char(f) -> bytes:
    """The first non-whitespace byte (after a UTF-8 BOM), then rewind: it tells JSON list from JSONL."""
    if f.read(3) != _BOM:
        f.seek(0)
    while chunk := f.read(1 << 16):
        if stripped := chunk.lstrip():
            f.seek(0)
            return stripped[:1]
    return b""


def _decode_json(raw: bytes, source: str, index: int | None, where: str) -> Any:
    """bytes -> JSON value; every failure (bad UTF-8, syntax, huge int, deep nesting) is a DataError."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        where = where or f" at line {line}"
        raise DataError(source, index, None, f"not valid UTF-8{where} (byte {e.start})", "bad_encoding") from None
    except json.JSONDecodeError as e:
        pos = f"{where}, column {e.colno}" if where else f" at line {e.lineno}, column {e.colno}"
        msg = e.msg.removesuffix(" at")  # json says "Unterminated string starting at" and gives pos apart
        raise DataError(source, index, None, f"invalid JSON{pos}: {msg} (truncated or corrupt?)",
                        "bad_json") from None
    except (ValueError, RecursionError) as e:
        raise DataError(source, index, None, f"invalid JSON{where}: {type(e).__name__}: {e}", "bad_json") from None


def _iter_raw(f, source: str) -> Iterator[tuple[int, int | None, Any]]:
    """Yield (index, line or None, decoded value or the DataError that decoding it raised)."""
    first = _first_char(f)
    if not first:
        raise DataError(source, None, None, "the file is empty", "empty_file")
    if first == b"[":  # a JSON list has to be parsed whole
        raw = f.read()
        items = _decode_json(raw[3:] if raw.startswith(_BOM) else raw, source, None, "")
        del raw
        if not items:
            raise DataError(source, None, None, "the file's list holds no records", "empty_file")
        for index, item in enumerate(items):
            yield index, None, item
        return
    index = 0
    for lineno, raw in enumerate(f, start=1):  # JSONL: streamed, one line in memory at a time
        if lineno == 1 and raw.startswith(_BOM):
            raw = raw[3:]
        if not raw.strip():
            continue
        try:
            item: Any = _decode_json(raw.rstrip(b"\r\n"), source, index, f" on line {lineno}")
        except DataError as e:
            if index == 0 and raw.strip().startswith(b"{"):  # maybe one JSON object over several lines
                f.seek(0)
                whole = f.read()
                try:
                    obj = json.loads(whole[3:] if whole.startswith(_BOM) else whole)
                except (ValueError, RecursionError):
                    obj = None
                if isinstance(obj, dict):
                    raise _not_a_list(obj, source) from None
            if index == 0 and raw.strip() in (b"{", b"["):
                e = DataError(source, index, None, e.reason + "; a .json file must hold a list of records, "
                              "otherwise give one record per line (JSONL)", e.code)
            item = e
        if index == 0 and _wraps_records(item):
            raise _not_a_list(item, source)
        yield index, lineno, item
        index += 1


def _wraps_records(obj: Any) -> bool:
    """A JSON object that holds a list of records instead of being one: {"data": [{...}, ...]}."""
    if not isinstance(obj, dict) or any(name in obj for names in (*TEXT_FIELDS.values(), SFT_FIELDS) for name in names):
        return False
    return any(isinstance(v, list) and v and all(isinstance(x, dict) and not {"role", "content"} <= x.keys() for x in v)
               for v in obj.values())  # (a list of chat messages is a record's field, under a renamed column)


def _not_a_list(obj: dict, source: str) -> DataError:
    keys = ", ".join(repr(k) for k in list(obj)[:5]) + (", ..." if len(obj) > 5 else "")
    return DataError(source, None, None, f"expected a JSON list or JSONL (one record per line), got one JSON "
                     f"object with keys {keys}: put the records in a top-level list [{{...}}, ...]", "not_a_list")


def _with_line(err: DataError, line: int | None) -> DataError:
    if line is None or f"line {line}" in err.reason:
        return err
    return DataError(err.source, err.index, err.field_name, f"{err.reason} (line {line})", err.code)


def _admit(err: DataError, on_invalid: str, report: LoadReport) -> None:
    """Raise the error, or count it as skipped: filters/markers are always counted, never raised."""
    if on_invalid == "error" and err.code not in FILTER_CODES:
        raise err
    report.skip(err)


def _check_on_invalid(on_invalid: str) -> None:
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid must be one of {ON_INVALID}, got {on_invalid!r}")


def iter_records(path: str | os.PathLike[str], on_invalid: str = "error", report: LoadReport | None = None,
                 eos_text: str | None = None) -> Iterator[PreferenceRecord]:
    """Stream validated records from a JSON list or JSONL file (told apart by the first character).

    File-level faults (missing, unreadable, empty, a JSON list that does not parse) always raise. `report`,
    if given, is filled in as records go by (e.g. under `datasets.Dataset.from_generator`).
    """
    _check_on_invalid(on_invalid)
    source = source_name(path)
    report = report if report is not None else LoadReport(source)
    f = _open(path, source)
    return _records(f, source, on_invalid, report, eos_text)


def _records(f, source: str, on_invalid: str, report: LoadReport, eos_text: str | None):
    with f:
        try:
            yield from parse_rows(_iter_raw(f, source), source, on_invalid, report, eos_text)
        except OSError as e:
            raise DataError(source, None, None, f"cannot read file: {e.strerror or e}", "file_unreadable") from None


def parse_rows(rows: Iterator[tuple[int, int | None, Any]], source: str, on_invalid: str, report: LoadReport,
               eos_text: str | None = None, parse: Callable[..., PreferenceRecord] | None = None,
               skip_codes: frozenset[str] = frozenset()) -> Iterator[PreferenceRecord]:
    """Validate (index, line or None, decoded row or the DataError decoding it raised) into records: the one
    loop every format and importer goes through (`formats`, `qa_feedback`, `label_studio`), counting into
    `report`. `parse(row, source, index, eos_text)` defaults to `parse_record` (`rows.RowParser` reads
    renamed columns and chat messages first). Errors whose code is in `skip_codes` are the source's own
    filters (a cancelled annotation, a row without a correction): skipped and counted whatever `on_invalid`."""
    parse = parse or parse_record
    for index, line, item in rows:
        report.n_read += 1
        if isinstance(item, Mapping):  # the fields as the file spells them, for `shape.unread_fields`
            report.count_fields(item)
        try:
            if isinstance(item, DataError):
                raise item
            record = parse(item, source, index, eos_text)
        except DataError as e:
            if e.code in skip_codes:
                report.skip(e)
            else:
                _admit(_with_line(e, line), on_invalid, report)
            continue
        except Exception as e:  # never a bare traceback: name the record that caused it
            err = DataError(source, index, None, f"unexpected {type(e).__name__}: {e}", "unexpected")
            _admit(_with_line(err, line), on_invalid, report)
            continue
        report.n_kept += 1
        report.n_regions += len(record.regions)
        report.n_sft += isinstance(record, SFTRecord)
        yield record


def load_records(path: str | os.PathLike[str], on_invalid: str = "error",
                 eos_text: str | None = None) -> tuple[list[PreferenceRecord], LoadReport]:
    """Load every valid record of a file, each its own pair, with a report of what was skipped and why."""
    report = LoadReport(source_name(path))
    records = list(iter_records(path, on_invalid, report, eos_text))
    return records, report


def iter_json_values(path: str | os.PathLike[str]) -> Iterator[tuple[int, int | None, Any]]:
    """(index, line or None, value) of each item of a JSON list or JSONL file, for readers of other record
    shapes (eval questions). File-level faults raise DataError; a JSONL line that does not parse is
    yielded as its DataError, so the reader can name it and go on."""
    source = source_name(path)
    with _open(path, source) as f:
        yield from _iter_raw(f, source)


def record_to_dict(record: PreferenceRecord) -> dict[str, Any]:
    """A record in the research file format (the format `load_records` reads back)."""
    return {
        "prompt": record.prompt,
        "correct_response": record.chosen,
        "incorrect_response": record.rejected,
        "masked_regions": [[r.start, r.end, int(r.flag)] for r in record.regions],
    }


def write_records(records: Sequence[PreferenceRecord], path: str | os.PathLike[str]) -> None:
    """Write records as JSONL, or as a JSON list when the name ends in .json; atomically (temp + rename),
    creating missing parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            if path.suffix == ".json":
                json.dump([record_to_dict(r) for r in records], f, ensure_ascii=False, indent=1)
                f.write("\n")
            else:
                for r in records:
                    f.write(json.dumps(record_to_dict(r), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

"""Preference data in the formats people have, each read into the same `PreferenceRecord`s.

`load_data(path)` is what `train` (datasets=[ours]), `inspect`, `annotate` and `compare` read through:
`locate` tells the format, one reader per format yields rows, and `records.parse_rows` validates every
row the same way (errors name file, record index and field; `on_invalid=skip` counts and names what it
leaves out). `iter_data_rows(path)` gives the rows themselves, for readers of rows that need not be
pairs or carry more than a pair (`eval`'s questions, `compare`'s answers).

| format | told by | read with |
|---|---|---|
| json | any other file: a JSON list or JSONL (`records`) | json, streamed by line |
| parquet | the file's magic bytes `PAR1` (whatever its name) | pyarrow, by row group |
| csv | the name ends in .csv (.tsv: tab-separated) | the csv module: every cell a string |
| disk | a directory written by `datasets`' `save_to_disk` (`DIR:split` for a DatasetDict) | load_from_disk |
| hub | no such local path, and it reads `org/name[:split]` | datasets.load_dataset (network) |

Parquet is read with pyarrow directly (what `datasets` reads it with) so no cached Arrow copy is
written; CSV with the standard library because pandas' type inference (what `datasets` reads CSV with)
would turn an answer "56" into an integer and an empty cell into NaN. A CSV region column holds JSON
text (`[[8, 10, -1]]`; an empty cell: no region), and so does a `messages` column (an SFT conversation).
The network is reached only for a hub id, i.e. a path that does not exist here and has the form
org/name: anything that looks local (a data file's extension, ./, /, ~, more than one /) is reported
missing instead.

`-` is stdin; it, `/dev/stdin` and any other path that is no regular file (a pipe, a FIFO) are read once
into memory (`streams`), so the format is told from their bytes and every reader reads them again.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional

from granular_po.data.records import SFT_FIELDS, _check_on_invalid, _describe, iter_json_values, parse_rows
from granular_po.data.rows import REGION_FIELDS, RowParser, check_columns, rename_columns, text_row
from granular_po.data.schema import DataError, LoadReport, PreferenceRecord, SFTRecord
from granular_po.data.streams import is_stream, open_binary, source_name, stream_bytes

FORMATS = ("json", "parquet", "csv", "disk", "hub")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".pq", ".csv", ".tsv", ".arrow", ".txt", ".gz", ".zip")
_HUB_ID = re.compile(r"(?P<id>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?::(?P<split>[^\s:/][^\s]*))?")
_BATCH = 1024  # parquet rows decoded to Python at a time


@dataclass(frozen=True)
class DataSource:
    """Where records come from: the format (one of FORMATS), the path or hub id, and the split if named."""

    kind: str
    location: str
    split: str | None = None

    @property
    def name(self) -> str:
        """How errors and reports name it: the path as given (`<stdin>` for `-`), or `org/name:split`."""
        return source_name(self.location) + (f":{self.split}" if self.split else "")


def looks_like_hub_id(text: str) -> bool:
    """`org/name` or `org/name:split`, and nothing that reads as a local path (a data file's extension)."""
    match = _HUB_ID.fullmatch(text)
    return bool(match) and not match["id"].lower().endswith(_DATA_SUFFIXES)


def locate(path: str | os.PathLike[str]) -> DataSource:
    """The format of `path`, from the file or directory it names, without reading any record and without
    the network; a path that is neither here nor a hub id raises DataError ("file_missing")."""
    text = str(path)
    local = os.path.expanduser(text)
    if is_stream(text):  # stdin (-), a pipe, a FIFO: read once here, kept for the reader (`streams`)
        return DataSource(_file_kind(text), text)
    if os.path.isdir(local):
        return _disk_source(text, None)
    if os.path.exists(local):
        return DataSource(_file_kind(text), text)
    head, sep, split = text.rpartition(":")
    if sep and head and split and os.path.isdir(os.path.expanduser(head)):
        return _disk_source(head, split)
    if looks_like_hub_id(text):
        match = _HUB_ID.fullmatch(text)
        return DataSource("hub", match["id"], match["split"])
    hint = "" if "." in os.path.basename(text) else " (nor a hub dataset id of the form org/name:split)"
    raise DataError(text, None, None, f"no such file{hint}", "file_missing")


def _file_kind(path: str) -> str:
    try:
        with open_binary(path) as f:
            magic = f.read(4)
    except OSError:
        magic = b""  # the JSON reader names the fault
    if magic == b"PAR1":
        return "parquet"
    return "csv" if path.lower().endswith((".csv", ".tsv")) else "json"


def _disk_source(path: str, split: str | None) -> DataSource:
    local = os.path.expanduser(path)
    if os.path.isfile(os.path.join(local, "dataset_dict.json")) or os.path.isfile(os.path.join(local, "state.json")):
        return DataSource("disk", path, split)
    raise DataError(path, None, None, "is a directory, but not one written by datasets' save_to_disk (no "
                    "dataset_dict.json or state.json): give a data file, or save_to_disk's directory", "file_missing")


# ---------------------------------------------------------------------------------------------------
# One reader per format: (index, line or None, row or the DataError reading it raised)

Rows = Iterator[tuple[int, Optional[int], Any]]


def _parquet_rows(src: DataSource) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        where = io.BytesIO(stream_bytes(src.location)) if is_stream(src.location) else os.path.expanduser(src.location)
        table = pq.ParquetFile(where)
    except (pa.ArrowException, OSError) as e:
        raise DataError(src.name, None, None, f"cannot read the parquet file: {e}", "file_unreadable") from None
    if table.metadata.num_rows == 0:
        raise DataError(src.name, None, None, "the parquet file holds no records", "empty_file")
    index = 0
    for batch in table.iter_batches(batch_size=_BATCH):
        for row in batch.to_pylist():
            yield index, None, row
            index += 1


def _utf8_lines(f, name: str) -> Iterator[str]:
    """Decoded lines of a binary file (a UTF-8 BOM dropped); bad UTF-8 raises naming its line."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    for lineno, raw in enumerate(f, start=1):
        try:
            yield decoder.decode(raw)
        except UnicodeDecodeError as e:
            raise DataError(name, None, None, f"not valid UTF-8 on line {lineno} (byte {e.start} of the line)",
                            "bad_encoding") from None


def _csv_rows(src: DataSource, region_fields: tuple[str, ...]) -> Rows:
    with open_binary(src.location) as f:
        tsv = src.location.lower().endswith(".tsv")
        reader = csv.reader(_utf8_lines(f, src.name), delimiter="\t" if tsv else ",")
        header = next(reader, None)
        if not header:
            raise DataError(src.name, None, None, "the file is empty (a CSV file starts with a header row)",
                            "empty_file")
        doubled = sorted({h for h in header if header.count(h) > 1})
        if doubled:
            raise DataError(src.name, None, doubled[0], "is the name of two columns of the header", "bad_csv")
        index, line = 0, reader.line_num + 1
        for cells in reader:
            if cells:  # a blank line is no record, as in JSONL
                yield index, line, _csv_row(header, cells, region_fields, src.name, index)
                index += 1
            line = reader.line_num + 1
        if index == 0:
            raise DataError(src.name, None, None, "the file has a header but no records", "empty_file")


def _csv_row(header: list[str], cells: list[str], region_fields: tuple[str, ...], name: str,
             index: int) -> dict[str, Any] | DataError:
    if len(cells) != len(header):
        return DataError(name, index, None, f"has {len(cells)} cells, the header {len(header)} (an unquoted "
                         "comma or newline in a text?)", "bad_csv")
    row: dict[str, Any] = dict(zip(header, cells))
    for field in region_fields:
        if field not in row:
            continue
        text = row[field].strip()
        try:
            row[field] = json.loads(text) if text else None
        except ValueError:
            return DataError(name, index, field, "must be JSON text like [[8, 10, -1]] (or an empty cell), got "
                             f"{_describe(row[field])}", "bad_region")
    for field in SFT_FIELDS:  # an empty cell is no text of an SFT record (a file may mix the types)
        if row.get(field) == "":
            row[field] = None
    if row.get("messages") is not None:  # an SFT conversation (`sft_rows`): JSON text, as regions are
        try:
            row["messages"] = json.loads(row["messages"])
        except ValueError:
            return DataError(name, index, "messages", 'must be JSON text of a list of messages like [{"role": '
                             f'"user", "content": "..."}}, ...], got {_describe(row["messages"])}', "bad_message")
    return row


def _dataset_rows(dataset, src: DataSource) -> Rows:
    for index, row in enumerate(dataset):
        yield index, None, row


def _one_split(dataset, src: DataSource):
    """The split the user named of a DatasetDict, or its only split; several and none named raises."""
    from datasets import DatasetDict

    if not isinstance(dataset, DatasetDict):
        if src.split and src.kind == "disk":  # (load_dataset applied a hub id's split already)
            raise DataError(src.name, None, None, f"holds one dataset, not splits: drop ':{src.split}'", "bad_split")
        return dataset
    splits = list(dataset)
    if src.split is None and len(splits) == 1:
        return dataset[splits[0]]
    if src.split not in dataset:
        what = f"has no split {src.split!r}" if src.split else "holds several splits"
        raise DataError(src.name, None, None, f"{what}: name one of {', '.join(splits)} as "
                        f"{src.location}:{splits[0]}", "bad_split")
    return dataset[src.split]


def _disk_rows(src: DataSource) -> Rows:
    import datasets

    try:
        loaded = datasets.load_from_disk(os.path.expanduser(src.location))
    except Exception as e:
        raise DataError(src.name, None, None, f"cannot read save_to_disk's directory: {type(e).__name__}: {e}",
                        "file_unreadable") from None
    return _dataset_rows(_one_split(loaded, src), src)


def _hub_rows(src: DataSource, cache_dir: str | None) -> Rows:
    import datasets  # the network, only here: the user named a hub id

    try:
        loaded = datasets.load_dataset(src.location, split=src.split, cache_dir=cache_dir)
    except Exception as e:
        raise DataError(src.name, None, None, "no such local file, and loading it as a hub dataset failed: "
                        f"{type(e).__name__}: {e}", "hub_unavailable") from None
    return _dataset_rows(_one_split(loaded, src), src)


def iter_rows(src: DataSource, region_fields: tuple[str, ...] = REGION_FIELDS,
              cache_dir: str | None = None) -> Rows:
    """The rows of `src` by format; file-level faults raise DataError."""
    if src.kind == "json":
        return iter_json_values(src.location)
    if src.kind == "parquet":
        return _parquet_rows(src)
    if src.kind == "csv":
        return _csv_rows(src, region_fields)
    if src.kind == "disk":
        return _disk_rows(src)
    if src.kind == "hub":
        return _hub_rows(src, cache_dir)
    raise ValueError(f"unknown data format {src.kind!r}; known: {', '.join(FORMATS)}")


def _region_fields(columns: Mapping[str, str]) -> tuple[str, ...]:
    """The fields a CSV reader parses as JSON text: ours, and the column `columns.regions` names."""
    return (*REGION_FIELDS, *([columns["regions"]] if "regions" in columns else []))


def iter_data_rows(path: str | os.PathLike[str], cache_dir: str | None = None,
                   columns: Mapping[str, str | None] | None = None) -> Rows:
    """(index, line or None, row) of any format, each row as a JSON file would hold it: a table's null cell
    dropped (in a table every row has every column: null is the field absent), the columns `columns` names
    under our names (`rows.rename_columns`, as `load_data` reads them), TRL's chat messages as text
    (`rows.text_row`; a row that cannot be read so is yielded as its DataError, as a JSONL line that does
    not parse is). File-level faults raise DataError; bad `columns` raise ValueError."""
    columns = check_columns(columns)
    src = locate(path)
    try:
        for index, line, row in iter_rows(src, _region_fields(columns), cache_dir):
            if isinstance(row, dict):
                if src.kind != "json":
                    row = {k: v for k, v in row.items() if v is not None}
                try:
                    row = text_row(rename_columns(row, columns, src.name, index), src.name, index)
                except DataError as e:
                    row = e
            yield index, line, row
    except OSError as e:
        raise DataError(src.name, None, None, f"cannot read file: {e.strerror or e}", "file_unreadable") from None


def load_data(path: str | os.PathLike[str], on_invalid: str = "error", eos_text: str | None = None,
              columns: Mapping[str, str | None] | None = None, cache_dir: str | None = None, sft: bool = False
              ) -> tuple[list[PreferenceRecord | SFTRecord], LoadReport]:
    """Every valid record of `path` in any format (see the module docstring), with the load report.

    `columns` renames fields ({"prompt": "question", "chosen": ..., "rejected": ..., "regions": ...});
    rows in TRL's conversational format are read as text (`rows`). `cache_dir`: for hub datasets.
    `sft`: rows of TRL's SFT types (text, prompt-completion, messages) are read as `SFTRecord`s
    (`sft_rows`), for `loss=sft`; without it such a row is refused, naming its field (`sft_record`).
    """
    _check_on_invalid(on_invalid)
    parser = RowParser(columns, sft=sft)
    src = locate(path)
    report = LoadReport(src.name, columns_read=tuple(parser.columns.values()))
    try:
        records = list(parse_rows(iter_rows(src, _region_fields(parser.columns), cache_dir), src.name, on_invalid,
                                  report, eos_text, parse=parser))
    except OSError as e:
        raise DataError(src.name, None, None, f"cannot read file: {e.strerror or e}", "file_unreadable") from None
    return records, report

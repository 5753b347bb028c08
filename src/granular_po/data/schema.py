"""The data types every layer shares: a highlighted region, a preference record, a data error.

A record keeps its position in its source file (`index`) for life, so any error, skipped count or
metric can name the record it came from. Records are never keyed by prompt: two pairs that share a
prompt stay two pairs (the research code merged them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class RegionFlag(IntEnum):
    """Which response a highlighted span lives in (the research code's third element)."""

    CORRECT = 1  # span indexes into the correct (chosen) response
    INCORRECT = -1  # span indexes into the incorrect (rejected) response
    INVALIDATE = 0  # research-code marker: "drop this record" (counted and skipped, never trained on)


@dataclass(frozen=True)
class Region:
    """A half-open character span `[start, end)` of one response, with the response it belongs to."""

    start: int
    end: int
    flag: RegionFlag

    @property
    def in_chosen(self) -> bool:
        return self.flag == RegionFlag.CORRECT

    @property
    def in_rejected(self) -> bool:
        return self.flag == RegionFlag.INCORRECT


@dataclass(frozen=True)
class PreferenceRecord:
    """One (prompt, chosen, rejected) pair with its highlighted regions.

    `chosen` is the correct response and `rejected` the incorrect one. `regions` is empty for a pair
    nobody annotated (then every response token weighs 1). `source` is the file (or hub dataset) and
    `index` the 0-based record position in it.
    """

    prompt: str
    chosen: str
    rejected: str
    regions: tuple[Region, ...] = ()
    source: str = "<memory>"
    index: int = 0

    @property
    def chosen_regions(self) -> tuple[Region, ...]:
        return tuple(r for r in self.regions if r.in_chosen)

    @property
    def rejected_regions(self) -> tuple[Region, ...]:
        return tuple(r for r in self.regions if r.in_rejected)

    @property
    def is_annotated(self) -> bool:
        return bool(self.regions)


@dataclass(frozen=True)
class SFTRecord:
    """One supervised example in one of TRL's SFT dataset types, for `loss=sft` (stage 1) only.

    `kind`: "text" (language modeling: every token of `completion` trains), "prompt_completion"
    (`prompt` is context, `completion` trains) or "conversation" (`messages`, dicts with at least
    "role" and "content": each assistant message at or after `n_context` trains, every other message is
    context; the chat template lays them out). `names` spell each message's field as the file does
    ('messages[3]', 'completion[0]'), for errors. It has no rejected response and no regions: DPO /
    TDPO refuse it and `granular=true` does not apply to it.
    """

    kind: str
    prompt: str = ""
    completion: str = ""
    messages: tuple[dict, ...] = ()
    n_context: int = 0
    names: tuple[str, ...] = ()
    source: str = "<memory>"
    index: int = 0

    regions = chosen_regions = rejected_regions = ()  # class constants: read as a record's by reports
    is_annotated = False

    @property
    def trained_messages(self) -> tuple[int, ...]:
        """Positions of the messages whose tokens train: the assistant messages after the context."""
        return tuple(k for k, m in enumerate(self.messages) if k >= self.n_context and m["role"] == "assistant")


class DataError(ValueError):
    """Bad input, always naming the file, the record index and the field at fault."""

    def __init__(self, source: str, index: int | None, field_name: str | None, reason: str, code: str = "invalid"):
        self.source = source
        self.index = index
        self.field_name = field_name
        self.reason = reason
        self.code = code  # short machine-readable reason, used to count skipped records by reason
        where = source
        if index is not None:
            where += f", record {index}"
        if field_name is not None:
            where += f", field '{field_name}'"
        super().__init__(f"{where}: {reason}")


@dataclass
class LoadReport:
    """What a load kept and what it skipped, by reason: nothing is dropped silently."""

    source: str
    n_read: int = 0
    n_kept: int = 0
    n_regions: int = 0
    n_sft: int = 0  # records of TRL's SFT types (`SFTRecord`) among those kept
    skipped: dict[str, int] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)  # a few full messages, to show the user
    skipped_indices: dict[str, list[int]] = field(default_factory=dict)  # record indices by reason
    fields: dict[str, int] = field(default_factory=dict)  # raw field name -> records having it (`data.shape`)
    warnings: list[str] = field(default_factory=list)  # data-shape findings, one line each (`data.shape`)
    columns_read: tuple[str, ...] = ()  # columns read under another name (`columns.*`): not unread fields

    def count_fields(self, row) -> None:
        """Count one raw row's field names (readers call this for every row read, of any format)."""
        for name in row:
            self.fields[str(name)] = self.fields.get(str(name), 0) + 1

    def skip(self, error: DataError, keep_messages: int = 5) -> None:
        self.skipped[error.code] = self.skipped.get(error.code, 0) + 1
        if error.index is not None:
            self.skipped_indices.setdefault(error.code, []).append(error.index)
        if len(self.first_errors) < keep_messages:
            self.first_errors.append(str(error))

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self, show_indices: int = 10) -> str:
        """One line: counts, then each skip reason with the indices of (up to `show_indices` of) its records."""
        sft = f" ({self.n_sft} SFT)" if self.n_sft else ""
        line = (f"{self.source}: read {plural(self.n_read, 'record')}, kept {self.n_kept}{sft}, "
                f"{plural(self.n_regions, 'region')}")
        if self.skipped:
            reasons = "; ".join(f"{k}={v}" + (f": {_records(self.skipped_indices[k], show_indices)}"
                                             if k in self.skipped_indices else "")
                                for k, v in sorted(self.skipped.items()))
            line += f"; skipped {self.n_skipped} ({reasons})"
        return line


def _records(indices: list[int], show: int) -> str:
    """'record 3' / 'records 3, 7, ... (12 more)'."""
    shown = ", ".join(map(str, indices[:show]))
    more = f", ... ({len(indices) - show} more)" if len(indices) > show else ""
    return f"record{'s' if len(indices) > 1 else ''} {shown}{more}"


def plural(n: int, noun: str) -> str:
    """'1 record', '2 records', '0 records'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"

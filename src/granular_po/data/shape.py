"""Data-shape checks: what a file holds that training would silently ignore or weigh unexpectedly.

Run on what any reader produced (the raw rows' field names, counted by `LoadReport.count_fields` as rows go by,
and the `PreferenceRecord`s), so they hold for every file format. Each finding is one line with the
numbers and the key that changes it; `granular-po inspect` prints them and `train` shows them in its
start-up block. Three findings, from a real user's first run:

- a field we do not read (`masked_regons` in every record trained plain DPO under a granular banner):
  named with a did-you-mean against the names we read; a misspelling in every record is an error
  under `on_invalid=error`;
- `granular=true` and no region in any training file: every token weighs 1, i.e. plain DPO (an error
  at `train`, see `require_regions`);
- pairs whose regions sit on one side only: the other response weighs `granular.unannotated_weight`
  (0 by default: a pair highlighted only in its rejected response trains nothing on its chosen one).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

from granular_po.data.masks import GranularOptions
from granular_po.data.records import SFT_FIELDS, TEXT_FIELDS
from granular_po.data.schema import DataError, LoadReport, PreferenceRecord, SFTRecord, plural

REGION_FIELDS = ("masked_region", "masked_regions")
# read by another command, not by training: never reported as unread
READ_ELSEWHERE = {"answer": "granular-po eval"}
# how close a field name must be to a known one to be called a misspelling of it (difflib ratio)
_MISSPELT_CUTOFF = 0.75


def known_fields() -> tuple[str, ...]:
    """Every record field some reader of ours reads (text fields with their aliases, regions, SFT types)."""
    names = [name for aliases in TEXT_FIELDS.values() for name in aliases]
    return (*names, *REGION_FIELDS, *SFT_FIELDS)


@dataclass(frozen=True)
class UnreadField:
    """A field of the file that no reader of ours reads, in `count` records; `meant`: the known field
    it is probably a misspelling of (None when it looks like none)."""

    name: str
    count: int
    meant: str | None

    def describe(self, n_records: int) -> str:
        guess = f" (did you mean '{self.meant}'?)" if self.meant else ""
        return f"'{self.name}' in {self.count} of {plural(n_records, 'record')}{guess}"


def unread_fields(report: LoadReport) -> list[UnreadField]:
    """The fields of `report.fields` we do not read, most frequent first, with their likely meaning."""
    known = known_fields()
    lowered = {k.lower(): k for k in known}
    found = []
    for name, count in report.fields.items():
        if name in known or name in READ_ELSEWHERE or name in report.columns_read:
            continue
        close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=_MISSPELT_CUTOFF)
        found.append(UnreadField(name, count, lowered[close[0]] if close else None))
    return sorted(found, key=lambda f: (-f.count, f.name))


def check_fields(report: LoadReport, on_invalid: str) -> None:
    """Under on_invalid=error, refuse a file in which EVERY record has a misspelling of a field we read:
    the whole file would silently lose that field (its regions, say). Names the field as the file spells it."""
    if on_invalid != "error" or report.n_read == 0:
        return
    for field in unread_fields(report):
        if field.meant is not None and field.count == report.n_read:
            raise DataError(report.source, None, field.name,
                            f"is not a field we read, and every record ({report.n_read}) has it: did you mean "
                            f"'{field.meant}'? Rename it in the file (or on_invalid=skip to go on without it)",
                            "unknown_field")


@dataclass(frozen=True)
class RegionSides:
    """How a file's annotated pairs spread their regions over the two responses (record indices)."""

    n_records: int
    both: int
    chosen_only: tuple[int, ...]
    rejected_only: tuple[int, ...]

    @property
    def one_sided(self) -> int:
        return len(self.chosen_only) + len(self.rejected_only)


def region_sides(records: Sequence[PreferenceRecord]) -> RegionSides:
    chosen_only, rejected_only, both = [], [], 0
    for record in records:
        chosen, rejected = bool(record.chosen_regions), bool(record.rejected_regions)
        if chosen and rejected:
            both += 1
        elif chosen:
            chosen_only.append(record.index)
        elif rejected:
            rejected_only.append(record.index)
    return RegionSides(len(records), both, tuple(chosen_only), tuple(rejected_only))


def _few(indices: Sequence[int], show: int = 5) -> str:
    more = f", ... ({len(indices) - show} more)" if len(indices) > show else ""
    return ", ".join(map(str, indices[:show])) + more


def shape_warnings(report: LoadReport, records: Sequence[PreferenceRecord], gran: GranularOptions,
                   preference: bool = True) -> list[str]:
    """The data-shape findings of one loaded file, one line each (empty when there is nothing to say).
    `preference`: the loss trains both responses (the one-sided warning is about DPO / TDPO: SFT
    projects rejected-side regions onto the chosen response)."""
    lines = []
    unread = unread_fields(report)
    if unread:
        listed = "; ".join(f.describe(report.n_read) for f in unread[:6])
        more = f"; and {len(unread) - 6} more" if len(unread) > 6 else ""
        lines.append(f"warning: fields not read: {listed}{more}. Only "
                     f"{', '.join(known_fields())} are read (answer by granular-po eval)")
    n_regions = sum(len(r.regions) for r in records)
    if gran.enabled and records and n_regions == 0:
        lines.append(f"warning: granular is on but none of {plural(len(records), 'record')} has a region "
                     f"({' / '.join(REGION_FIELDS)}): every token weighs 1, plain DPO / SFT (an error at train; "
                     "granular=false trains response-level on purpose)")
    sides = region_sides(records)
    # a response without regions weighs unannotated_weight where granular.sides lets regions weigh it (a
    # side sides leaves out weighs 1): the chosen of a rejected-only pair unless sides=rejected, and back
    chosen_bare = sides.rejected_only if gran.sides != "rejected" else ()
    rejected_bare = sides.chosen_only if gran.sides != "chosen" else ()
    n_bare = len(chosen_bare) + len(rejected_bare)
    if gran.enabled and preference and n_bare and gran.unannotated_weight != 1.0:
        parts = []
        if chosen_bare:
            parts.append(f"{len(chosen_bare)} only in the rejected response (records {_few(chosen_bare)})")
        if rejected_bare:
            parts.append(f"{len(rejected_bare)} only in the chosen response (records {_few(rejected_bare)})")
        annotated = sides.both + sides.one_sided
        lines.append(f"warning: {n_bare} of {plural(annotated, 'annotated pair')} have regions on one side "
                     f"only ({'; '.join(parts)}): the other response weighs granular.unannotated_weight="
                     f"{gran.unannotated_weight:g} in full (DPO / TDPO, granular.sides={gran.sides}). "
                     "granular.unannotated_weight=1 trains it response-level; granular.sides=rejected|chosen "
                     "weights one side by its regions and the other by 1")
    return lines


def require_regions(reports: Sequence[LoadReport], gran: GranularOptions) -> None:
    """`granular=true` and no region in any training file: refuse (it would be plain DPO / SFT under a
    granular banner), naming a misspelt region field when the files have one."""
    if not gran.enabled or not reports or any(r.n_regions for r in reports) or not any(r.n_kept for r in reports):
        return
    misspelt = [f for r in reports for f in unread_fields(r) if f.meant in REGION_FIELDS]
    hint = (f" The file has '{misspelt[0].name}' ({misspelt[0].count} records): did you mean '{misspelt[0].meant}'?"
            if misspelt else "")
    sources = ", ".join(r.source for r in reports)
    raise DataError(sources, None, None, f"granular=true but no record has a region ({' / '.join(REGION_FIELDS)}): "
                    "every token would weigh 1, which is plain response-level training." + hint +
                    " Add regions (granular-po annotate derives them from minimal edits), or set granular=false",
                    "no_regions")


def refuse_granular_sft(records: Sequence[PreferenceRecord | SFTRecord], source: str, gran: GranularOptions) -> None:
    """`granular=true` on SFT records (TRL's text / prompt-completion / messages types): they have no regions,
    so the highlight weighting has nothing to weigh them by; refused rather than trained response-level under
    a granular banner, naming the file and its first such records."""
    sft = [r.index for r in records if isinstance(r, SFTRecord)]
    if gran.enabled and sft:
        raise DataError(source, None, None, f"granular=true weights tokens by the highlighted regions of preference "
                        f"pairs, but {plural(len(sft), 'record')} of {len(records)} (records {_few(sft)}) are SFT "
                        "records (text / prompt-completion / messages), which have none: set granular=false to "
                        "train them on every completion / assistant token", "granular_sft")


def refuse_unpaired(report: LoadReport, sft: bool) -> None:
    """DPO / TDPO on a file whose every record is an SFT record: under `on_invalid=skip` each was skipped
    (`sft_record`), and the run would train on nothing; refused, saying which stage reads such a file."""
    n_sft = report.skipped.get("sft_record", 0)
    if not sft and n_sft and report.n_kept == 0:
        raise DataError(report.source, None, None, f"holds no preference pair: {plural(n_sft, 'record')} of "
                        f"{report.n_read} are SFT records (text / prompt-completion / messages), with no rejected "
                        "response for DPO / TDPO to prefer against; train them with loss=sft (stage 1)", "sft_record")

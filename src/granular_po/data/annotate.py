"""Derive highlighted regions from a character diff of minimally edited pairs.

When the incorrect response is the correct one with a small edit (a wrong number, a dropped word), the
characters that differ are the error: no human needs to highlight them. The command line is
`granular-po annotate` (`granular_po.apps.annotate`).

Spans are kept to the exact characters that differ, never widened to whole words: regions become token
weights by overlap (a token counts when any of its characters is in a region), so a one-character span
already marks the whole token that holds it.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

from granular_po.data.records import load_records, write_records
from granular_po.data.schema import PreferenceRecord, Region, RegionFlag


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted spans with overlapping or touching ones joined (nothing between them)."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def derive_regions(chosen: str, rejected: str, include_correct: bool = False,
                   max_edit_ratio: float = 0.5) -> tuple[Region, ...] | None:
    """Regions marking where `rejected` differs from `chosen`, or None when the pair is not a minimal edit.

    Each replaced or extra character run of the rejected response gets a flag -1 region. Where the
    rejected response merely lacks text (a pure insertion in the correct one), the rejected character at
    which it goes its own way is marked: the token holding it is the wrong step. With `include_correct`,
    the correct response's differing runs get flag 1 regions (by the same rule). Returns None when the
    edit ratio (differing characters of both responses / their total length, i.e. 1 - difflib's ratio)
    exceeds `max_edit_ratio`, and () for identical responses, or text missing only at the
    very end of the rejected one (its wrong step is the EOS, which no character region can name).
    """
    matcher = difflib.SequenceMatcher(None, rejected, chosen, autojunk=False)
    opcodes = matcher.get_opcodes()
    total = len(chosen) + len(rejected)
    changed = sum((i2 - i1) + (j2 - j1) for tag, i1, i2, j1, j2 in opcodes if tag != "equal")
    if total and changed / total > max_edit_ratio:
        return None
    wrong: list[tuple[int, int]] = []
    right: list[tuple[int, int]] = []
    for tag, i1, i2, j1, j2 in opcodes:
        if tag == "equal":
            continue
        if i2 > i1:
            wrong.append((i1, i2))
        elif i1 < len(rejected):  # insertion: mark the character where the rejected response diverges
            wrong.append((i1, i1 + 1))
        if include_correct:
            if j2 > j1:
                right.append((j1, j2))
            elif j1 < len(chosen):
                right.append((j1, j1 + 1))
    return (tuple(Region(s, e, RegionFlag.INCORRECT) for s, e in _merge(wrong))
            + tuple(Region(s, e, RegionFlag.CORRECT) for s, e in _merge(right)))


def annotate_records(records: list[PreferenceRecord], include_correct: bool = False,
                     max_edit_ratio: float = 0.5) -> tuple[list[PreferenceRecord], dict[str, Any]]:
    """Annotate the unannotated records (annotated ones are kept as they are); report what was left out."""
    kept: list[PreferenceRecord] = []
    summary: dict[str, Any] = {"annotated": 0, "already_annotated": 0, "too_large_diff": [], "identical": [],
                               "no_span": []}
    for record in records:
        if record.is_annotated:
            summary["already_annotated"] += 1
            kept.append(record)
            continue
        if record.chosen == record.rejected:
            summary["identical"].append(record.index)
            continue
        regions = derive_regions(record.chosen, record.rejected, include_correct, max_edit_ratio)
        if regions is None:
            summary["too_large_diff"].append(record.index)
        elif not regions:
            summary["no_span"].append(record.index)
        else:
            summary["annotated"] += 1
            kept.append(PreferenceRecord(record.prompt, record.chosen, record.rejected, regions,
                                         record.source, record.index))
    return kept, summary


def annotate_file(in_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                  include_correct: bool = False, max_edit_ratio: float = 0.5, on_invalid: str = "error",
                  eos_text: str | None = None) -> dict[str, Any]:
    """Read pairs with `load_records`, derive regions, write them in the research format; return counts.

    Output is JSONL, or a JSON list when `out_path` ends in .json. Pairs with too large a diff, identical
    responses or no markable span are not written; the summary lists their indices.
    """
    records, report = load_records(in_path, on_invalid=on_invalid, eos_text=eos_text)
    kept, summary = annotate_records(records, include_correct, max_edit_ratio)
    write_records(kept, out_path)
    summary.update(source=str(in_path), output=str(out_path), read=report.n_read, written=len(kept),
                   skipped=dict(report.skipped), max_edit_ratio=max_edit_ratio)
    return summary

"""Derive highlighted regions from a character diff of minimally edited pairs.

When the incorrect response is the correct one with a small edit (a wrong number, a dropped word), the
characters that differ are the error: no human needs to highlight them. The command line is
`granular-po annotate` (`granular_po.apps.annotate`).

Regions are whole words without whitespace at their ends: a differing character run is trimmed of edge
whitespace and widened to the words it touches ("Sydney" vs "Canberra" is one region, not the scattered
letters a character diff finds; "90" vs "100" covers the whole number). Regions become token weights by
overlap, and byte-level tokenizers put a word's leading space inside its token, so a region ending in a
space would also weight the next word (the mask trims such edges too, see `masks.trim_region`).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from typing import Any

from granular_po.data.formats import load_data
from granular_po.data.records import write_records
from granular_po.data.schema import PreferenceRecord, Region, RegionFlag

# Scripts written without spaces between words (CJK, Thai, Lao, Myanmar, Khmer): each character is a word.
_UNSPACED = "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u2e80-\u9fff\uf900-\ufaff\U00020000-\U0003ffff"
# A word: a run of word characters that may hold numbers with decimal / thousands separators ("3.14",
# "1,000", "1.5x"), a run of word characters, or one character of an unspaced script.
_WORD = re.compile(rf"[^\W{_UNSPACED}]*\d(?:[.,]\d+)+[^\W{_UNSPACED}]*|[^\W{_UNSPACED}]+|\w")


def _word_span(start: int, end: int, text: str, words: list[tuple[int, int]]) -> tuple[int, int]:
    """`[start, end)` without edge whitespace, widened to the whole words it touches (whitespace only: as is)."""
    piece = text[start:end]
    core = piece.strip()
    if not core:
        return start, end
    start += len(piece) - len(piece.lstrip())
    end = start + len(core)
    for w_start, w_end in words:
        if w_start < end and start < w_end:
            start, end = min(start, w_start), max(end, w_end)
    return start, end


def _divergence(text: str, at: int) -> tuple[int, int] | None:
    """Where text is missing before `text[at]`: the first non-whitespace character from `at` (the token
    holding it is the wrong step), else the character at `at` itself; None at the very end."""
    if at >= len(text):
        return None
    k = at
    while k < len(text) and text[k].isspace():
        k += 1
    return (k, k + 1) if k < len(text) else (at, at + 1)


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

    Each replaced or extra character run of the rejected response gets a flag -1 region, trimmed of edge
    whitespace and widened to whole words (see the module docstring). Where the rejected response merely
    lacks text (a pure insertion in the correct one), the word at which it goes its own way is marked:
    the token holding it is the wrong step. With `include_correct`, the correct response's differing
    runs get flag 1 regions (by the same rule). Returns None when the
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
    sides = [(rejected, wrong, False)] + ([(chosen, right, True)] if include_correct else [])
    for text, spans, is_chosen in sides:
        words = [m.span() for m in _WORD.finditer(text)]
        for tag, i1, i2, j1, j2 in opcodes:
            if tag == "equal":
                continue
            lo, hi = (j1, j2) if is_chosen else (i1, i2)
            span = (lo, hi) if hi > lo else _divergence(text, lo)  # text missing here: mark the next word
            if span is not None:
                spans.append(_word_span(*span, text, words))
    # joining a word with a whitespace-only difference beside it can leave whitespace at an edge: trim again
    return (tuple(Region(*_word_span(s, e, rejected, []), RegionFlag.INCORRECT) for s, e in _merge(wrong))
            + tuple(Region(*_word_span(s, e, chosen, []), RegionFlag.CORRECT) for s, e in _merge(right)))


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


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # the output does not exist yet (or the input is no file: load_data says what it is)
        return False


def annotate_file(in_path: str | os.PathLike[str], out_path: str | os.PathLike[str],
                  include_correct: bool = False, max_edit_ratio: float = 0.5, on_invalid: str = "error",
                  eos_text: str | None = None, in_place: bool = False,
                  columns: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """Read pairs with `formats.load_data` (every format `train` reads, `columns` renaming fields as
    `columns.*` does), derive regions, write them in the research format; return counts.

    Only the records are needed (prompt, the two responses, their regions): fields we do not read (an
    `answer`, an id) are not carried into the output, whatever the input's format. Output is JSONL, or a JSON list when `out_path` ends in .json; missing parent folders are created.
    Pairs with too large a diff, identical responses or no markable span are not written; the summary
    lists their indices, by reason. Writing over the input is refused unless `in_place` (it would drop
    the pairs that are not written).
    """
    if not in_place and _same_file(in_path, out_path):
        raise ValueError(f"{out_path} is the input file: writing it would replace the input and drop the pairs "
                         "that cannot be annotated; give another output file, or --in-place to replace it")
    records, report = load_data(in_path, on_invalid=on_invalid, eos_text=eos_text, columns=columns)
    kept, summary = annotate_records(records, include_correct, max_edit_ratio)
    write_records(kept, out_path)
    # identical responses are skipped while loading: listed with the pairs left out here
    summary["identical"] = sorted(summary["identical"] + report.skipped_indices.pop("identical_responses", []))
    report.skipped.pop("identical_responses", None)
    summary.update(source=report.source, output=str(out_path), read=report.n_read, written=len(kept),
                   skipped=dict(report.skipped), skipped_records=dict(report.skipped_indices),
                   skip_messages=list(report.first_errors), max_edit_ratio=max_edit_ratio)
    return summary

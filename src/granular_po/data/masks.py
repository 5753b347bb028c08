"""Highlighted character regions -> per-token float weights, through the fast tokenizer's offsets.

A token is inside a region when their character spans overlap: `tok_start < r.end and r.start < tok_end`.
That rule needs no re-tokenisation of the highlighted text (the research code re-tokenised the span
alone and searched for the same ids, which fails whenever context changes the ids, and marks the
first occurrence of a repeated phrase; defect #1). Tokens with empty offsets (special tokens, `(0, 0)`)
are never inside a region, and tokens that share one character (an emoji split into byte tokens) are
all inside it together. A zero-length region marks nothing.

Before the overlap test a region is taken without the whitespace at its ends (`trim_region`; a region
of only whitespace stays as it is): byte-level BPE tokenizers (GPT-2, SmolLM2, Llama-3) put a word's
leading space inside its token, so a highlight ending in a space ("54. ", what a double-click selects)
would otherwise also weight the next word.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass

from granular_po.data.schema import PreferenceRecord, Region, RegionFlag

Offsets = Sequence[tuple[int, int]]


@dataclass
class GranularOptions:
    """How highlighted regions weight the tokens of an annotated pair (config key `granular`)."""

    enabled: bool = False
    """Weight tokens by the regions; off: every response token weighs 1 (plain SFT / DPO / TDPO)."""
    outside_weight: float = 0.0
    """Weight of a response's tokens outside all of its regions."""
    unannotated_weight: float = 0.0
    """Weight of every token of a response with no region (its end token included), in a pair whose other
    response has one."""
    include_eos: bool = True
    """The end-of-response token of a response with a region weighs 1 (as the research code did); the
    other response of the pair follows `unannotated_weight` at its end token too."""
    kl_weights: str = "highlight"
    """TDPO's sequential KL: highlight (reduced with the margin's weights, as the research code did) or all
    (every response token weighs 1 in the KL while the margin keeps the highlight weights: the whole
    response stays anchored, TDPO's own KL, Zeng et al. 2024, arXiv 2404.11999). all runs the lm_head on
    every response position."""
    sides: str = "both"
    """Whose highlights shape the preference weights: both (as the research code), rejected or chosen; the
    other response of an annotated pair weighs every token 1, its end token included. cDPO ("Critical
    Tokens Matter", Lin et al. 2024, arXiv 2411.19943) weighs the rejected response only, its released
    default. SFT's weights are unchanged."""
    after_first_error: str = "keep"
    """keep (as the research code) or drop: on a rejected response with a region, every token after the end
    of its first region (by position), its end token included, weighs 0 in the margin: it follows a wrong
    prefix (step-level DPO, e.g. Step-DPO, Lai et al. 2024, arXiv 2406.18629). Applied on top of the
    weights the other keys give (with sides=chosen: the rejected prefix up to its first error weighs 1)."""

    def __post_init__(self) -> None:
        for name in ("outside_weight", "unannotated_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"granular.{name} must be a finite number >= 0, got {value!r}")
            setattr(self, name, float(value))
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"granular.{name}={getattr(self, name)!r}: expected one of {', '.join(choices)}")


# the values of GranularOptions' choice keys; the first is the default (the research code's behaviour)
CHOICES = {"kl_weights": ("highlight", "all"), "sides": ("both", "rejected", "chosen"),
           "after_first_error": ("keep", "drop")}


def trim_region(region: Region, text: str) -> Region:
    """`region` without whitespace (`str.isspace`) at its ends; a region of only whitespace is kept as is."""
    piece = text[region.start:region.end]
    core = piece.strip()
    if not core:
        return region
    start = region.start + (len(piece) - len(piece.lstrip()))
    return Region(start, start + len(core), region.flag)


def trim_regions(record: PreferenceRecord) -> PreferenceRecord:
    """The record with every region trimmed against the response it indexes (see `trim_region`)."""
    regions = tuple(trim_region(r, record.chosen if r.in_chosen else record.rejected) for r in record.regions)
    if regions == record.regions:
        return record
    return PreferenceRecord(record.prompt, record.chosen, record.rejected, regions, record.source, record.index)


def _check_regions(regions: Sequence[Region], n_text_chars: int) -> None:
    for r in regions:
        if not 0 <= r.start <= r.end <= n_text_chars:
            raise ValueError(f"region [{r.start}, {r.end}) lies outside a text of {n_text_chars} characters")


def token_in_regions(offsets: Offsets, regions: Sequence[Region]) -> list[bool]:
    """For each token, whether its character span overlaps any of `regions`."""
    spans = [(r.start, r.end) for r in regions if r.end > r.start]
    return [any(s < r_end and r_start < e for r_start, r_end in spans) for s, e in offsets]


def region_token_weights(
    offsets: Offsets,
    regions: Sequence[Region],
    n_text_chars: int,
    inside: float = 1.0,
    outside: float = 0.0,
) -> list[float]:
    """Per-token weights of one text: `inside` for tokens overlapping a region, `outside` for the rest.

    `offsets` are the tokenizer's `(start, end)` char offsets into that text (len = number of tokens).
    """
    _check_regions(regions, n_text_chars)
    return [inside if hit else outside for hit in token_in_regions(offsets, regions)]


def token_flags(offsets: Offsets, regions: Sequence[Region]) -> list[int]:
    """For display: per token, the flag (1 / -1) of a region it overlaps, else 0."""
    flags = [0] * len(offsets)
    for flag in (RegionFlag.CORRECT, RegionFlag.INCORRECT):
        hits = token_in_regions(offsets, [r for r in regions if r.flag == flag])
        flags = [int(flag) if hit and not f else f for f, hit in zip(flags, hits)]
    return flags


def response_weights(
    offsets: Offsets,
    n_text_chars: int,
    own_regions: Sequence[Region],
    pair_annotated: bool,
    gran: GranularOptions,
    side: str | None = None,
) -> list[float]:
    """Weights of one response's tokens followed by its end-of-response token (len = len(offsets) + 1).

    Granular off, or a pair without regions: all 1. Otherwise tokens inside the response's own regions
    weigh 1 and the rest `outside_weight`, the end token 1 with `include_eos` (else `outside_weight`).
    A response without a region of its own weighs `unannotated_weight` at every position, its end token
    included, as the research code gave it 0 throughout (`include_eos` is for annotated responses only).
    `side` ("chosen" / "rejected"; None for SFT's weights): a side `granular.sides` leaves out weighs 1;
    with `after_first_error=drop`, a rejected response's tokens after its first region weigh 0.
    """
    weights = _response_weights(offsets, n_text_chars, own_regions, pair_annotated, gran, side)
    first = min((r for r in own_regions if r.end > r.start), key=lambda r: r.start, default=None)
    if side != "rejected" or gran.after_first_error == "keep" or not gran.enabled or first is None:
        return weights
    # a token starting at or after the first region's end follows the error; so does the end token
    return [0.0 if start >= first.end else w for w, (start, _end) in zip(weights, offsets)] + [0.0]


def _response_weights(offsets: Offsets, n_text_chars: int, own_regions: Sequence[Region], pair_annotated: bool,
                      gran: GranularOptions, side: str | None) -> list[float]:
    """`response_weights` before `after_first_error`."""
    if not gran.enabled or not pair_annotated or (side is not None and gran.sides not in ("both", side)):
        return [1.0] * (len(offsets) + 1)
    if not any(r.end > r.start for r in own_regions):
        _check_regions(own_regions, n_text_chars)
        return [gran.unannotated_weight] * (len(offsets) + 1)
    body = region_token_weights(offsets, own_regions, n_text_chars, inside=1.0, outside=gran.outside_weight)
    return [*body, 1.0 if gran.include_eos else gran.outside_weight]


def _project_one(region: Region, opcodes: list[tuple[str, int, int, int, int]], n_chosen: int) -> Region | None:
    """Chosen-side image of one rejected-side span (see `project_rejected_regions_to_chosen`)."""
    s, e = region.start, region.end
    lo, hi, anchor = None, None, None
    for tag, i1, i2, j1, j2 in opcodes:
        if tag == "equal":
            a, b = max(s, i1), min(e, i2)
            if a >= b:
                continue
            a, b = j1 + (a - i1), j1 + (b - i1)
        elif tag == "insert":
            if not s <= i1 <= e:  # an insertion touching the region (inside or at an edge) belongs to it
                continue
            a, b = j1, j2
        else:  # replace / delete
            if not (i1 < e and s < i2):
                continue
            a, b = j1, j2
            if anchor is None:
                anchor = j1
        if a < b:
            lo = a if lo is None else min(lo, a)
            hi = b if hi is None else max(hi, b)
    if lo is not None:
        return Region(lo, hi, RegionFlag.CORRECT)
    if anchor is None or n_chosen == 0:
        return None
    # pure deletion: mark the chosen characters on either side of the point where text was removed
    return Region(max(anchor - 1, 0), min(anchor + 1, n_chosen), RegionFlag.CORRECT)


def project_rejected_regions_to_chosen(chosen: str, rejected: str, regions: Sequence[Region]) -> tuple[Region, ...]:
    """Carry flag -1 regions (offsets into `rejected`) onto `chosen` via a character alignment.

    Alignment: `difflib.SequenceMatcher(None, rejected, chosen, autojunk=False)`. A region's image is
    the smallest chosen span holding (a) the chosen side of every replace/delete opcode overlapping
    the region, (b) every insertion inside it or at its edges, and (c) the chosen image of its chars in
    equal blocks. If that is empty (the region was purely deleted) the chosen chars just left and right
    of the deletion point are marked instead (within bounds). Zero-length regions map to nothing.
    Returns new CORRECT regions; the record is never modified (research-code defect #3).
    """
    _check_regions([r for r in regions if r.in_rejected], len(rejected))
    todo = [r for r in regions if r.in_rejected and r.end > r.start]
    if not todo:
        return ()
    opcodes = difflib.SequenceMatcher(None, rejected, chosen, autojunk=False).get_opcodes()
    out = (_project_one(r, opcodes, len(chosen)) for r in todo)
    return tuple(r for r in out if r is not None)


def projected_regions(record: PreferenceRecord) -> tuple[Region, ...]:
    """The record's flag -1 regions, trimmed, projected onto the chosen response and trimmed there."""
    record = trim_regions(record)
    projected = project_rejected_regions_to_chosen(record.chosen, record.rejected, record.regions)
    return tuple(trim_region(r, record.chosen) for r in projected)


def sft_regions(record: PreferenceRecord) -> tuple[Region, ...]:
    """Regions of the chosen response for SFT: its own flag 1 regions plus the projected flag -1 ones."""
    return trim_regions(record).chosen_regions + projected_regions(record)

"""Regions -> token weights through offset mappings, and the SFT projection of rejected-side regions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import TINY_TOKENIZER_KINDS, tiny_tokenizer

from granular_po.data.annotate import derive_regions
from granular_po.data.encode import EncodeOptions, encode_record
from granular_po.data.masks import (
    GranularOptions,
    project_rejected_regions_to_chosen,
    region_token_weights,
    response_weights,
    sft_regions,
    token_flags,
    trim_region,
)
from granular_po.data.schema import PreferenceRecord, Region, RegionFlag
from granular_po.models import load_tokenizer, resolve_model_path

ON = GranularOptions(enabled=True)
WIDE = EncodeOptions(max_length=4096, max_prompt_length=256, prompt_format="raw")
C, R = RegionFlag.CORRECT, RegionFlag.INCORRECT


def offsets_of(tok, text: str) -> list[tuple[int, int]]:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
    return [tuple(o) for o in enc["offset_mapping"]]


def weighted_text(text: str, offsets, weights) -> str:
    """The response text under the weighted tokens (end token excluded), in order, without duplicates."""
    out, pos = [], 0
    for (s, e), w in zip(offsets, weights):
        if w and e > pos:
            out.append(text[max(s, pos):e])
        pos = max(pos, e)
    return "".join(out)


# ---------------------------------------------------------------------------------- property test

_ALPHABET = list("abcT he56.1,!") + [" ", " ", "\n", "\t", "😀", "é", "東", "—"]


@pytest.mark.parametrize("kind", TINY_TOKENIZER_KINDS)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_weighted_tokens_are_exactly_those_overlapping_a_span(kind, data):
    """Oracle: a char-level mask of the spans (without their edge whitespace); a token is weighted iff one
    of its chars is masked."""
    tok = tiny_tokenizer(kind)
    chosen = data.draw(st.text(alphabet=st.sampled_from(_ALPHABET), max_size=40), label="chosen")
    bounds = st.integers(0, len(chosen))
    spans = data.draw(st.lists(st.tuples(bounds, bounds).map(sorted), max_size=3), label="spans")
    regions = tuple(Region(s, e, C) for s, e in spans)
    record = PreferenceRecord("Q?", chosen, "other text", regions)
    row = encode_record(record, tok, WIDE, ON)

    cores = [(t.start, t.end) for t in (trim_region(Region(s, e, C), chosen) for s, e in spans)]  # no edge space
    marked = [any(s <= c < e for s, e in cores) for c in range(len(chosen))]
    offsets = offsets_of(tok, chosen)
    expected = [1.0 if any(marked[c] for c in range(s, e)) else 0.0 for s, e in offsets]
    assert row["chosen_ids"][:-1] == tok(chosen, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert row["chosen_flags"] == [int(w) for w in expected] + [0]
    if not spans:  # a pair nobody annotated: every response token weighs 1
        assert set(row["chosen_weights"]) == set(row["rejected_weights"]) == {1.0}
        return
    if not any(e > s for s, e in spans):  # only empty spans: the chosen response has no region of its own
        assert set(row["chosen_weights"]) == {0.0}  # unannotated_weight, its end token included
    else:
        assert row["chosen_weights"] == expected + [1.0]  # + the end token (include_eos)
    # the rejected response has no region: unannotated_weight (0) throughout, its end token included
    assert set(row["rejected_weights"]) == {0.0}


# ---------------------------------------------------------------------------------- research failures


def test_number_after_space_differs_alone_but_is_marked_exactly():
    """Research code: tokenise the span alone, search for the same ids. In context the byte-level
    tokenizer glues the space to the number (' 1' '56' vs '1' '56'), so that search finds nothing.
    (With this tiny vocab '56' happens to tokenise alike alone and in context, so '156' is used.)"""
    tok = tiny_tokenizer("byte_level")
    text = "The answer is 156."
    start = text.index("156")
    region = Region(start, start + 3, C)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    in_context = [i for i, (s, e) in zip(ids, offsets) if s < region.end and region.start < e]
    alone = tok("156", add_special_tokens=False)["input_ids"]
    assert alone != in_context
    assert not any(ids[k:k + len(alone)] == alone for k in range(len(ids)))  # the old search fails

    weights = region_token_weights(offsets, [region], len(text))
    assert [i for i, w in zip(ids, weights) if w] == in_context
    assert weighted_text(text, offsets, weights).strip() == "156"
    assert weights.count(1.0) == len(in_context)


@pytest.mark.parametrize("kind", TINY_TOKENIZER_KINDS)
def test_repeated_phrase_marks_the_given_occurrence(kind):
    tok = tiny_tokenizer(kind)
    text = "12 times 13 equals 156, so the result is 156."
    second = text.rindex("156")
    offsets = offsets_of(tok, text)
    weights = region_token_weights(offsets, [Region(second, second + 3, C)], len(text))
    hit = [k for k, w in enumerate(weights) if w]
    assert hit and all(offsets[k][1] > second for k in hit)  # nothing from the first "156"
    assert weighted_text(text, offsets, weights).strip() == "156"


def test_special_and_shared_offsets():
    """(0, 0) special-token offsets are never in a region; byte pieces of one emoji go together."""
    region = Region(0, 1, C)
    assert region_token_weights([(0, 0), (0, 1), (0, 1), (1, 2)], [region], 2) == [0.0, 1.0, 1.0, 0.0]
    assert region_token_weights([(0, 1)], [Region(1, 1, C)], 1) == [0.0]  # zero-length marks nothing
    tok = tiny_tokenizer("byte_level")
    text = "a 😀 b"
    offsets = offsets_of(tok, text)
    weights = region_token_weights(offsets, [Region(2, 3, C)], len(text))
    emoji = [k for k, (s, e) in enumerate(offsets) if (s, e) == (2, 3)]
    assert len(emoji) > 1 and all(weights[k] == 1.0 for k in emoji)
    with pytest.raises(ValueError, match="outside"):
        region_token_weights(offsets, [Region(0, 99, C)], len(text))


# ---------------------------------------------------------------------------------- edge whitespace


@pytest.fixture(scope="module")
def smollm2():
    """The real default tokenizer (byte-level BPE: a word's leading space lives in its token)."""
    return load_tokenizer(resolve_model_path("smollm2-135m"))


def _marked_pieces(tok, text: str, weights) -> list[str]:
    return [text[s:e] for (s, e), w in zip(offsets_of(tok, text), weights) if w]


def test_a_highlight_ending_in_a_space_does_not_weight_the_next_word(smollm2):
    """Issue 11.3: "54. " (a double-click selection) also weighted ' The' in the rejected response, and its
    projection "56. " weighted ' The' in the chosen response for SFT."""
    chosen, rejected = "7 * 8 = 56. The answer is 56.", "7 * 8 = 54. The answer is 54."
    record = PreferenceRecord("What is 7 * 8?", chosen, rejected, (Region(8, 12, R),))
    all_tokens = _marked_pieces(smollm2, rejected, [1] * len(offsets_of(smollm2, rejected)))
    assert rejected[8:12] == "54. " and " The" in all_tokens  # the space before 'The' is in its token
    row = encode_record(record, smollm2, WIDE, ON)
    assert _marked_pieces(smollm2, rejected, row["rejected_weights"][:-1]) == ["5", "4", "."]
    assert _marked_pieces(smollm2, chosen, row["sft_weights"][:-1]) == ["5", "6", "."]
    assert row["rejected_flags"][:-1] == [-1 if w else 0 for w in row["rejected_weights"][:-1]]


def test_derived_regions_weight_the_inserted_word_only(smollm2):
    """derive_regions("The answer is 5.", "The answer is not 5.") gave 'not ', which also weighted the
    token after it; now the region is 'not' and the rejected response weighs ' not' alone."""
    chosen, rejected = "The answer is 5.", "The answer is not 5."
    regions = derive_regions(chosen, rejected)
    row = encode_record(PreferenceRecord("Q?", chosen, rejected, regions), smollm2, WIDE, ON)
    assert _marked_pieces(smollm2, rejected, row["rejected_weights"][:-1]) == [" not"]
    sydney = derive_regions("The capital is Canberra.", "The capital is Sydney.")
    row = encode_record(PreferenceRecord("Q?", "The capital is Canberra.", "The capital is Sydney.", sydney),
                        smollm2, WIDE, ON)
    assert "".join(_marked_pieces(smollm2, "The capital is Sydney.", row["rejected_weights"][:-1])) == " Sydney"


def test_trim_region():
    text = " a b \n"
    assert trim_region(Region(0, 6, C), text) == Region(1, 4, C)
    assert trim_region(Region(0, 1, C), text) == Region(0, 1, C)  # only whitespace: kept as is
    assert trim_region(Region(2, 2, C), text) == Region(2, 2, C)
    assert trim_region(Region(1, 2, C), "\u00a0x\u3000") == Region(1, 2, C)  # already trimmed


_SPACED = ["The", "answer", "is", "54", "56.", "é", "😀", "—", "x"]
_GAPS = [" ", " ", "  ", "\n", "\t", "\u00a0"]


@pytest.mark.parametrize("kind", TINY_TOKENIZER_KINDS)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_edge_whitespace_of_a_region_never_weights_a_token(kind, data):
    """Property, on tokenizers whose tokens carry leading spaces (byte-level) or not: the weighted tokens
    are those overlapping the region's non-whitespace core; widening a region by the whitespace around it
    changes nothing; a region of only whitespace marks the tokens it overlaps."""
    tok = tiny_tokenizer(kind)
    words = data.draw(st.lists(st.sampled_from(_SPACED), min_size=1, max_size=6), label="words")
    gaps = data.draw(st.lists(st.sampled_from(_GAPS), min_size=len(words), max_size=len(words)), label="gaps")
    text = "".join(w + g for w, g in zip(words, gaps))
    s, e = sorted(data.draw(st.tuples(st.integers(0, len(text)), st.integers(0, len(text))), label="span"))
    core = text[s:e].strip()
    lo = s + len(text[s:e]) - len(text[s:e].lstrip()) if core else s
    hi = lo + len(core) if core else e
    wide_lo, wide_hi = lo, hi
    if core:  # every whitespace character around the core joins the region
        while wide_lo > 0 and text[wide_lo - 1].isspace():
            wide_lo -= 1
        while wide_hi < len(text) and text[wide_hi].isspace():
            wide_hi += 1
    offsets = offsets_of(tok, text)
    expected = [1.0 if st_ < hi and lo < en else 0.0 for st_, en in offsets]
    for a, b in {(s, e), (wide_lo, wide_hi)}:
        row = encode_record(PreferenceRecord("Q", text, "other", (Region(a, b, C),)), tok, WIDE, ON)
        if hi > lo:
            assert row["chosen_weights"][:-1] == expected, (text, a, b)
            assert row["chosen_flags"][:-1] == [int(w) for w in expected]


# ---------------------------------------------------------------------------------- options


def test_weight_rules():
    offsets = [(0, 2), (2, 4), (4, 6)]
    own = [Region(2, 4, C)]
    assert response_weights(offsets, 6, own, True, ON) == [0.0, 1.0, 0.0, 1.0]
    no_eos = GranularOptions(enabled=True, outside_weight=0.25, include_eos=False)
    assert response_weights(offsets, 6, own, True, no_eos) == [0.25, 1.0, 0.25, 0.25]
    unann = GranularOptions(enabled=True, unannotated_weight=0.5)
    assert response_weights(offsets, 6, [], True, unann) == [0.5] * 4  # its end token too (include_eos or not)
    unann_no_eos = GranularOptions(enabled=True, unannotated_weight=0.5, include_eos=False)
    assert response_weights(offsets, 6, [], True, unann_no_eos) == [0.5] * 4
    assert response_weights(offsets, 6, own, True, GranularOptions(enabled=False)) == [1.0] * 4
    assert response_weights(offsets, 6, [], False, ON) == [1.0] * 4  # a pair nobody annotated
    with pytest.raises(ValueError):
        GranularOptions(outside_weight=-1)
    with pytest.raises(ValueError):
        GranularOptions(unannotated_weight=float("nan"))


@pytest.mark.parametrize("include_eos", [True, False])
def test_response_without_a_region_weighs_unannotated_weight_at_its_end_token(include_eos):
    """Issue 11.2: the research code gave the response without a region 0 everywhere, its EOS included;
    `include_eos` is for the annotated response only."""
    tok = tiny_tokenizer("byte_level")
    record = PreferenceRecord("Q", "The answer is 56.", "The answer is 54.", (Region(14, 16, R),))
    row = encode_record(record, tok, WIDE, GranularOptions(enabled=True, include_eos=include_eos))
    assert row["chosen_ids"][-1] == tok.eos_token_id
    assert row["chosen_weights"] == [0.0] * len(row["chosen_ids"])
    assert row["rejected_weights"][-1] == (1.0 if include_eos else 0.0)
    assert sum(row["rejected_weights"][:-1]) >= 1.0  # the highlighted number itself
    half = encode_record(record, tok, WIDE, GranularOptions(enabled=True, unannotated_weight=0.5))
    assert half["chosen_weights"] == [0.5] * len(half["chosen_ids"])


def test_token_flags():
    offsets = [(0, 2), (2, 4), (4, 6)]
    assert token_flags(offsets, [Region(0, 1, C), Region(5, 6, R)]) == [1, 0, -1]


def test_encode_applies_rules_per_response():
    tok = tiny_tokenizer("byte_level")
    record = PreferenceRecord("Q", "The answer is 56.", "The answer is 54.", (Region(14, 16, R),))
    gran = GranularOptions(enabled=True, outside_weight=0.1, unannotated_weight=0.3)
    row = encode_record(record, tok, WIDE, gran)
    assert row["chosen_weights"] == [0.3] * len(row["chosen_ids"])  # no region of its own: its end token too
    rej = offsets_of(tok, record.rejected)
    assert row["rejected_weights"] == [1.0 if s < 16 and 14 < e else 0.1 for s, e in rej] + [1.0]
    assert row["rejected_flags"] == [-1 if s < 16 and 14 < e else 0 for s, e in rej] + [0]
    off = encode_record(record, tok, WIDE, GranularOptions(enabled=False))
    assert set(off["chosen_weights"]) == set(off["rejected_weights"]) == set(off["sft_weights"]) == {1.0}


# ---------------------------------------------------------------------------------- SFT projection


@pytest.mark.parametrize(
    ("rejected", "chosen", "span", "expected"),
    [
        ("The answer is 54.", "The answer is 56.", "54", "56"),  # substitution
        ("The answer is 56 apples.", "The answer is 56.", " apples", "6."),  # deletion: chars around the gap
        ("The answer is 5.", "The answer is 56.", "5", "56"),  # insertion at the region's edge
        ("It is 54.", "The answer is 56.", "54", "56"),  # offsets differ between the two texts
    ],
)
def test_projection(rejected, chosen, span, expected):
    start = rejected.rindex(span)
    record = PreferenceRecord("Q", chosen, rejected, (Region(start, start + len(span), R),))
    projected = project_rejected_regions_to_chosen(chosen, rejected, record.regions)
    assert [chosen[r.start:r.end] for r in projected] == [expected]
    assert all(r.flag == C for r in projected)
    assert record.regions == (Region(start, start + len(span), R),)  # the record is untouched
    for kind in TINY_TOKENIZER_KINDS:
        tok = tiny_tokenizer(kind)
        row = encode_record(record, tok, WIDE, ON)
        offsets = offsets_of(tok, chosen)
        under = weighted_text(chosen, offsets, row["sft_weights"][:-1])
        assert all(ch in under for ch in expected.strip()), (kind, under)
        assert row["sft_weights"] == encode_record(record, tok, WIDE, ON)["sft_weights"]  # stable


def test_sft_regions_union_and_edge_cases():
    record = PreferenceRecord("Q", "abc def", "abc xyz", (Region(0, 3, C), Region(4, 7, R)))
    assert [(r.start, r.end) for r in sft_regions(record)] == [(0, 3), (4, 7)]
    assert project_rejected_regions_to_chosen("abc", "abc", (Region(1, 1, R),)) == ()  # zero length
    assert project_rejected_regions_to_chosen("", "abc", (Region(0, 3, R),)) == ()  # nothing to mark
    deleted_at_end = project_rejected_regions_to_chosen("abc", "abc!!", (Region(3, 5, R),))
    assert [(r.start, r.end) for r in deleted_at_end] == [(2, 3)]  # within bounds
    deleted_at_start = project_rejected_regions_to_chosen("abc", "!!abc", (Region(0, 2, R),))
    assert [(r.start, r.end) for r in deleted_at_start] == [(0, 1)]

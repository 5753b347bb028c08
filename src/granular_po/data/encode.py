"""Records -> token ids and per-token weights: prompt formatting, end-of-response token, truncation.

The prompt and each response are tokenised separately (as the research code did), the response with
character offsets so regions map to tokens exactly (see `masks`). Every response ends with its
end-of-response token (EOS for raw prompts, the template's end-of-turn token for chat) and keeps it
under truncation (research-code defect #8).

(Over 350 lines: the layout of a prompt, truncation, the offset check and the reached-region check
all act on the same token lists and are tested together.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from granular_po.data.masks import (
    GranularOptions,
    response_weights,
    sft_regions,
    token_flags,
    token_in_regions,
    trim_region,
    trim_regions,
)
from granular_po.data.schema import DataError, LoadReport, PreferenceRecord, Region, RegionFlag, SFTRecord

logger = logging.getLogger("granular_po")

_ENCODE_VERSION = 4  # bump when the encoding changes, so cached datasets are not reused
PROMPT_FORMATS = ("auto", "raw", "chat")
TRUNCATION_MODES = ("keep_end", "keep_start")


@dataclass
class EncodeOptions:
    """Tokenisation settings (config keys max_length, max_prompt_length, prompt_format, truncation_mode)."""

    max_length: int = 512
    """Max tokens of prompt + response (end-of-response token included)."""
    max_prompt_length: int = 256
    """Prompts are cut to this many tokens first, when prompt + longer response is too long."""
    prompt_format: str = "auto"
    """raw: prompt text as is; chat: the tokenizer's chat template; auto: chat when it has one."""
    truncation_mode: str = "keep_end"
    """Which end of a long prompt to keep: keep_end (research code) or keep_start."""

    def __post_init__(self) -> None:
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {self.truncation_mode!r}")
        if self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1, got {self.max_prompt_length}")
        if self.max_length < self.max_prompt_length + 2:
            raise ValueError(
                f"max_length={self.max_length} must be at least max_prompt_length + 2 = {self.max_prompt_length + 2} "
                "(room for one response token and the end token): lower max_prompt_length too "
                f"(e.g. max_prompt_length={max(1, self.max_length // 2)}), or raise max_length"
            )


@dataclass(frozen=True)
class TokenLayout:
    """What one tokenizer needs to encode a record, resolved once: chat or raw, end token, BOS."""

    chat: bool
    end_token_id: int  # closes every response: EOS (raw) or the template's end-of-turn token (chat)
    bos_token_id: int | None  # raw only: prepended to the prompt when the tokenizer adds one by default


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special)
    return ids


def end_of_turn_id(tokenizer) -> int:
    """The first special token the chat template puts after an assistant message's content (else EOS)."""
    sentinel = "granular sentinel reply"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template may refuse this conversation (roles, system turn): fall back to EOS
        text = ""
    pos = text.rfind(sentinel) if isinstance(text, str) else -1
    if pos >= 0:
        after = pos + len(sentinel)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        special = _special_ids(tokenizer)
        for tid, (start, _) in zip(enc["input_ids"], enc["offset_mapping"]):
            if start >= after and tid in special:
                return tid
    if tokenizer.eos_token_id is None:
        raise ValueError("cannot find the chat template's end-of-turn token and the tokenizer has no EOS")
    return tokenizer.eos_token_id


_OFFSET_PROBE = "The answer is 56, not 54.\nYes: 7 * 8 = 56!"


def check_offsets(tokenizer, text: str = _OFFSET_PROBE) -> None:
    """Refuse a tokenizer whose offsets do not cover a response's text: every non-whitespace character
    must lie in the span of a token with non-zero width, or regions cannot be mapped to tokens (Llama-3
    tokenizers under tokenizers < 0.20.1 return zero-width offsets, and every region then marks nothing)."""
    _, offsets = _response(text, tokenizer)
    covered = [False] * len(text)
    for start, end in offsets:
        for c in range(start, min(end, len(text))):
            covered[c] = True
    missed = [c for c, ch in enumerate(text) if not ch.isspace() and not covered[c]]
    if missed:
        zero = sum(1 for s, e in offsets if e <= s)
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {name!r}: its offset mapping does not cover the text it encodes ({len(missed)} of "
            f"{sum(not ch.isspace() for ch in text)} characters of {text!r} lie in no token; {zero} of "
            f"{len(offsets)} tokens have zero-width offsets), so highlighted regions cannot be mapped to tokens. "
            "Install tokenizers>=0.20.1 (older versions break Llama-3's offsets) or use another tokenizer")


def resolve_layout(tokenizer, enc: EncodeOptions) -> TokenLayout:
    """Pick the prompt format and the end-of-response token for `tokenizer`, after checking its offsets."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer: offset mappings are needed")
    check_offsets(tokenizer)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    chat = enc.prompt_format == "chat" or (enc.prompt_format == "auto" and has_template)
    if chat:
        if not has_template:
            raise ValueError("prompt_format=chat but the tokenizer has no chat template")
        return TokenLayout(chat=True, end_token_id=end_of_turn_id(tokenizer), bos_token_id=None)
    if tokenizer.eos_token_id is None:
        raise ValueError("prompt_format=raw needs a tokenizer with an EOS token")
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    return TokenLayout(chat=False, end_token_id=tokenizer.eos_token_id, bos_token_id=bos if adds_bos else None)


def encode_prompt(prompt: str, tokenizer, layout: TokenLayout) -> list[int]:
    """A prompt's token ids as training sees them (before truncation): the chat template's user turn and
    generation prompt, or the raw text with the tokenizer's BOS when it adds one. `granular-po eval` and
    compare's scoring generate from these same ids, so a model is tested on the prompts it was trained on."""
    if layout.chat:
        out = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(out["input_ids"] if isinstance(out, Mapping) else out)
    ids = tokenizer(prompt, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if layout.bos_token_id is not None and ids[:1] != [layout.bos_token_id]:
        ids = [layout.bos_token_id, *ids]
    return list(ids)


def _response(text: str, tokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    # split_special_tokens: a literal "<|endoftext|>" in a response is text, not an early EOS
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _cut(seq: list, budget: int) -> list:
    """Keep the first `budget - 1` items and the last (the end-of-response token)."""
    return seq if len(seq) <= budget else seq[: budget - 1] + seq[-1:]


def encode_record(
    record: PreferenceRecord,
    tokenizer,
    enc: EncodeOptions,
    gran: GranularOptions,
    layout: TokenLayout | None = None,
    with_offsets: bool = False,
) -> dict[str, Any]:
    """Encode one pair; see INTERFACES.md for the keys. Response lists all end with the end token.

    `with_offsets` adds `chosen_offsets` / `rejected_offsets` (char spans; the end token gets an empty
    span at the text's end) and `truncated`, for the inspect viewer. `unreached_regions` lists the
    positions (in `record.regions`) of the regions that mark no kept token (see `admit_reached`).
    """
    layout = layout or resolve_layout(tokenizer, enc)
    record = trim_regions(record)  # regions are taken without edge whitespace (see `masks`)
    prompt_ids = encode_prompt(record.prompt, tokenizer, layout)
    out: dict[str, Any] = {"index": record.index}
    for side, text, own in (
        ("chosen", record.chosen, record.chosen_regions),
        ("rejected", record.rejected, record.rejected_regions),
    ):
        ids, offsets = _response(text, tokenizer)
        out[f"{side}_weights"] = response_weights(offsets, len(text), own, record.is_annotated, gran, side)
        out[f"{side}_flags"] = [*token_flags(offsets, own), 0]
        out[f"{side}_ids"] = [*ids, layout.end_token_id]
        out[f"{side}_offsets"] = [*offsets, (len(text), len(text))]
        if side == "chosen":  # SFT trains on chosen only: rejected-side regions are projected onto it
            regions = sft_regions(record) if gran.enabled and record.is_annotated else ()
            out["sft_weights"] = response_weights(offsets, len(text), regions, record.is_annotated, gran)

    longer = max(len(out["chosen_ids"]), len(out["rejected_ids"]))
    truncated = len(prompt_ids) + longer > enc.max_length
    if truncated:
        keep = enc.max_prompt_length
        prompt_ids = prompt_ids[-keep:] if enc.truncation_mode == "keep_end" else prompt_ids[:keep]
    if len(prompt_ids) + longer > enc.max_length:
        budget = enc.max_length - len(prompt_ids)
        for key in ("chosen_ids", "chosen_weights", "chosen_flags", "chosen_offsets", "sft_weights",
                    "rejected_ids", "rejected_weights", "rejected_flags", "rejected_offsets"):
            out[key] = _cut(out[key], budget)
    out["prompt_ids"] = prompt_ids
    out["unreached_regions"] = [
        k for k, r in enumerate(record.regions)
        if not any(token_in_regions(out["chosen_offsets" if r.in_chosen else "rejected_offsets"], [r]))
    ]
    if with_offsets:
        out["truncated"] = truncated
    else:
        del out["chosen_offsets"], out["rejected_offsets"]
    return out


NO_TOKEN = "region_reaches_no_token"


def unreached_region_error(record: PreferenceRecord, k: int, tokenizer, enc: EncodeOptions) -> DataError:
    """Why region `k` of `record` marks no token: zero length, truncated away, or characters no token holds."""
    region = record.regions[k]
    which, text = ("correct", record.chosen) if region.in_chosen else ("incorrect", record.rejected)
    trimmed = trim_region(region, text)
    where = f"region [{region.start}, {region.end}) of the {which} response"
    if trimmed.end <= trimmed.start:
        reason = f"{where} is empty (zero length): it marks no token"
    elif any(token_in_regions(_response(text, tokenizer)[1], [trimmed])):
        reason = (f"{where} ({text[trimmed.start:trimmed.end]!r}) lies past max_length={enc.max_length}: its "
                  "tokens are truncated away (raise max_length, or lower max_prompt_length)")
    else:
        reason = (f"{where} ({text[trimmed.start:trimmed.end]!r}) overlaps no token: the tokenizer keeps no "
                  "token for those characters")
    field = f"masked_regions[{k}]" if len(record.regions) > 1 else "masked_region"
    return DataError(record.source, record.index, field, f"{reason}; no region of the {which} response "
                     "reaches a token, so it would train on no highlighted token", NO_TOKEN)


def _stranded(record: PreferenceRecord, unreached: Sequence[int]) -> int | None:
    """The first region of a response none of whose own regions reaches a token, else None."""
    for in_chosen in (True, False):
        own = [k for k, r in enumerate(record.regions) if r.in_chosen == in_chosen]
        if own and all(k in unreached for k in own):
            return own[0]
    return None


def admit_reached(records: Sequence[PreferenceRecord], unreached: Sequence[Sequence[int]], tokenizer,
                  enc: EncodeOptions, on_invalid: str, report: LoadReport | None = None) -> list[int]:
    """Positions of the records to train on: those where every response with regions has one that reaches
    a kept token.

    A response whose regions all reach no token (zero length, truncated past max_length, characters no
    token holds) would train on its end token alone, its highlight lost: with `on_invalid="error"` that
    raises a DataError naming the record and the region; with "skip" the record is left out, counted in
    `report` by reason and named there. A region that reaches nothing beside one of the same response
    that does (a third highlight cut by max_length) leaves the pair trainable: one notice names them.
    """
    keep, partial = [], []
    for pos, (record, bad) in enumerate(zip(records, unreached, strict=True)):
        k = _stranded(record, bad) if bad else None
        if k is None:
            keep.append(pos)
            if bad:
                partial.append(record.index)
            continue
        error = unreached_region_error(record, k, tokenizer, enc)
        if on_invalid == "error":
            raise error
        if report is not None:
            report.skip(error)
            report.n_kept -= 1
            report.n_regions -= len(record.regions)
    if partial:
        shown = ", ".join(map(str, partial[:10])) + (f", ... ({len(partial) - 10} more)" if len(partial) > 10 else "")
        one = len(partial) == 1
        logger.warning("notice: %d %s a region that reaches no token (empty, or cut by max_length=%d) beside "
                       "regions that do; %s on those (record%s %s)", len(partial), "pair has" if one else "pairs have",
                       enc.max_length, "it trains" if one else "they train", "" if one else "s", shown)
    return keep


def _row(record: PreferenceRecord | SFTRecord) -> dict[str, Any]:
    if isinstance(record, SFTRecord):  # (the SFT types: `sft_encode`, from the record in `sft`)
        from granular_po.data.sft_rows import sft_record_dict

        return {"index": record.index, "prompt": "", "chosen": "", "rejected": "", "regions": [],
                "sft": json.dumps(sft_record_dict(record), ensure_ascii=False)}
    regions = [[r.start, r.end, int(r.flag)] for r in record.regions]
    return {"index": record.index, "prompt": record.prompt, "chosen": record.chosen,
            "rejected": record.rejected, "regions": regions, "sft": ""}


def _encode_row(row: dict, tokenizer, enc: EncodeOptions, gran: GranularOptions, layout: TokenLayout) -> dict:
    if row["sft"]:
        from granular_po.data.sft_encode import encode_sft_record
        from granular_po.data.sft_rows import sft_record_from_dict

        return encode_sft_record(sft_record_from_dict(json.loads(row["sft"]), row["index"]), tokenizer, enc, layout)
    regions = tuple(Region(s, e, RegionFlag(f)) for s, e, f in row["regions"])
    record = PreferenceRecord(row["prompt"], row["chosen"], row["rejected"], regions, index=row["index"])
    return encode_record(record, tokenizer, enc, gran, layout)


def encoding_fingerprint(rows: Sequence[dict], tokenizer, enc: EncodeOptions, gran: GranularOptions) -> str:
    """A hash of everything the encoded dataset depends on: data, tokenizer (vocab), options, code version."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        _ENCODE_VERSION, type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""),
        backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True),
        getattr(tokenizer, "chat_template", None), tokenizer.bos_token_id, tokenizer.eos_token_id,
        asdict(enc), asdict(gran),
    ]
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:32]


def build_dataset(
    records: Sequence[PreferenceRecord | SFTRecord],
    tokenizer,
    enc: EncodeOptions,
    gran: GranularOptions,
    num_proc: int = 1,
    cache_dir: str | os.PathLike | None = None,
    on_invalid: str = "error",
    report: LoadReport | None = None,
):
    """Encode `records` into an Arrow `datasets.Dataset` (one row per record, columns of encode_record; an
    `SFTRecord` through `sft_encode`, after `admit_sft` checked its conversation against the chat template).

    With `cache_dir` the encoded table is written there under a fingerprint of data, tokenizer and
    options, and reused by a later identical call. With `gran.enabled`, a record with a region that
    reaches no token raises or is skipped and counted in `report` (`on_invalid`, see `admit_reached`).
    """
    from datasets import Dataset, Features, Value
    from datasets import Sequence as ListOf

    from granular_po.data.sft_encode import admit_sft

    layout = resolve_layout(tokenizer, enc)
    records = admit_sft(records, tokenizer, layout, on_invalid, report)  # conversations the template lays out
    rows = [_row(r) for r in records]
    text_features = Features({
        "index": Value("int64"), "prompt": Value("string"), "chosen": Value("string"),
        "rejected": Value("string"), "regions": ListOf(ListOf(Value("int64"))), "sft": Value("string"),
    })
    ids, weights, flags = ListOf(Value("int32")), ListOf(Value("float32")), ListOf(Value("int8"))
    out_features = Features({
        "index": Value("int64"), "prompt_ids": ids, "chosen_ids": ids, "chosen_weights": weights,
        "rejected_ids": ids, "rejected_weights": weights, "sft_weights": weights,
        "chosen_flags": flags, "rejected_flags": flags, "unreached_regions": ListOf(Value("int32")),
    })
    fingerprint = encoding_fingerprint(rows, tokenizer, enc, gran)
    cache_file = None
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        cache_file = os.path.join(os.fspath(cache_dir), f"encoded-{fingerprint}.arrow")
    if not rows:  # datasets.map would drop the output columns of an empty table
        empty = Dataset.from_dict({k: [] for k in out_features}, features=out_features)
        return empty.remove_columns("unreached_regions")
    source = Dataset.from_dict({k: [row[k] for row in rows] for k in text_features}, features=text_features)
    encoded = source.map(
        _encode_row,
        fn_kwargs={"tokenizer": tokenizer, "enc": enc, "gran": gran, "layout": layout},
        remove_columns=["prompt", "chosen", "rejected", "regions", "sft"],
        features=out_features,
        num_proc=num_proc if num_proc and num_proc > 1 and len(rows) > 1 else None,
        new_fingerprint=fingerprint,
        cache_file_name=cache_file,
        load_from_cache_file=cache_file is not None,
        desc="tokenising",
    )
    if gran.enabled:
        keep = admit_reached(records, encoded["unreached_regions"], tokenizer, enc, on_invalid, report)
        if len(keep) < len(records):
            encoded = encoded.select(keep)
    return encoded.remove_columns("unreached_regions")


def response_token_share(dataset) -> float:
    """Share of response tokens (chosen and rejected, end tokens included) with a non-zero weight."""
    total = nonzero = 0
    if hasattr(dataset, "with_format"):
        import pyarrow.compute as pc

        table = dataset.with_format("arrow")[:]
        for name in ("chosen_weights", "rejected_weights"):
            flat = pc.list_flatten(table.column(name))
            total += len(flat)
            nonzero += pc.sum(pc.not_equal(flat, 0)).as_py() or 0
    else:
        for row in dataset:
            for name in ("chosen_weights", "rejected_weights"):
                total += len(row[name])
                nonzero += sum(1 for w in row[name] if w != 0)
    return nonzero / total if total else 0.0

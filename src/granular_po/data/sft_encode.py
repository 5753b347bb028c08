"""`SFTRecord`s -> token ids and weights, in the columns `encode.build_dataset` writes for a pair.

What trains (weight 1) and what is context (weight 0), as TRL's SFTTrainer with `completion_only_loss`
and `assistant_only_loss`:

- text: BOS when the tokenizer adds one, the text, EOS; every token trains (the first one is context when
  there is no BOS: no position predicts it). Always raw text, also under a chat template;
- prompt-completion: the prompt as a pair's prompt is laid out (`encode.encode_prompt`: the chat template's
  user turn, or raw), then the completion and its end token (EOS raw, end-of-turn chat), which train;
- conversation: the chat template's text, cut at each trained (assistant) message: the template's text
  before it is context, its content (tokenised alone, as a pair's response is) and the end-of-turn token
  train; the text after the last trained message is dropped (nothing after it trains).

`prompt_ids` is the context before the first trained token, `chosen_ids` / `sft_weights` the rest (context
turns between assistant messages weigh 0), so `SFTCollator` batches these rows as it batches pairs.
A conversation needs the chat template (a raw prompt format cannot lay out roles) and a template that
writes each message's content verbatim after the generation prompt; a record that breaks either is
named (`admit_sft`) before anything is encoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from granular_po.data.encode import EncodeOptions, TokenLayout, _response, encode_prompt
from granular_po.data.schema import DataError, LoadReport, PreferenceRecord, SFTRecord


def _render(tokenizer, messages: Sequence[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation)


def conversation_turns(record: SFTRecord, tokenizer, end_token_id: int) -> list[tuple[str, str]]:
    """(template text before, content) of each trained message, in order: the template's text up to and
    including the message's generation prompt (from the previous trained message's end-of-turn token on),
    and the message's content as the template writes it (verbatim, or without edge whitespace where the
    template trims it, as Llama-3's and Gemma's do). Raises a DataError naming the message when the
    template does not write the conversation as (conversation so far, generation prompt, content)."""
    messages = [dict(m) for m in record.messages]
    try:
        full = _render(tokenizer, messages, False)
    except Exception as e:  # a template may refuse roles or orders (a system message, two user turns)
        raise DataError(record.source, record.index, record.names[0].split("[")[0], "the chat template cannot "
                        f"lay out this conversation: {type(e).__name__}: {e}", "chat_template") from None
    end_text = tokenizer.decode([end_token_id], skip_special_tokens=False)
    turns, cursor = [], 0
    for k in record.trained_messages:
        head, content = _render(tokenizer, messages[:k], True), messages[k]["content"]
        if not full.startswith(content, len(head)):
            content = content.strip()
        if len(head) < cursor or not full.startswith(head) or not content or not full.startswith(content, len(head)):
            raise DataError(record.source, record.index, record.names[k], "the chat template does not write this "
                            "conversation as the messages before this one, the generation prompt, then this "
                            "message's content verbatim (it rewrites earlier turns or the content), so which "
                            "tokens are this message's cannot be told", "chat_template")
        turns.append((full[cursor:len(head)], content))
        after = len(head) + len(content)
        stop = full.find(end_text, after) if end_text else -1
        if stop >= 0 and full[after:stop].strip():
            raise DataError(record.source, record.index, record.names[k], f"the chat template writes "
                            f"{full[after:stop][:40]!r} between this message's content and its end-of-turn token "
                            "(tool calls?): training the content then the end token would not be what the "
                            "template writes", "chat_template")
        # the context goes on after the end-of-turn token (which the content's tokens are followed by)
        cursor = stop + len(end_text) if stop >= 0 else after
    return turns


def _needs_chat(record: SFTRecord) -> DataError:
    roles = ", ".join(m["role"] for m in record.messages)
    return DataError(record.source, record.index, record.names[0].split("[")[0], f"a conversation of "
                     f"{len(record.messages)} messages ({roles}) is laid out by the tokenizer's chat template, "
                     "and this run has none (prompt_format=raw, or a tokenizer without a template): only one user "
                     "message then one assistant message can be read as raw text", "needs_chat_template")


def admit_sft(records: Sequence[PreferenceRecord | SFTRecord], tokenizer, layout: TokenLayout, on_invalid: str,
              report: LoadReport | None = None) -> list[PreferenceRecord | SFTRecord]:
    """The records to encode: every conversation checked against the layout and the chat template first, so
    that a record that cannot be laid out raises (`on_invalid=error`) or is skipped and counted in `report`."""
    keep = []
    for record in records:
        if isinstance(record, SFTRecord) and record.kind == "conversation":
            try:
                if not layout.chat:
                    raise _needs_chat(record)
                conversation_turns(record, tokenizer, layout.end_token_id)
            except DataError as error:
                if on_invalid == "error":
                    raise
                if report is not None:
                    report.skip(error)
                    report.n_kept -= 1
                    report.n_sft -= 1
                continue
        keep.append(record)
    return keep


def _context_ids(text: str, tokenizer) -> list[int]:
    # template text: its special tokens are special (as apply_chat_template(tokenize=True) reads them)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _adds_bos(tokenizer) -> list[int]:
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def _cut(ids: list[int], weights: list[float], budget: int) -> tuple[list[int], list[float]]:
    """At most `budget` tokens. Cut inside a trained message: its first tokens and the end token (as a pair's
    response keeps its end token); cut inside context: up to the last trained token before it."""
    if len(ids) <= budget:
        return ids, weights
    if weights[budget] != 0:
        return ids[: budget - 1] + ids[-1:], weights[: budget - 1] + weights[-1:]
    ids, weights = ids[:budget], weights[:budget]
    while weights and weights[-1] == 0:
        ids, weights = ids[:-1], weights[:-1]
    return ids, weights


def _tokens(record: SFTRecord, tokenizer, layout: TokenLayout) -> tuple[list[int], list[int], list[float]]:
    """(prompt ids, ids after the prompt, their weights) before truncation."""
    if record.kind == "text":
        if tokenizer.eos_token_id is None:
            raise ValueError("a text record ends with EOS, and the tokenizer has none")
        ids = [*_response(record.completion, tokenizer)[0], tokenizer.eos_token_id]
        return _adds_bos(tokenizer), ids, [1.0] * len(ids)
    if record.kind == "prompt_completion":
        ids = [*_response(record.completion, tokenizer)[0], layout.end_token_id]
        return encode_prompt(record.prompt, tokenizer, layout), ids, [1.0] * len(ids)
    if not layout.chat:
        raise _needs_chat(record)
    turns = conversation_turns(record, tokenizer, layout.end_token_id)
    prompt, ids, weights = _context_ids(turns[0][0], tokenizer), [], []
    for k, (context, content) in enumerate(turns):
        before = _context_ids(context, tokenizer) if k else []
        trained = [*_response(content, tokenizer)[0], layout.end_token_id]
        ids += before + trained
        weights += [0.0] * len(before) + [1.0] * len(trained)
    return prompt, ids, weights


def encode_sft_record(record: SFTRecord, tokenizer, enc: EncodeOptions, layout: TokenLayout) -> dict[str, Any]:
    """The columns `encode.encode_record` gives a pair, for an SFT record: `sft_weights` (= `chosen_weights`)
    1 on trained tokens, 0 on context; no rejected response (empty lists), no regions."""
    prompt, ids, weights = _tokens(record, tokenizer, layout)
    if not prompt:  # nothing predicts the first token: it is context
        prompt, ids, weights = ids[:1], ids[1:], weights[1:]
    if len(prompt) + len(ids) > enc.max_length:
        keep = enc.max_prompt_length
        prompt = prompt[-keep:] if enc.truncation_mode == "keep_end" else prompt[:keep]
        ids, weights = _cut(ids, weights, enc.max_length - len(prompt))
    return {"index": record.index, "prompt_ids": prompt, "chosen_ids": ids, "chosen_weights": weights,
            "sft_weights": weights, "chosen_flags": [0] * len(ids), "rejected_ids": [], "rejected_weights": [],
            "rejected_flags": [], "unreached_regions": []}

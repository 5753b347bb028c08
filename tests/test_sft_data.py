"""Stage 1 (`loss=sft`) on TRL's SFT dataset types: text, prompt-completion, messages, conversational
prompt-completion; in every file format; exact label positions on a real tokenizer with a chat template;
malformed rows named; DPO / TDPO and `granular=true` refuse such data."""

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny import llama_style_bos, tiny_llama, tiny_tokenizer

from granular_po.apps.cli import train_main
from granular_po.data.collate import SFTCollator
from granular_po.data.encode import EncodeOptions, build_dataset
from granular_po.data.formats import load_data
from granular_po.data.masks import GranularOptions
from granular_po.data.schema import DataError

SYSTEM = {"role": "system", "content": "Be brief."}
TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello world!"},
         {"role": "user", "content": "What is 7 * 8?"}, {"role": "assistant", "content": "The answer is 56."}]
ROWS = {  # one row of each type, and what trains in it (its assistant / completion texts, in order)
    "text": ({"text": "The sky is blue."}, ["The sky is blue."]),
    "prompt_completion": ({"prompt": "What is 7 * 8?", "completion": " 56."}, [" 56."]),
    "messages": ({"messages": [SYSTEM, *TURNS]}, ["Hello world!", "The answer is 56."]),
    "conversational_prompt_completion": (
        {"prompt": [SYSTEM, *TURNS[:3]], "completion": [TURNS[3]]}, ["The answer is 56."]),
}


def write(rows: list[dict], path, fmt: str):
    """`rows` as a file of format `fmt`; returns the path to give `load_data`."""
    if fmt == "json":
        path = path.with_suffix(".json")
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif fmt == "parquet":
        path = path.with_suffix(".parquet")
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "csv":
        import csv

        path = path.with_suffix(".csv")
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
    elif fmt == "disk":
        from datasets import Dataset

        Dataset.from_list(rows).save_to_disk(str(path))
    return path


# CSV: a conversation is a `messages` column of JSON text; a prompt-completion of message lists has no CSV
# spelling (its cells are text)
FORMATS = [(kind, fmt) for kind in ROWS for fmt in ("json", "jsonl", "parquet", "csv", "disk")
           if (kind, fmt) != ("conversational_prompt_completion", "csv")]


@pytest.mark.parametrize("kind, fmt", FORMATS)
def test_every_sft_type_reads_in_every_format(tmp_path, kind, fmt):
    """The same row read from each file format gives the same record."""
    row, trained = ROWS[kind]
    path = write([row, row], tmp_path / "sft", fmt)
    records, report = load_data(path, sft=True)
    assert (report.n_read, report.n_kept, report.n_skipped) == (2, 2, 0)
    record = records[1]
    assert record.index == 1 and record.regions == ()
    if kind in ("messages", "conversational_prompt_completion"):
        assert record.kind == "conversation"
        assert [record.messages[k]["content"] for k in record.trained_messages] == trained
        assert [m["role"] for m in record.messages] == ["system", "user", "assistant", "user", "assistant"]
    else:
        assert (record.kind, record.completion) == (kind, trained[0])


def encoded_batch(rows: list[dict], tmp_path, tokenizer, **enc):
    path = write(rows, tmp_path / "sft", "jsonl")
    records, _ = load_data(path, sft=True)
    dataset = build_dataset(records, tokenizer, EncodeOptions(**enc), GranularOptions())
    batch = SFTCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    return batch


def trained_ids(batch, row: int) -> list[int]:
    """The token ids at the positions whose label is trained (loss weight of the target > 0)."""
    weights, ids = batch["loss_weights"][row], batch["input_ids"][row]
    return [int(ids[t]) for t in range(1, len(ids)) if weights[t] > 0]


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


@pytest.mark.parametrize("kind", ["messages", "conversational_prompt_completion"])
def test_conversation_trains_exactly_the_assistant_content_and_end_of_turn_tokens(tmp_path, kind):
    """Tiny byte-level tokenizer with a ChatML template: the rows are the template's text up to the last
    assistant message's end of turn, and the trained labels are exactly each trained assistant content's
    tokens followed by <|im_end|>; no token of the system or user turns, nor the template's headers."""
    tokenizer = tiny_tokenizer("byte_level", chat=True)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    row, trained = ROWS[kind]
    batch = encoded_batch([row], tmp_path, tokenizer)
    expected = [t for text in trained for t in (*ids_of(tokenizer, text), end)]
    assert trained_ids(batch, 0) == expected
    full = tokenizer.apply_chat_template([SYSTEM, *TURNS], tokenize=False)
    laid_out = full[: full.rindex("<|im_end|>") + len("<|im_end|>")]
    assert tokenizer.decode(batch["input_ids"][0][: batch["host"]["lengths"][0]]) == laid_out
    # the collator's host-side list of trained targets is the same set of positions
    positions = batch["weighted_positions"][1].tolist()
    assert [int(batch["input_ids"][0][p + 1]) for p in positions] == expected
    if kind == "messages":  # the first assistant turn trains too; the user turn between is context
        assert trained_ids(batch, 0)[: len(ids_of(tokenizer, "Hello world!")) + 1] == [
            *ids_of(tokenizer, "Hello world!"), end]


def test_prompt_completion_and_text_labels(tmp_path):
    """Prompt-completion: the completion and its end token train, the prompt (the template's user turn) not;
    text: every token and EOS, raw even under a chat template (the first token is context when the
    tokenizer adds no BOS: nothing predicts it), every token with a BOS."""
    tokenizer = tiny_tokenizer("byte_level", chat=True)
    end, eos = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id
    batch = encoded_batch([ROWS["prompt_completion"][0], ROWS["text"][0]], tmp_path, tokenizer)
    assert trained_ids(batch, 0) == [*ids_of(tokenizer, " 56."), end]
    assert batch["host"]["prompt_lengths"][0] == len(tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 7 * 8?"}], add_generation_prompt=True, tokenize=True, return_dict=False))
    text = ids_of(tokenizer, "The sky is blue.")
    assert trained_ids(batch, 1) == [*text[1:], eos]
    assert batch["input_ids"][1][: len(text) + 1].tolist() == [*text, eos]

    bos_tokenizer = llama_style_bos(tiny_tokenizer("whitespace_bpe"))
    batch = encoded_batch([ROWS["text"][0]], tmp_path, bos_tokenizer)
    assert batch["input_ids"][0][0] == bos_tokenizer.bos_token_id
    assert trained_ids(batch, 0) == [*ids_of(bos_tokenizer, "The sky is blue."), bos_tokenizer.eos_token_id]


def test_a_single_turn_conversation_is_the_text_pair_and_trains_under_a_raw_prompt(tmp_path):
    """[user, assistant] is read as a prompt-completion pair (as TRL's conversational preference rows are
    read as text), so it encodes as the same ids, and trains under prompt_format=raw too."""
    tokenizer = tiny_tokenizer("byte_level", chat=True)
    pair = {"prompt": "What is 7 * 8?", "completion": "56."}
    chat = {"messages": [{"role": "user", "content": "What is 7 * 8?"}, {"role": "assistant", "content": "56."}]}
    batch = encoded_batch([pair, chat], tmp_path, tokenizer)
    assert batch["input_ids"][0].tolist() == batch["input_ids"][1].tolist()
    assert batch["loss_weights"][0].tolist() == batch["loss_weights"][1].tolist()
    raw = encoded_batch([chat], tmp_path, tokenizer, prompt_format="raw")
    assert trained_ids(raw, 0) == [*ids_of(tokenizer, "56."), tokenizer.eos_token_id]


def test_truncation_keeps_end_tokens_and_never_ends_on_context(tmp_path):
    """A conversation cut inside an assistant message keeps its first tokens and the end token; cut inside a
    user turn, it ends at the last trained token before it (no context trails the sequence)."""
    tokenizer = tiny_tokenizer("byte_level", chat=True)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    row = ROWS["messages"][0]
    full = encoded_batch([row], tmp_path, tokenizer)
    n_prompt, n = full["host"]["prompt_lengths"][0], full["host"]["lengths"][0]
    first = len(ids_of(tokenizer, "Hello world!")) + 1
    # cut inside the user turn after the first assistant message
    cut = encoded_batch([row], tmp_path, tokenizer, max_length=n_prompt + first + 3, max_prompt_length=n_prompt)
    assert cut["host"]["lengths"][0] == n_prompt + first
    assert trained_ids(cut, 0) == [*ids_of(tokenizer, "Hello world!"), end]
    # cut inside the last assistant message: its first tokens, then the end token
    cut = encoded_batch([row], tmp_path, tokenizer, max_length=n - 3, max_prompt_length=n_prompt)
    assert cut["host"]["lengths"][0] == n - 3
    last = ids_of(tokenizer, "The answer is 56.")
    assert trained_ids(cut, 0) == [*ids_of(tokenizer, "Hello world!"), end, *last[:-3], end]


BAD = [  # (row, field, reason code, words of the message)
    ({"messages": [{"role": "user", "content": "Hi"}, {"content": "Hello"}]}, "messages[1].role", "bad_message",
     "a message needs a string 'role': missing"),
    ({"messages": [SYSTEM, {"role": "user", "content": "Hi"}]}, "messages", "no_assistant_turn",
     "has no assistant message (roles 'system', 'user')"),
    ({"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "user", "content": "Hello"}]},
     "completion", "no_assistant_turn", "has no assistant message"),
    ({"messages": "Hi"}, "messages", "bad_message", "must be a non-empty list of messages"),
    ({"completion": "56"}, "prompt", "missing_field", "a 'completion' record needs its 'prompt'"),
    ({"prompt": "Hi", "completion": [{"role": "assistant", "content": "Hello"}]}, "prompt", "bad_type",
     "is a string but 'completion' a list of messages"),
    ({"text": "a", "messages": TURNS}, "messages", "conflicting_fields", "both 'text' and 'messages'"),
    ({"text": "   "}, "text", "empty_response", "is empty or whitespace only"),
    ({"prompt": "Hi", "completion": "Hello", "label": False}, "label", "unpaired_preference", "KTO"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},
     "messages[1].content", "empty_response", "is empty or whitespace only"),
]


@pytest.mark.parametrize("row, field, code, words", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_a_malformed_sft_row_is_named_or_skipped_and_counted(tmp_path, row, field, code, words):
    good = ROWS["messages"][0]
    path = write([good, row, good], tmp_path / "sft", "jsonl")
    with pytest.raises(DataError) as caught:
        load_data(path, sft=True)
    assert str(caught.value).startswith(f"{path}, record 1, field '{field}': ")
    assert words in str(caught.value) and caught.value.code == code
    records, report = load_data(path, on_invalid="skip", sft=True)
    assert [r.index for r in records] == [0, 2]
    assert report.skipped == {code: 1} and report.skipped_indices == {code: [1]}
    assert f"skipped 1 ({code}=1: record 1)" in report.summary()


def test_a_conversation_the_layout_cannot_hold_is_named_or_skipped(tmp_path):
    """A multi-turn conversation under prompt_format=raw, and under a template that rewrites a message's
    content, are named before anything is encoded; under on_invalid=skip, counted. A template that trims
    the content (Llama-3's, Gemma's) trains the content as it writes it."""
    tokenizer = tiny_tokenizer("byte_level", chat=True)
    rows = [ROWS["messages"][0], ROWS["prompt_completion"][0]]
    path = write(rows, tmp_path / "sft", "jsonl")
    records, report = load_data(path, sft=True)
    with pytest.raises(DataError, match=r"record 0, field 'messages': a conversation of 5 messages \(system, "
                       r"user, assistant, user, assistant\) is laid out by the tokenizer's chat template"):
        build_dataset(records, tokenizer, EncodeOptions(prompt_format="raw"), GranularOptions())
    dataset = build_dataset(records, tokenizer, EncodeOptions(prompt_format="raw"), GranularOptions(),
                            on_invalid="skip", report=report)
    assert dataset["index"] == [1] and report.skipped == {"needs_chat_template": 1}
    assert (report.n_kept, report.n_sft) == (1, 1)

    spaced = {"messages": [*TURNS[:3], {"role": "assistant", "content": "56 \n"}]}
    trimming = tiny_tokenizer("byte_level", chat=True)
    trimming.chat_template = trimming.chat_template.replace("message['content']", "message['content'] | trim")
    batch = encoded_batch([spaced], tmp_path, trimming)
    assert trained_ids(batch, 0) == [*ids_of(trimming, "Hello world!"), trimming.convert_tokens_to_ids("<|im_end|>"),
                                     *ids_of(trimming, "56"), trimming.convert_tokens_to_ids("<|im_end|>")]
    shouting = tiny_tokenizer("byte_level", chat=True)
    shouting.chat_template = shouting.chat_template.replace("message['content']", "message['content'] | upper")
    records, _ = load_data(write([spaced], tmp_path / "spaced", "jsonl"), sft=True)
    with pytest.raises(DataError, match=r"record 0, field 'messages\[1\]': the chat template does not write"):
        build_dataset(records, shouting, EncodeOptions(), GranularOptions())
    calling = tiny_tokenizer("byte_level", chat=True)
    calling.chat_template = calling.chat_template.replace(
        "{{ message['content'] }}", "{{ message['content'] }}{% if message['role'] == 'assistant' %} [call]{% endif %}")
    with pytest.raises(DataError, match=r"record 0, field 'messages\[1\]': the chat template writes ' \[call\]' "
                       "between this message's content and its end-of-turn token"):
        build_dataset(records, calling, EncodeOptions(), GranularOptions())


def test_readers_of_pairs_refuse_an_sft_row_naming_it(tmp_path):
    path = write([ROWS["text"][0]], tmp_path / "sft", "jsonl")
    with pytest.raises(DataError, match=r"record 0, field 'text': is a field of an SFT record .* no rejected "
                       r"response, so DPO / TDPO cannot train on it; train it with loss=sft"):
        load_data(path)


# ---------------------------------------------------------------------------------------------------
# train, end to end


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_e2e")
    tokenizer = tiny_tokenizer("byte_level", chat=True)
    tiny_llama(len(tokenizer)).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    return root


def argv(root, data, exp: str, *more: str, eval_data=None) -> list[str]:
    evaluation = [f"custom_eval_path={eval_data}", "do_first_eval=true"] if eval_data else [
        "custom_eval_path=null", "do_first_eval=false"]
    return [f"model.name_or_path={root / 'tiny'}", "datasets=[ours]", f"custom_train_path={data}",
            f"exp_name={exp}", f"local_dirs=[{root / 'runs'}]", "optimizer=AdamW", "lr=1e-3", "warmup_steps=0",
            "batch_size=2", "eval_batch_size=2", "n_examples=4", "max_length=96", "max_prompt_length=64",
            "trainer=BasicTrainer", "sample_during_eval=false", *evaluation, *more]


@pytest.mark.parametrize("kind", list(ROWS))
def test_train_sft_on_each_type_collates_the_assistant_labels(chat_model, tmp_path, monkeypatch, capsys, kind):
    """`train loss=sft` on a file of each type (and the same type as its eval file): two steps, a finite
    loss each, and every collated batch's (training and evaluation) trained labels are exactly its rows'
    trained texts and end tokens."""
    from granular_po.training import recipe

    batches = []

    class Recording(SFTCollator):
        def __call__(self, features):
            batch = super().__call__(features)
            batches.append(batch)
            return batch

    monkeypatch.setattr(recipe, "SFTCollator", Recording)
    row, trained = ROWS[kind]
    data = write([row] * 4, tmp_path / kind, "parquet" if kind != "text" else "csv")
    assert train_main(argv(chat_model, data, f"sft_{kind}", "loss=sft", "granular=false", eval_data=data)) == 0
    tokenizer = tiny_tokenizer("byte_level", chat=True)
    end = tokenizer.eos_token_id if kind == "text" else tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = [t for text in trained for t in (*ids_of(tokenizer, text), end)]
    if kind == "text":
        expected = expected[1:]  # no BOS: the first token is context
    assert len(batches) >= 3  # the first evaluation's, then the two steps'
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            assert trained_ids(batch, i) == expected
    metrics = [json.loads(line) for line in (chat_model / "runs" / f"sft_{kind}" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert math.isfinite(metrics[0]["eval_loss"]) and metrics[0]["step"] == 0
    out = capsys.readouterr().out
    assert f"{data}: read 4 records, kept 4 (4 SFT), 0 regions" in out
    # stage 2 cannot train on the SFT file: the closing block's next command names pairs instead
    next_line = next(line for line in out.splitlines() if line.strip().startswith("next "))
    assert "custom_train_path=PAIRS.jsonl" in next_line and "custom_eval_path=PAIRS_EVAL.jsonl" in next_line
    assert str(data) not in next_line


@pytest.mark.parametrize("loss", ["dpo", "tdpo"])
def test_preference_losses_refuse_an_sft_file(chat_model, tmp_path, capsys, loss):
    data = write([ROWS["messages"][0]] * 2, tmp_path / "sft", "jsonl")
    assert train_main(argv(chat_model, data, f"refused_{loss}", f"loss={loss}", "granular=false")) == 2
    err = capsys.readouterr().err
    assert f"{data}, record 0, field 'messages': is a field of an SFT record" in err and "loss=sft" in err
    assert train_main(argv(chat_model, data, f"refused_{loss}", f"loss={loss}", "granular=false",
                           "on_invalid=skip")) == 2
    err = capsys.readouterr().err
    assert f"{data}: holds no preference pair: 2 records of 2 are SFT records" in err


def test_granular_on_sft_records_is_refused(chat_model, tmp_path, capsys):
    data = write([ROWS["prompt_completion"][0]] * 2, tmp_path / "sft", "jsonl")
    assert train_main(argv(chat_model, data, "granular_sft", "loss=sft", "granular=true")) == 2
    err = capsys.readouterr().err
    assert (f"{data}: granular=true weights tokens by the highlighted regions of preference pairs, but 2 records "
            "of 2 (records 0, 1) are SFT records") in err and "set granular=false" in err


def test_a_renamed_prompt_column_reads_sft_rows_and_errors_name_it(tmp_path):
    path = write([{"question": "Hi", "completion": "Hello"}, {"question": "Hi", "completion": [TURNS[1]]}],
                 tmp_path / "renamed", "jsonl")
    records, report = load_data(path, on_invalid="skip", columns={"prompt": "question"}, sft=True)
    assert (records[0].kind, records[0].prompt, records[0].completion) == ("prompt_completion", "Hi", "Hello")
    assert report.first_errors == [f"{path}, record 1, field 'question': is a string but 'completion' a list of "
                                   "messages: give both as text or both as message lists (TRL's conversational "
                                   "prompt-completion) (line 2)"]

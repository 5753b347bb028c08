"""`granular-po eval`: task accuracy by greedy generation, on the records it can grade, naming the others.

    granular-po eval --model DIR --data eval.jsonl [--n 50] [--out results.json]
    cat eval.parquet | granular-po eval --model DIR --data - --column prompt=question

The grading rules (what a response states, how answers compare) live in `answers.py`; `HELP` below says
them to the user. Demo and compare call `task_accuracy` on (prompt, answer) questions directly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from granular_po.apps.answers import (
    SHORT_RESPONSE_WORDS,
    Answer,
    answer_of_response,
    extract_answer,
    is_correct,
    is_long_form,
    stated_answer,
)
from granular_po.apps.help import add_column_option, column_option

__all__ = ["Question", "data_rows", "extract_answer", "format_prompt", "generate", "load_questions", "main",
           "prompt_batch", "questions_from_pairs", "read_pairs", "run_eval", "task_accuracy"]

# end-of-turn / end-of-text tokens of common models; generation also stops at these when they exist
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
# the correct response's field and its aliases, as the training data reader accepts them
_CORRECT_FIELDS = ("correct_response", "correct", "chosen")
# why a long-form record is not graded (once per record) and what to do instead (once per run)
LONG_FORM_NOTE = "its numbers are no answer key"
LONG_FORM_HINT = (
    "give each an 'answer' field to grade it here, or judge a model on such pairs by the preference metrics "
    "training logs on custom_eval_path (rewards_eval/accuracies, rewards_eval/margins; `granular-po compare` "
    "reports the same)")


def format_prompt(tokenizer: Any, prompt: str, prompt_format: str = "auto") -> str:
    """The generation prompt as text (for display): the chat template with the prompt as the user turn, or
    the raw prompt. Generation itself encodes prompts with `prompt_batch` (training's own ids)."""
    if prompt_format not in ("auto", "chat", "raw"):
        raise ValueError(f"prompt_format must be auto, chat or raw, not {prompt_format!r}")
    use_chat = prompt_format == "chat" or (prompt_format == "auto" and getattr(tokenizer, "chat_template", None))
    if not use_chat:
        return prompt
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end a response: the model's and tokenizer's eos, plus end-of-turn tokens."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += gen_eos if isinstance(gen_eos, list) else [gen_eos]
    ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in _END_OF_TURN if t in vocab]
    return sorted({i for i in ids if i is not None})


@contextlib.contextmanager
def _generation_mode(model: Any, tokenizer: Any):
    """Eval mode and left padding for the duration; both restored after."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # batch generation continues every row from its last token
    try:
        yield
    finally:
        tokenizer.padding_side = side
        model.train(was_training)


def prompt_batch(tokenizer: Any, prompts: Sequence[str], prompt_format: str = "auto") -> Any:
    """The prompts encoded as training encodes them (`data.encode.encode_prompt`: the chat template, or the
    raw text with BOS when the tokenizer adds one), padded on the tokenizer's padding side into one batch."""
    from granular_po.data.encode import EncodeOptions, encode_prompt, resolve_layout

    layout = resolve_layout(tokenizer, EncodeOptions(prompt_format=prompt_format))
    ids = [encode_prompt(p, tokenizer, layout) for p in prompts]
    return tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 32,
             prompt_format: str = "auto") -> list[str]:
    """Greedy completions of one batch of prompts (special tokens stripped; `generate` runs without grad)."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    stop = _stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=pad)
    with _generation_mode(model, tokenizer):
        enc = prompt_batch(tokenizer, prompts, prompt_format).to(device)
        out = model.generate(**enc, generation_config=config)  # (B, T + new)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def task_accuracy(
    model: Any,
    tokenizer: Any,
    questions: Sequence[tuple[str, Answer]],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    prompt_format: str = "auto",
    progress: bool = True,
) -> tuple[float, list[dict]]:
    """(accuracy, per-question dicts) by greedy generation; a question is right when the completion's last
    stated answer matches (`answers.is_correct`). NaN for no question."""
    from tqdm.auto import tqdm

    rows: list[dict] = []
    bar = tqdm(total=len(questions), desc="task accuracy", unit="q", disable=not progress)
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        completions = generate(model, tokenizer, [p for p, _ in batch], max_new_tokens, prompt_format)
        for (prompt, answer), completion in zip(batch, completions):
            predicted = stated_answer(completion, answer)
            rows.append({"prompt": prompt, "answer": answer, "predicted": predicted,
                         "correct": is_correct(predicted, answer), "completion": completion})
        bar.update(len(batch))
    bar.close()
    accuracy = sum(r["correct"] for r in rows) / len(rows) if rows else float("nan")
    return accuracy, rows


# ---------------------------------------------------------------- which records can be graded


@dataclass(frozen=True)
class Question:
    """A gradable record: its index in the file, its prompt and its expected answer."""

    index: int
    prompt: str
    answer: Answer


def question_of(item: Any, index: int) -> Question | str:
    """The record as a question, or why it cannot be graded (one phrase naming the field)."""
    if not isinstance(item, dict):
        return f"not a JSON object but {type(item).__name__}"
    prompt = item.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return "field 'prompt' missing or not a non-empty string"
    if "answer" in item:
        answer = item["answer"]
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            return f"field 'answer' must be a string or a number, not {type(answer).__name__}"
        if isinstance(answer, float) and not math.isfinite(answer):
            return "field 'answer' must be a finite number"
        if isinstance(answer, str) and not answer.strip():
            return "field 'answer' is empty"
        return Question(index, prompt, answer)
    response = next((item[f] for f in _CORRECT_FIELDS if isinstance(item.get(f), str)), None)
    if response is None:
        return "no 'answer' field and no correct_response to read one from"
    if is_long_form(response):
        return (f"no 'answer' field, and its correct_response is long-form ({len(response.split())} words, no "
                f"\"the answer is ...\"): {LONG_FORM_NOTE}")
    answer = answer_of_response(response)
    if answer is None:
        return "no 'answer' field, and its correct_response states no answer (no number, no \"answer is\")"
    return Question(index, prompt, answer)


Columns = Optional[Mapping[str, str]]  # train's columns.* mapping ({"prompt": "question", ...}); None: ours


def data_rows(path: str | os.PathLike, columns: Columns = None) -> Iterator[tuple[int, int | None, Any]]:
    """(index, line or None, row or the DataError reading it raised) of a file in any format `train` reads
    (`formats.iter_data_rows`: the fields `columns` names under our names, chat messages as text, a table's
    null cell absent). A CSV cell is text, so an empty `answer` cell there means no answer (as a missing
    field would in JSON)."""
    from granular_po.data.formats import iter_data_rows, locate

    csv = locate(path).kind == "csv"
    for index, line, item in iter_data_rows(path, columns=columns):
        if csv and isinstance(item, dict) and isinstance(item.get("answer"), str) and not item["answer"].strip():
            item = {k: v for k, v in item.items() if k != "answer"}
        yield index, line, item


def _respelled(reason: str, columns: Columns) -> str:
    """`reason` with our field names as the file spells them (`--column prompt=question`: 'question')."""
    from granular_po.data.rows import COLUMN_KEYS

    for key, name in (columns or {}).items():
        reason = reason.replace(f"'{COLUMN_KEYS[key]}'", f"'{name}'").replace(f" {COLUMN_KEYS[key]} ", f" {name} ")
    return reason


def _data_error(error: Any) -> str:
    """Why a row could not be read, naming its field as the file spells it when the error names one."""
    return f"field '{error.field_name}': {error.reason}" if error.field_name else error.reason


def load_questions(path: str | os.PathLike, columns: Columns = None
                   ) -> tuple[list[Question], list[tuple[int, str]], int]:
    """(questions, [(index, why not gradable)], records read) of a file in any format `train` reads, its
    fields renamed by `columns` (train's `columns.*`).

    Raises DataError (naming the file) when the file is missing, unreadable, empty or not of its format.
    """
    from granular_po.data.schema import DataError

    questions, ungraded, n = [], [], 0
    for index, line, item in data_rows(path, columns):
        n += 1
        where = f" (line {line})" if line is not None else ""
        if isinstance(item, DataError) and f"line {line}" in item.reason:
            where = ""
        found = _data_error(item) if isinstance(item, DataError) else question_of(item, index)
        if isinstance(found, Question):
            questions.append(found)
        else:
            ungraded.append((index, _respelled(found, columns) + where))
    return questions, ungraded, n


def questions_from_pairs(pairs: Sequence[dict]) -> list[tuple[str, Answer]]:
    """(prompt, answer) of each record that can be graded (see `question_of`); the others are left out."""
    found = (question_of(pair, i) for i, pair in enumerate(pairs))
    return [(q.prompt, q.answer) for q in found if isinstance(q, Question)]


def read_pairs(path: str | Path, columns: Columns = None) -> list[dict]:
    """The rows of a file in any format `train` reads, as dicts of text under our names (`data_rows`);
    DataError names a file or row that cannot be read."""
    from granular_po.data.schema import DataError

    items = []
    for _, _, item in data_rows(path, columns):
        if isinstance(item, DataError):
            raise item
        items.append(item)
    return items


def run_eval(
    model: Any,
    tokenizer: Any,
    questions: Sequence[tuple[str, Answer]],
    preference_metrics: Callable[[Any, Any], dict] | None = None,
    **kwargs: Any,
) -> dict:
    """Task accuracy plus, when given, `preference_metrics(model, tokenizer)` (e.g. the trainer's eval metrics)."""
    accuracy, rows = task_accuracy(model, tokenizer, questions, **kwargs)
    result: dict[str, Any] = {"accuracy": accuracy, "n": len(rows), "per_question": rows}
    if preference_metrics is not None:
        result.update(preference_metrics(model, tokenizer))
    return result


# ---------------------------------------------------------------- command line

HELP = f"""\
Task accuracy of a model by greedy generation on the records of a file in any format `train` reads
(JSON list, JSONL, parquet, CSV, a save_to_disk directory[:split], a hub id org/name:split, or - for
stdin; TRL's chat messages read as their text; a table's null or empty "answer" cell is no "answer").
Fields named otherwise are read with --column KEY=NAME, as train's columns.KEY=NAME.

What is graded: each record needs a "prompt" and an expected answer, either its "answer" field (a
string or a number) or, without one, the answer its "correct_response" states (read as below) when
that response is short (at most {SHORT_RESPONSE_WORDS} words) or says "the answer is ...": a long-form
response is no answer key. Records that have neither are not graded: they are counted and named (index
and reason), and a file with nothing to grade is an error (exit status 1).

How a model's output is read: only the LAST STATED ANSWER counts. That is the sentence after the last
"answer is" / "answer:" (for a number: its first number, or, when that opens a worked expression as in
"The answer is 7 * 8 = 56." or "12 times 13, which is 156", the number after the sentence's last "=" /
"is" / "equals", else its last number), or, without such a phrase, the last number in the output
(numeric answers) or its last non-empty line (text answers). An earlier or unrelated number in the
output does not make a question right.

How answers compare: numbers numerically ("1,234" = 1234 = 1234.0; an "answer" string that is a
number counts as one); text after normalising case, whitespace and punctuation ("Paris." = "paris"),
and a stated text that ends with the expected answer counts ("The capital of France is Paris.").

Exit status: 0 graded, 1 invalid data or nothing to grade, 2 bad arguments or a model that cannot load.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="granular-po eval", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="required: a Hugging Face directory (e.g. a run's LATEST), a hub id, or smollm2-135m "
                        "(the embedded default model)")
    p.add_argument("--data", required=True,
                   help="required: records with a prompt and an answer, in any format train reads (JSON, JSONL, "
                        "parquet, CSV, a save_to_disk directory, a hub id org/name:split), or - (stdin)")
    add_column_option(p)
    p.add_argument("--n", type=int, default=None, help="grade only the first N gradable records (default: all)")
    p.add_argument("--out", default=None, help="also write the accuracy, every graded record and the records "
                                               "not graded here (JSON; default: not written)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts generated at once (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation budget per prompt (default: %(default)s)")
    p.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "raw"],
                   help="chat: the tokenizer's chat template with the prompt as the user turn; raw: the "
                        "prompt as is; auto: chat when the tokenizer has a template (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype for generation (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom modelling code from the hub (it runs arbitrary code; default: off)")
    return p


def _check_model_name(model_name: str) -> None:
    """A path that names no directory fails here, before torch loads (a hub id is `name` or `org/name`)."""
    looks_local = model_name.startswith((".", "/", "~")) or model_name.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(model_name)):
        raise FileNotFoundError(f"no model directory {model_name}")


def _load(model_name: str, args: argparse.Namespace):
    """(tokenizer, model), or raise with one line that names the model."""
    from granular_po.models import load_model, load_tokenizer

    _check_model_name(model_name)
    tokenizer = load_tokenizer(os.path.expanduser(model_name), trust_remote_code=args.trust_remote_code)
    model = load_model(os.path.expanduser(model_name), args.dtype, args.trust_remote_code, device=args.device)
    return tokenizer, model


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _not_graded_lines(ungraded: list[tuple[int, str]], total: int, shown: int = 20) -> list[str]:
    lines = [f"not graded: {len(ungraded)} of {_plural(total, 'record')}"]
    lines += [f"  record {index}: {why}" for index, why in ungraded[:shown]]
    if len(ungraded) > shown:
        lines.append(f"  ... and {len(ungraded) - shown} more (all in --out)")
    long_form = sum(LONG_FORM_NOTE in why for _, why in ungraded)
    if long_form:
        lines.append(f"  {_plural(long_form, 'record')} long-form, with no answer key: {LONG_FORM_HINT}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """`granular-po eval`: print the task accuracy of a model on the gradable records of a file."""
    from granular_po.data.schema import DataError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help or a usage error: argparse already printed why
        return int(e.code or 0)
    try:
        columns = column_option(args.column)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # the data first: its errors come in the first second, before any model loads
        questions, ungraded, total = load_questions(args.data, columns)
    except DataError as e:
        print(f"invalid data: {e}", file=sys.stderr)
        return 1
    if not questions:
        print(f"invalid data: {args.data}: nothing to grade ({_plural(total, 'record')} read, none with a prompt "
              "and an answer: an 'answer' field, or a correct_response that states one)", file=sys.stderr)
        for line in _not_graded_lines(ungraded, total, shown=5)[1:]:
            print(line, file=sys.stderr)
        return 1
    graded = questions[: args.n] if args.n is not None else questions
    try:
        _check_model_name(args.model)
        from granular_po.training.console import interactive, quiet_library_bars

        if not interactive():  # a log file: no carriage-return progress bars
            quiet_library_bars()
        tokenizer, model = _load(args.model, args)
    except Exception as e:  # missing model, no network, bad weights: one line, no traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: cannot load model {args.model!r}: {type(e).__name__}: {first}", file=sys.stderr)
        return 2
    result = run_eval(model, tokenizer, [(q.prompt, q.answer) for q in graded],
                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      prompt_format=args.prompt_format, progress=interactive())
    for question, row in zip(graded, result["per_question"]):
        row["index"] = question.index
    correct = sum(r["correct"] for r in result["per_question"])
    print(f"accuracy {result['accuracy']:.3f} ({correct}/{result['n']} graded right; "
          f"{_plural(total, 'record')} read)")
    if ungraded:
        print("\n".join(_not_graded_lines(ungraded, total)))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        not_graded = [{"index": index, "reason": why} for index, why in ungraded]
        Path(args.out).write_text(json.dumps({"model": args.model, "data": args.data, "records": total, **result,
                                              "not_graded": not_graded}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

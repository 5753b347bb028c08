"""Task accuracy by greedy generation: does the model state the right result?

    granular-po eval --model smollm2-135m --data eval.json [--n 50] [--out results.json]

`--data` is a research-format JSON list (or JSONL) of {prompt, correct_response, ...}; the expected
answer of a question is the result its correct response states (`extract_answer`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from granular_po.apps.help import DefaultsFormatter

_INT = r"-?\d+(?:,\d{3})*(?!\d)"  # 1,234 is one number; "56, so" is 56
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*\**\s*(" + _INT + ")", re.IGNORECASE)
_EQUALS = re.compile(r"=\s*\**\s*(" + _INT + ")")
_ANY_INT = re.compile(_INT)
# end-of-turn / end-of-text tokens of common models; generation also stops at these when they exist
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def extract_answer(text: str) -> int | None:
    """The stated result: the number after the last "answer is", else after the last "=", else the last integer.

    None when the text has no integer. Thousands separators are allowed ("1,234" -> 1234).
    """
    for pattern in (_ANSWER_IS, _EQUALS):
        found = pattern.findall(text)
        if found:
            return int(found[-1].replace(",", ""))
    found = _ANY_INT.findall(text)
    return int(found[-1].replace(",", "")) if found else None


def format_prompt(tokenizer: Any, prompt: str, prompt_format: str = "auto") -> str:
    """The generation prompt: the chat template with the prompt as the user turn, or the raw prompt."""
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


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 32,
             prompt_format: str = "auto") -> list[str]:
    """Greedy completions of one batch of prompts (special tokens stripped)."""
    from transformers import GenerationConfig

    texts = [format_prompt(tokenizer, p, prompt_format) for p in prompts]
    device = next(model.parameters()).device
    stop = _stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=pad)
    with _generation_mode(model, tokenizer):
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(**enc, generation_config=config)  # (B, T + new)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def task_accuracy(
    model: Any,
    tokenizer: Any,
    questions: Sequence[tuple[str, int]],
    max_new_tokens: int = 32,
    batch_size: int = 16,
    prompt_format: str = "auto",
    progress: bool = True,
) -> tuple[float, list[dict]]:
    """(accuracy, per-question dicts) by greedy generation; a question is right when its stated result matches."""
    from tqdm.auto import tqdm

    rows: list[dict] = []
    bar = tqdm(total=len(questions), desc="task accuracy", unit="q", disable=not progress)
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        completions = generate(model, tokenizer, [p for p, _ in batch], max_new_tokens, prompt_format)
        for (prompt, answer), completion in zip(batch, completions):
            predicted = extract_answer(completion)
            rows.append({"prompt": prompt, "answer": int(answer), "predicted": predicted,
                         "correct": predicted == int(answer), "completion": completion})
        bar.update(len(batch))
    bar.close()
    accuracy = sum(r["correct"] for r in rows) / len(rows) if rows else float("nan")
    return accuracy, rows


def questions_from_pairs(pairs: Sequence[dict]) -> list[tuple[str, int]]:
    """(prompt, answer) for each pair whose correct response states a result; others are left out."""
    out = []
    for pair in pairs:
        answer = extract_answer(pair.get("correct_response", ""))
        if answer is not None:
            out.append((pair["prompt"], answer))
    return out


def read_pairs(path: str | Path) -> list[dict]:
    """A research-format JSON list, or JSONL, of pair dicts."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run_eval(
    model: Any,
    tokenizer: Any,
    questions: Sequence[tuple[str, int]],
    preference_metrics: Callable[[Any, Any], dict] | None = None,
    **kwargs: Any,
) -> dict:
    """Task accuracy plus, when given, `preference_metrics(model, tokenizer)` (e.g. the trainer's eval metrics)."""
    accuracy, rows = task_accuracy(model, tokenizer, questions, **kwargs)
    result: dict[str, Any] = {"accuracy": accuracy, "n": len(rows), "per_question": rows}
    if preference_metrics is not None:
        result.update(preference_metrics(model, tokenizer))
    return result


def build_parser() -> argparse.ArgumentParser:
    """The options of `granular-po eval`."""
    parser = argparse.ArgumentParser(prog="granular-po eval", description=main.__doc__,
                                     formatter_class=DefaultsFormatter)
    parser.add_argument("--model", required=True, help="HF directory, hub id, or smollm2-135m (the embedded "
                        "default model)")
    parser.add_argument("--data", required=True, help="research-format JSON list or JSONL")
    parser.add_argument("--n", type=int, default=None, help="evaluate on the first N questions (default: all)")
    parser.add_argument("--out", default=None, help="write accuracy and per-question results here (JSON; "
                        "default: print only)")
    parser.add_argument("--batch-size", type=int, default=16, help="questions generated at once")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="greedy generation budget per question")
    parser.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "raw"],
                        help="raw: the question as is; chat: the tokenizer's chat template; auto: chat when it "
                        "has one")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype the model runs in (float16 falls back to float32 on CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow custom modelling code from the hub (it runs arbitrary code)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`granular-po eval`: print the task accuracy of a model on an eval file."""
    from granular_po.models import load_model, load_tokenizer

    args = build_parser().parse_args(argv)

    questions = questions_from_pairs(read_pairs(args.data))[: args.n]
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    model = load_model(args.model, args.dtype, args.trust_remote_code, device=args.device)
    result = run_eval(model, tokenizer, questions, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size, prompt_format=args.prompt_format)
    print(f"accuracy {result['accuracy']:.3f} ({sum(r['correct'] for r in result['per_question'])}/{result['n']})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": args.model, "data": args.data, **result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

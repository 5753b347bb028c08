"""Task accuracy: answer extraction, batched greedy generation on a tiny model, the eval command."""

import json

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer

from granular_po.apps import eval as evaluate
from granular_po.apps.eval import extract_answer, format_prompt, questions_from_pairs, task_accuracy
from granular_po.data.synthetic import generate_pairs, write_json
from granular_po.models import save_model_dir


@pytest.mark.parametrize(
    "text, expected",
    [
        ("7 * 8 = 56. The answer is 56.", 56),
        ("The answer is 56, not 54.", 56),  # "answer is" wins over the last integer
        ("7 * 8 = 56 and 3 more", 56),  # "=" wins over the last integer
        ("First 7 * 8 = 54, wait: 7 * 8 = 56", 56),  # the last "=" counts
        ("The product of 7 and 8 is 56.", 56),
        ("so the answer is **56**", 56),
        ("Answer: 1,234 apples", 1234),
        ("It is -3 degrees", -3),
        ("56, so we are done", 56),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_questions_from_pairs_use_the_stated_result():
    pairs = generate_pairs(20, seed=0)
    questions = questions_from_pairs(pairs + [{"prompt": "Hi", "correct_response": "Hello!"}])
    assert len(questions) == 20
    for (prompt, answer), pair in zip(questions, pairs):
        assert prompt == pair["prompt"]
        a, op, b = prompt.removeprefix("What is ").removesuffix("?").split()
        assert answer == (int(a) * int(b) if op == "*" else int(a) + int(b))


def test_format_prompt_chat_and_raw():
    chat, raw = tiny_tokenizer(chat=True), tiny_tokenizer()
    assert format_prompt(chat, "What is 2 + 3?") == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt(raw, "What is 2 + 3?") == "What is 2 + 3?"
    assert format_prompt(chat, "Q", prompt_format="raw") == "Q"
    with pytest.raises(ValueError):
        format_prompt(chat, "Q", prompt_format="xml")


@pytest.mark.parametrize("chat", [True, False])
def test_task_accuracy_runs_and_batching_does_not_change_answers(chat):
    tok = tiny_tokenizer(chat=chat)
    model = tiny_llama(len(tok)).train()
    questions = questions_from_pairs(generate_pairs(7, seed=1))
    side = tok.padding_side
    acc_1, rows_1 = task_accuracy(model, tok, questions, max_new_tokens=6, batch_size=1, progress=False)
    acc_4, rows_4 = task_accuracy(model, tok, questions, max_new_tokens=6, batch_size=4, progress=False)
    assert model.training and tok.padding_side == side  # restored
    assert 0.0 <= acc_1 <= 1.0 and len(rows_1) == 7
    assert set(rows_1[0]) == {"prompt", "answer", "predicted", "correct", "completion"}
    # left padding: a batched row continues exactly as it would alone
    assert [r["completion"] for r in rows_1] == [r["completion"] for r in rows_4]
    assert acc_1 == acc_4


def test_task_accuracy_counts_right_answers(monkeypatch):
    tok = tiny_tokenizer(chat=True)
    model = tiny_llama(len(tok))
    monkeypatch.setattr(evaluate, "generate", lambda m, t, prompts, *a: ["= 5", "The answer is 7", "no"][: len(prompts)])
    acc, rows = task_accuracy(model, tok, [("a", 5), ("b", 8), ("c", 1)], batch_size=3, progress=False)
    assert acc == pytest.approx(1 / 3)
    assert [r["predicted"] for r in rows] == [5, 7, None]


def test_eval_command(tmp_path, capsys):
    tok = tiny_tokenizer(chat=True)
    model_dir = save_model_dir(tiny_llama(len(tok)), tok, tmp_path / "model")
    data = write_json(tmp_path / "eval.json", generate_pairs(6, seed=0))
    out = tmp_path / "results.json"
    torch.manual_seed(0)
    rc = evaluate.main(["--model", str(model_dir), "--data", str(data), "--n", "4", "--out", str(out),
                        "--max-new-tokens", "4", "--device", "cpu"])
    assert rc == 0
    assert capsys.readouterr().out.startswith("accuracy ")
    result = json.loads(out.read_text())
    assert result["n"] == 4 and len(result["per_question"]) == 4


def test_run_eval_preference_metrics_hook():
    tok = tiny_tokenizer(chat=True)
    model = tiny_llama(len(tok))
    questions = questions_from_pairs(generate_pairs(2, seed=0))
    result = evaluate.run_eval(model, tok, questions, preference_metrics=lambda m, t: {"rewards_eval/accuracies": 0.5},
                               max_new_tokens=2, progress=False)
    assert result["rewards_eval/accuracies"] == 0.5 and result["n"] == 2

"""Task accuracy: what a response states, how answers compare, batched greedy generation on a tiny model,
and the `granular-po eval` command (run in a subprocess: exit status and what it prints)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import llama_style_bos, tiny_llama, tiny_tokenizer

from granular_po.apps import eval as evaluate
from granular_po.apps.answers import is_correct, normalize, stated_answer
from granular_po.apps.eval import extract_answer, format_prompt, questions_from_pairs, task_accuracy
from granular_po.data.synthetic import generate_pairs
from granular_po.models import save_model_dir


@pytest.mark.parametrize(
    "text, expected",
    [
        ("7 * 8 = 56. The answer is 56.", 56),
        ("The answer is 56, not 54.", 56),  # "answer is" wins over the last integer
        ("7 * 8 = 56? No: 7 * 8 is 54.", 54),  # the last stated number, not an earlier "= 56"
        ("First 7 * 8 = 54, wait: 7 * 8 = 56", 56),
        ("The answer is 56. (I checked it 3 ways.)", 56),  # the number after the last "answer is"
        ("Half of 7 is 3.5.", 3.5),
        ("The product of 7 and 8 is 56.", 56),
        ("so the answer is **56**", 56),
        ("Answer: 1,234 apples", 1234),
        ("It is -3 degrees", -3),
        ("56, so we are done", 56),
        ("no numbers here", None),
        ("", None),
        # a worked answer: the result of the expression the answer sentence opens with
        ("The answer is 7 * 8 = 56.", 56),
        ("Answer: 27 + 29 = 56", 56),
        ("So the answer is: 12 times 13, which is 156.", 156),
        ("The answer is 7 * 8, or 56. Check: 7 * 8 = 54", 56),  # no "=" / "is": the sentence's last number
        ("The answer is 54, since 56 is 7 * 8.", 54),  # no expression opens it: its first number
        ("The answer is:\n56", 56),
        ("Answer: 3 - 5 = -2.", -2),
        ("The answer is 7 x 8 = 54. No, the answer is 7 x 8 = 56. 3 ways", 56),  # the last answer sentence
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
    assert len(rows_1) == 7 and set(rows_1[0]) == {"prompt", "answer", "predicted", "correct", "completion"}
    for row, (prompt, answer) in zip(rows_1, questions):  # each row judged by its own completion
        assert (row["prompt"], row["answer"]) == (prompt, answer)
        assert row["predicted"] == extract_answer(row["completion"])
        assert row["correct"] == (row["predicted"] == answer)
    assert acc_1 == sum(r["correct"] for r in rows_1) / 7
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


def test_an_unrelated_or_earlier_number_does_not_make_a_question_right(monkeypatch):
    """Old grading preferred the last "= N": "7 * 8 = 56? No: 7 * 8 is 54." scored 56 as right."""
    tok = tiny_tokenizer(chat=True)
    completions = ["7 * 8 = 56? No: 7 * 8 is 54.", "The answer is 54, since 56 is 7 * 8.",
                   "56 apples. The answer is 54.", "The answer is 56. (I checked it 3 ways.)"]
    monkeypatch.setattr(evaluate, "generate", lambda m, t, prompts, *a: completions[: len(prompts)])
    acc, rows = task_accuracy(tiny_llama(len(tok)), tok, [("q", 56)] * 4, batch_size=4, progress=False)
    assert [r["correct"] for r in rows] == [False, False, False, True] and acc == 0.25


@pytest.mark.parametrize("expected, text, right", [
    ("Paris", "The answer is Paris.", True),
    ("Paris", "paris", True),
    ("Paris", "I think it is Lyon.\nParis!", True),  # the last line
    ("Paris", "Paris? No. The answer is Lyon.", False),  # the last stated answer counts
    ("Canberra", "The capital of Australia is Canberra.", True),  # a sentence ending with the answer
    ("Canberra", "Canberra? No, it is Sydney.", False),
    ("ork", "It is New York.", False),  # whole words only
    ("New York", "Answer:  new   york!", True),
    ("1,234", "the answer is 1234", True),  # a string answer that is a number compares as one
    (1234, "It is 1,234.", True),
    (3.5, "The answer is 3.50", True),
    (0.5, "The answer is 0.55", False),
    ("56", "56 or 57", False),
    ("Paris", "", False),
])
def test_answers_compare_as_documented(expected, text, right):
    assert is_correct(stated_answer(text, expected), expected) is right


def test_normalize_case_whitespace_punctuation():
    assert normalize("  The  Eiffel-Tower!\n") == "the eiffeltower"


def test_records_are_graded_by_answer_field_or_stated_result():
    pairs = [{"prompt": "a", "answer": "Paris"}, {"prompt": "b", "answer": 7},
             {"prompt": "c", "correct_response": "x = 9. The answer is 9."},
             {"prompt": "d", "correct_response": "Hello!"}, {"prompt": "", "answer": 1},
             {"prompt": "f", "answer": [1]}, {"prompt": "g", "answer": True}, "text"]
    assert questions_from_pairs(pairs) == [("a", "Paris"), ("b", 7), ("c", 9)]
    reasons = [evaluate.question_of(p, i) for i, p in enumerate(pairs)][3:]
    assert "states no answer" in reasons[0] and "'prompt'" in reasons[1]
    assert "not list" in reasons[2] and "not bool" in reasons[3] and "not a JSON object" in reasons[4]


def eval_cli(*args: str) -> subprocess.CompletedProcess:
    """`granular-po eval ARGS` in a subprocess."""
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "granular_po.apps.cli", "eval", *args], capture_output=True,
                          text=True, env=env, timeout=300)


MIXED = [
    {"prompt": "What is 7 * 8?", "correct_response": "7 * 8 = 56. The answer is 56.", "incorrect_response": "54"},
    {"prompt": "Capital of France?", "answer": "Paris"},
    {"prompt": "Say hello", "correct_response": "Hello!", "incorrect_response": "Bye."},
    {"prompt": "What is 1000 + 234?", "answer": 1234},
    {"prompt": "", "answer": 3},
]


def test_eval_command_grades_and_names_what_it_cannot(tmp_path):
    tok = tiny_tokenizer(chat=True)
    model_dir = save_model_dir(tiny_llama(len(tok)), tok, tmp_path / "model")
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MIXED) + '{"prompt": "What is 2+2?", "answer": 4\n')
    out = tmp_path / "results.json"
    done = eval_cli("--model", str(model_dir), "--data", str(data), "--out", str(out), "--max-new-tokens", "4",
                    "--device", "cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("accuracy ") and "/3 graded right; 6 records read)" in lines[0]
    assert lines[1] == "not graded: 3 of 6 records"
    assert lines[2].startswith("  record 2: no 'answer' field, and its correct_response states no answer")
    assert lines[3].startswith("  record 4: field 'prompt' missing")
    assert lines[4].startswith("  record 5: invalid JSON on line 6")  # a truncated last line
    assert "\r" not in done.stdout + done.stderr and "Traceback" not in done.stderr
    result = json.loads(out.read_text())
    assert [r["index"] for r in result["per_question"]] == [0, 1, 3]
    assert [r["answer"] for r in result["per_question"]] == [56, "Paris", 1234]
    assert [r["index"] for r in result["not_graded"]] == [2, 4, 5] and result["records"] == 6


def test_eval_command_errors_are_one_line(tmp_path):
    nothing = tmp_path / "nothing.jsonl"
    nothing.write_text(json.dumps({"prompt": "Say hi", "correct_response": "Hi!", "incorrect_response": "Bye"}) + "\n")
    truncated = tmp_path / "truncated.json"
    truncated.write_text('[{"prompt": "a", "answer": 1}, {"prom')
    cases = [
        (nothing, "nothing to grade (1 record read, none with a prompt and an answer"),
        (tmp_path / "missing.jsonl", "missing.jsonl: no such file"),
        (truncated, "truncated.json: invalid JSON at line 1"),
    ]
    for data, message in cases:
        done = eval_cli("--model", "unused", "--data", str(data))
        assert done.returncode == 1, (data, done.stderr)
        assert done.stderr.startswith("invalid data: ") and message in done.stderr.splitlines()[0], done.stderr
        assert "Traceback" not in done.stderr and done.stdout == ""


def test_eval_command_missing_model_is_one_line(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"prompt": "What is 2 + 2?", "answer": 4}) + "\n")
    done = eval_cli("--model", str(tmp_path / "no_model"), "--data", str(data))
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: cannot load model '{tmp_path / 'no_model'}': FileNotFoundError: " \
                                  f"no model directory {tmp_path / 'no_model'}"


def test_eval_help_states_the_grading_rules():
    done = eval_cli("--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for phrase in ('its "answer" field (a string or a number)', "LAST STATED ANSWER counts",
                   "unrelated number in the output does not make a question right", "numbers numerically",
                   "normalising case, whitespace and punctuation", "a file with nothing to grade is an error",
                   "a stated text that ends with the expected answer counts",
                   "counted and named", "(default: 16)"):
        assert phrase in text, phrase
    assert "(default: None)" not in text
    assert "the number after the sentence's last \"=\" / \"is\"" in text


def test_run_eval_preference_metrics_hook():
    tok = tiny_tokenizer(chat=True)
    model = tiny_llama(len(tok))
    questions = questions_from_pairs(generate_pairs(2, seed=0))
    result = evaluate.run_eval(model, tok, questions, preference_metrics=lambda m, t: {"rewards_eval/accuracies": 0.5},
                               max_new_tokens=2, progress=False)
    assert result["rewards_eval/accuracies"] == 0.5 and result["n"] == 2


@pytest.mark.parametrize("chat", [False, True])
def test_generation_encodes_prompts_as_training_does(chat):
    """Eval (and compare's scoring, through `task_accuracy`) must see the prompt ids training saw: with a
    Llama-style `<s> $A` tokenizer the raw prompt starts with BOS, as `encode_record`'s does."""
    import torch

    from granular_po.data.encode import EncodeOptions, encode_record
    from granular_po.data.masks import GranularOptions
    from granular_po.data.schema import PreferenceRecord

    tok = llama_style_bos(tiny_tokenizer(chat=chat))
    prompts = ["What is 7 * 8?", "What is 12 * 13? Say it."]
    trained = [encode_record(PreferenceRecord(p, "56", "54", ()), tok, EncodeOptions(), GranularOptions())["prompt_ids"]
               for p in prompts]
    assert (trained[0][0] == tok.bos_token_id) is not chat  # raw: BOS first, as the tokenizer adds it
    batch = evaluate.prompt_batch(tok, prompts)
    for row, mask, ids in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), trained):
        assert [t for t, m in zip(row, mask) if m] == ids
    model = tiny_llama(len(tok), seed=1, tie_word_embeddings=False)  # untied: tied random weights echo the prompt
    completion = evaluate.generate(model, tok, prompts[:1], max_new_tokens=6)[0]
    with torch.no_grad():
        out = model.generate(torch.tensor([trained[0]]), max_new_tokens=6, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert completion == tok.decode(out[0, len(trained[0]):], skip_special_tokens=True)


LONG_FORM = ("People often ask how far a person can fall and survive. Survival after falling more than 20 feet "
             "depends on the surface, the posture on landing and quick medical care, so there is no single limit.")


def test_a_long_form_correct_response_is_no_answer_key(tmp_path, capsys):
    """Its last number ("falling more than 20 feet" -> 20) is not an answer: the record is not graded,
    counted and named, with a pointer to the `answer` field and to the pair metrics."""
    records = [
        {"prompt": "How far can a person fall?", "correct_response": LONG_FORM, "incorrect_response": "Any height."},
        {"prompt": "How far?", "correct_response": LONG_FORM + " In short, the answer is 20.", "incorrect_response": "5"},
        {"prompt": "What is 7 + 7?", "correct_response": "The sum of 7 and 7 is 14.", "incorrect_response": "15"},
        {"prompt": "How far can a person fall?", "correct_response": LONG_FORM, "answer": 20},
    ]
    assert questions_from_pairs(records) == [("How far?", 20), ("What is 7 + 7?", 14), ("How far can a person fall?", 20)]
    reason = evaluate.question_of(records[0], 0)
    assert isinstance(reason, str) and "long-form" in reason and f"{len(LONG_FORM.split())} words" in reason
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records[:1] * 3))
    assert evaluate.main(["--model", "unused", "--data", str(data)]) == 1
    err = capsys.readouterr().err
    assert "nothing to grade" in err and err.count("long-form") == 4  # three records named, one pointer
    assert "3 records" in err and "'answer' field" in err and "rewards_eval/accuracies" in err


# records as a table holds them: every row every column, null (parquet) or an empty cell (CSV) where absent
TABLE = [
    {"prompt": "What is 7 * 8?", "correct_response": "7 * 8 = 56. The answer is 56.", "incorrect_response": "54",
     "answer": None},
    {"prompt": "Capital of France?", "correct_response": None, "incorrect_response": None, "answer": "Paris"},
    {"prompt": "Say hello", "correct_response": "Hello!", "incorrect_response": "Bye.", "answer": None},
    {"prompt": "What is 1000 + 234?", "correct_response": None, "incorrect_response": None, "answer": "1234"},
]
TABLE_QUESTIONS = [evaluate.Question(0, "What is 7 * 8?", 56), evaluate.Question(1, "Capital of France?", "Paris"),
                   evaluate.Question(3, "What is 1000 + 234?", "1234")]


def test_eval_reads_parquet_csv_and_chat_messages(tmp_path):
    """Issue 23.2: `eval --data` read JSON / JSONL only (a parquet file: "not valid UTF-8 on line 1"). Every
    format train reads is graded the same; a table's null or empty cell is the field absent (record 0 is
    graded by its correct_response, not refused for a null answer); a TRL chat prompt is read as its text."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(TABLE), tmp_path / "q.parquet")
    with open(tmp_path / "q.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(TABLE[0]))
        writer.writerows([list(row.values()) for row in TABLE])  # None is written as an empty cell
    for name in ("q.parquet", "q.csv"):
        questions, ungraded, n = evaluate.load_questions(tmp_path / name)
        assert (questions, n) == (TABLE_QUESTIONS, 4), name
        assert [i for i, _ in ungraded] == [2] and "states no answer" in ungraded[0][1]
    chat = [{"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "answer": 4},
            {"prompt": [{"role": "user", "content": "What is 3 + 3?"}],
             "chosen": [{"role": "assistant", "content": "The answer is 6."}],
             "rejected": [{"role": "assistant", "content": "The answer is 7."}]},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 1?"}],
             "answer": 2}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    questions, ungraded, n = evaluate.load_questions(tmp_path / "chat.jsonl")
    assert questions == [evaluate.Question(0, "What is 2 + 2?", 4), evaluate.Question(1, "What is 3 + 3?", 6)]
    assert [i for i, _ in ungraded] == [2] and "only a prompt of one user message is read" in ungraded[0][1]


def test_eval_command_on_a_csv_file(tmp_path, capsys):
    tok = tiny_tokenizer(chat=True)
    model_dir = save_model_dir(tiny_llama(len(tok)), tok, tmp_path / "model")
    path = tmp_path / "q.csv"
    path.write_text("prompt,answer\nWhat is 7 * 8?,56\nCapital of France?,\n", encoding="utf-8")
    out = tmp_path / "results.json"
    assert evaluate.main(["--model", str(model_dir), "--data", str(path), "--out", str(out), "--max-new-tokens", "2",
                          "--device", "cpu"]) == 0
    assert "/1 graded right; 2 records read)" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [r["answer"] for r in result["per_question"]] == ["56"]
    assert result["not_graded"][0]["index"] == 1 and "no 'answer' field" in result["not_graded"][0]["reason"]

"""Issue 23.4: `granular-po chat` on a model directory, a run directory and a LoRA adapter directory.

The prompt is encoded as training encodes it (`encode_record`'s prompt ids), the reply is the model's
own greedy continuation up to the end-of-response token, and the loop reads messages from stdin.
"""

from __future__ import annotations

import io

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer

from granular_po.apps import chat as chat_cmd
from granular_po.apps.cli import main as cli_main
from granular_po.data.encode import EncodeOptions, encode_record
from granular_po.data.masks import GranularOptions
from granular_po.data.schema import PreferenceRecord

MESSAGE = "What is 7 * 8?"


def save_model(path, chat_template: bool):
    tokenizer = tiny_tokenizer("byte_level", chat=chat_template)
    model = tiny_llama(len(tokenizer), hidden_size=32, seed=1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    save_model(root / "raw", chat_template=False)
    save_model(root / "chat", chat_template=True)
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(len(tiny_tokenizer("byte_level")), hidden_size=32, seed=1)
    torch.manual_seed(3)  # random A and B: the adapter changes the outputs
    adapted = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    adapted.peft_config["default"].base_model_name_or_path = str(root / "raw")
    adapted.save_pretrained(root / "adapter")  # no tokenizer in it: chat takes the base's
    run = root / "run"
    run.mkdir()
    (run / "step-2").symlink_to(root / "chat", target_is_directory=True)
    (run / "LATEST").symlink_to("step-2")
    return root


def greedy(model, tokenizer, ids, stop, n=12) -> str:
    """The reference: HF generate, greedy, from the given prompt ids."""
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


@pytest.mark.parametrize("kind", ["raw", "chat"])
def test_prompt_is_encoded_as_training_encodes_it(dirs, kind):
    tokenizer, model = chat_cmd.load_chat_model(str(dirs / kind), device="cpu")
    chat = chat_cmd.Chat.create(model, tokenizer)
    assert chat.layout.chat is (kind == "chat")
    record = PreferenceRecord(MESSAGE, "56", "54")
    trained = encode_record(record, tokenizer, EncodeOptions(), GranularOptions())
    assert chat.prompt_ids(MESSAGE) == trained["prompt_ids"]
    assert trained["chosen_ids"][-1] in chat.stop_ids()  # stops where training's responses end


@pytest.mark.parametrize("kind", ["raw", "run"])
def test_one_shot_prints_the_greedy_reply(dirs, kind, capsys):
    assert cli_main(["chat", "--model", str(dirs / kind), "--prompt", MESSAGE, "--max-new-tokens", "12",
                     "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    tokenizer, model = chat_cmd.load_chat_model(str(dirs / kind), device="cpu")
    chat = chat_cmd.Chat.create(model, tokenizer)
    expected = greedy(model, tokenizer, chat.prompt_ids(MESSAGE), chat.stop_ids())
    assert printed == expected + "\n" and expected  # some tokens before the end token


def test_a_lora_adapter_directory_loads_on_its_base(dirs, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert chat_cmd.main(["--model", str(dirs / "adapter"), "--prompt", MESSAGE, "--max-new-tokens", "12",
                          "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    tokenizer = tiny_tokenizer("byte_level")
    base = AutoModelForCausalLM.from_pretrained(dirs / "raw")
    adapted = PeftModel.from_pretrained(base, dirs / "adapter").eval()
    chat = chat_cmd.Chat.create(adapted, tokenizer)
    expected = greedy(adapted, tokenizer, chat.prompt_ids(MESSAGE), chat.stop_ids())
    with adapted.disable_adapter():
        plain = greedy(adapted, tokenizer, chat.prompt_ids(MESSAGE), chat.stop_ids())
    assert printed == expected + "\n" and expected != plain  # the adapter's reply, not the base's


def test_interactive_loop_reads_stdin_keeps_the_conversation_and_resets(dirs, monkeypatch, capsys):
    tokenizer, model = chat_cmd.load_chat_model(str(dirs / "chat"), device="cpu")
    chat = chat_cmd.Chat.create(model, tokenizer, max_new_tokens=6)
    opening = chat.prompt_ids("hello")
    first = chat.reply("hello")
    second_ids = chat.prompt_ids("again")  # the conversation so far, then the new turn
    fresh = chat_cmd.Chat.create(model, tokenizer).prompt_ids("again")
    assert second_ids[:len(opening)] == opening and second_ids[-len(fresh):] == fresh
    assert len(second_ids) > len(opening) + len(fresh)  # the reply sits between them
    chat.reset()
    assert chat.prompt_ids("again") == fresh

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nagain\n/reset\n\nhello\n/quit\nnever read\n"))
    assert cli_main(["chat", "--model", str(dirs / "chat"), "--max-new-tokens", "6", "--device", "cpu"]) == 0
    header, printed = capsys.readouterr().out.split("\n", 1)
    assert header.startswith("chat (conversation kept)")
    second = chat_cmd.Chat.create(model, tokenizer, max_new_tokens=6)
    second.reply("hello")
    assert printed == "\n".join([first, second.reply("again"), "(conversation cleared)", first]) + "\n"


def test_sampling_is_seeded_and_differs_from_greedy(dirs, capsys):
    argv = ["--model", str(dirs / "raw"), "--prompt", MESSAGE, "--max-new-tokens", "16", "--device", "cpu"]
    outs = []
    for extra in ([], ["--temperature", "5", "--top-p", "0.95"], ["--temperature", "5", "--top-p", "0.95"],
                  ["--temperature", "5", "--top-p", "0.95", "--seed", "1"]):
        assert chat_cmd.main(argv + extra) == 0
        outs.append(capsys.readouterr().out)
    greedy_out, sampled, again, other_seed = outs
    assert sampled == again and sampled != greedy_out and sampled != other_seed


def test_bad_arguments_and_a_missing_model_are_one_line(tmp_path, capsys):
    assert chat_cmd.main(["--model", str(tmp_path / "none"), "--prompt", "x"]) == 2
    assert "cannot load model" in capsys.readouterr().err
    assert chat_cmd.main(["--model", str(tmp_path), "--prompt", "x", "--top-p", "0"]) == 2
    assert "--top-p=0.0 is out of range" in capsys.readouterr().err


def test_a_run_directory_resolves_to_merged_then_latest(dirs, tmp_path):
    lora_run = tmp_path / "lora_run"
    lora_run.mkdir()
    (lora_run / "step-4").symlink_to(dirs / "adapter", target_is_directory=True)
    (lora_run / "LATEST").symlink_to("step-4")
    assert chat_cmd.resolve_model_dir(str(lora_run)) == str(lora_run / "LATEST")  # the adapter
    (lora_run / "merged").symlink_to(dirs / "raw", target_is_directory=True)
    assert chat_cmd.resolve_model_dir(str(lora_run)) == str(lora_run / "merged")  # no peft needed
    assert chat_cmd.resolve_model_dir(str(dirs / "run")) == str(dirs / "run" / "LATEST")
    assert chat_cmd.resolve_model_dir("org/name") == "org/name"  # a hub id, as given

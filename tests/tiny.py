"""Tiny real components for tests and benchmarks: tokenizers trained in-process, random models.

Nothing here touches the network. The tokenizers are real `tokenizers` models (BPE with a
whitespace pre-tokenizer and a byte-level BPE like GPT-2/SmolLM2), wrapped as fast HF tokenizers so
offset mappings and chat templates behave as they do for real models.
"""

from __future__ import annotations

import functools

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

_CORPUS = [
    "What is 7 * 8? The answer is 56.",
    "What is 12 * 13? 12 times 13 equals 156, so the result is 156.",
    "The capital of France is Paris. The capital of Spain is Madrid.",
    "Hello world! This is a tiny corpus for a tiny tokenizer, with numbers 0 1 2 3 4 5 6 7 8 9.",
    "def add(a, b):\n    return a + b\n",
    "Unicode: café naïve 東京 😀 — quotes “like this”.",
    "The quick brown fox jumps over the lazy dog. Correct answers matter; wrong ones do not.",
] * 4

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def _wrap(tok, chat: bool) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token=None,
        pad_token="<pad>",
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


@functools.lru_cache(maxsize=None)
def _train_bpe(byte_level: bool, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if byte_level:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.BPEDecoder()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*SPECIAL_TOKENS, "[UNK]"])
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(kind: str = "byte_level", chat: bool = False, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A fast tokenizer trained in-process. kind: 'byte_level' (GPT-2 style) or 'whitespace_bpe'."""
    from tokenizers import Tokenizer

    if kind not in ("byte_level", "whitespace_bpe"):
        raise ValueError(f"unknown tiny tokenizer kind {kind!r}")
    tok = Tokenizer.from_str(_train_bpe(kind == "byte_level", vocab_size))
    return _wrap(tok, chat)


TINY_TOKENIZER_KINDS = ("byte_level", "whitespace_bpe")


def llama_style_bos(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """`tok` made to add BOS as Llama-2 and Mistral base tokenizers do: a `<s>` token and a `<s> $A`
    TemplateProcessing post-processor, so `tok(text)` starts with `<s>` and `add_special_tokens=False` drops it."""
    from tokenizers import processors

    tok.add_special_tokens({"bos_token": "<s>"})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    return tok


def tiny_llama(vocab_size: int, hidden_size: int = 32, layers: int = 2, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random Llama small enough for unit tests (milliseconds per step on CPU)."""
    import torch

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=overrides.pop("tie_word_embeddings", True),
        attention_dropout=0.0,
        **overrides,
    )
    model = LlamaForCausalLM(config)
    return model


TOY_WORDS = ["apple", "river", "stone", "cloud", "green", "music", "paper", "light", "sugar", "window"]


def toy_preference_pairs(n: int, filler_cycle: int = 4) -> list[dict]:
    """`n` records in the input format: pairs of different lengths (so batches pad), the word "no" of
    each rejected response highlighted (flag -1), "yes" in the chosen one."""
    pairs = []
    for i in range(n):
        word = TOY_WORDS[i % len(TOY_WORDS)]
        filler = " and so on" * (i % filler_cycle)
        incorrect = f"About {word}{filler}: the answer is no."
        start = incorrect.index("no.")
        pairs.append({"prompt": f"Is {word} number {i} good?",
                      "correct_response": f"About {word}{filler}: the answer is yes.",
                      "incorrect_response": incorrect, "masked_region": [start, start + 2, -1]})
    return pairs


def _pair(prompt: str, good: str, bad: str, good_span: str | None, bad_span: str | None) -> dict:
    regions = [[good.index(good_span), good.index(good_span) + len(good_span), 1]] if good_span else []
    regions += [[bad.index(bad_span), bad.index(bad_span) + len(bad_span), -1]] if bad_span else []
    return {"prompt": prompt, "correct_response": good, "incorrect_response": bad, "masked_regions": regions}


def mixed_preference_pairs() -> list[dict]:
    """Four records whose highlights weigh the two sides differently: regions on both sides, on the
    incorrect side only, on the correct side only."""
    return [
        _pair("What is 7 * 8?", "7 * 8 = 56. The answer is 56.", "7 * 8 = 54. The answer is 54.", "56", "54"),
        _pair("Capital of France?", "The capital of France is Paris.",
              "The capital of France is Madrid, in Spain.", None, "Madrid, in Spain"),
        _pair("Say hello.", "Hello world! This is a tiny corpus.",
              "Hello! quick brown fox jumps over the lazy dog.", "tiny corpus", None),
        _pair("Is it good?", "The quick brown fox: yes.", "The lazy dog: no.", "quick brown fox", "lazy dog"),
    ]


def tiny_workspace(root, pairs: list[dict], *, hidden_size: int = 32, **files: list[dict]):
    """`root/tiny` (a random tiny Llama with the byte-level tokenizer, saved as a model directory) and
    `root/train.json` holding `pairs` (plus `root/<name>.json` for each keyword); returns `root`."""
    import json

    tokenizer = tiny_tokenizer("byte_level")
    tiny_llama(len(tokenizer), hidden_size=hidden_size).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    for name, records in {"train": pairs, **files}.items():
        (root / f"{name}.json").write_text(json.dumps(records))
    return root

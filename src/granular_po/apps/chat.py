"""`granular-po chat --model DIR`: talk to a model, as it was trained to be prompted.

    granular-po chat --model .cache/runs/sft_tdpo/LATEST                 # interactive, greedy
    granular-po chat --model RUN_DIR --prompt "What is 7 * 8?"            # one shot
    granular-po chat --model ADAPTER_DIR --temperature 0.7 --top-p 0.9    # sampled

`--model` is a Hugging Face directory (a run's `LATEST` or `step-N`), a run directory (its `merged/`,
else its `LATEST`), a LoRA adapter directory (loaded on its base with peft; the base's tokenizer when
the adapter has none), a hub id, or `smollm2-135m`. Prompts are encoded exactly as training encoded
them (`data/encode.py`): the tokenizer's chat template with the message as the user turn, or the raw
text (with BOS where the tokenizer adds one) when it has none or `--prompt-format raw`. In a chat
template the conversation is kept (`/reset` clears it); raw prompts are one turn each, as trained.
Generation stops at the end-of-response token training appended (the template's end of turn, or EOS).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from granular_po.apps.help import DefaultsFormatter
from granular_po.data.encode import PROMPT_FORMATS, EncodeOptions, TokenLayout, encode_prompt, resolve_layout

COMMANDS_HELP = "/reset clears the conversation, /quit (or end of input) leaves"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="granular-po chat", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--model", required=True, help="required: a model directory (a run's LATEST, merged/ or a "
                   "run directory), a LoRA adapter directory, a hub id, or smollm2-135m")
    p.add_argument("--prompt", default=None, help="one message: print the reply and exit (default: interactive, "
                   f"reading messages from standard input; {COMMANDS_HELP})")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto",
                   help="chat: the tokenizer's chat template; raw: the text as is; auto: chat when the "
                        "tokenizer has a template (as training's prompt_format)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated per reply at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default); above 0: sampled")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                   "whose probability reaches this (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype for generation")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow custom modelling code from the hub (it runs arbitrary code)")
    return p


def resolve_model_dir(name: str) -> str:
    """A run directory's `merged/` (LoRA with merge_on_save), else its `LATEST`; anything else as given."""
    path = Path(os.path.expanduser(name))
    if path.is_dir() and not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        for inner in ("merged", "LATEST"):
            if (path / inner / "config.json").is_file() or (path / inner / "adapter_config.json").is_file():
                return str(path / inner)
    return str(path) if path.exists() else name


def _has_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))


def load_chat_model(name: str, dtype: str = "float32", device: str | None = None, trust_remote_code: bool = False):
    """(tokenizer, model) of `name`: see the module docstring for what it may be."""
    from granular_po.models import load_model, load_tokenizer

    path = resolve_model_dir(name)
    tokenizer_path = path
    if os.path.isfile(os.path.join(path, "adapter_config.json")) and not _has_tokenizer(path):
        from peft import PeftConfig

        tokenizer_path = PeftConfig.from_pretrained(path).base_model_name_or_path  # the adapter's base
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
    model = load_model(path, dtype, trust_remote_code, device=device)
    model.eval()
    return tokenizer, model


@dataclass
class Chat:
    """One conversation with a model: `reply(message)` generates the answer to the next user turn."""

    model: Any
    tokenizer: Any
    layout: TokenLayout
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    messages: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def create(cls, model, tokenizer, prompt_format: str = "auto", **options) -> Chat:
        return cls(model, tokenizer, resolve_layout(tokenizer, EncodeOptions(prompt_format=prompt_format)), **options)

    def prompt_ids(self, message: str) -> list[int]:
        """The ids the model continues for `message`: training's prompt encoding (`encode.encode_prompt`) for
        a first turn; in a chat template, the whole conversation so far with the message as the last turn."""
        if not self.layout.chat or not self.messages:
            return encode_prompt(message, self.tokenizer, self.layout)
        out = self.tokenizer.apply_chat_template([*self.messages, {"role": "user", "content": message}],
                                                 add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(out["input_ids"] if isinstance(out, dict) else out)

    def stop_ids(self) -> list[int]:
        """The end-of-response token training appended, and the model's own EOS ids."""
        ids = [self.layout.end_token_id, self.tokenizer.eos_token_id]
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids += configured if isinstance(configured, list) else [configured]
        return sorted({i for i in ids if i is not None})

    def generation_config(self):
        from transformers import GenerationConfig

        stop = self.stop_ids()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else stop[0]
        if self.temperature > 0:
            return GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=True, temperature=self.temperature,
                                    top_p=self.top_p, top_k=0, eos_token_id=stop, pad_token_id=pad)
        return GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False, eos_token_id=stop,
                                pad_token_id=pad)

    def reply(self, message: str) -> str:
        """Generate the reply to `message` (kept in the conversation when the layout is chat)."""
        import torch

        ids = self.prompt_ids(message)
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([ids], device=device)  # (1, T)
        if self.temperature > 0:
            torch.manual_seed(self.seed + len(self.messages))  # reproducible: the same turn, the same sample
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      generation_config=self.generation_config())  # (1, T + new)
        text = self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        if self.layout.chat:
            self.messages += [{"role": "user", "content": message}, {"role": "assistant", "content": text}]
        return text

    def reset(self) -> None:
        self.messages.clear()


def interactive(chat: Chat, lines=None, out=None) -> int:
    """Read messages (one a line; default stdin) until /quit or the end of input; print each reply."""
    lines = lines if lines is not None else sys.stdin
    out = out if out is not None else sys.stdout
    tty = hasattr(lines, "isatty") and lines.isatty()
    mode = "conversation kept" if chat.layout.chat else "raw prompts: each message on its own"
    print(f"chat ({mode}); {COMMANDS_HELP}", file=out, flush=True)
    while True:
        if tty:
            print("> ", end="", file=out, flush=True)
        line = lines.readline()
        if not line:  # end of input
            return 0
        message = line.rstrip("\n")
        if message.strip() in ("/quit", "/exit"):
            return 0
        if message.strip() == "/reset":
            chat.reset()
            print("(conversation cleared)", file=out, flush=True)
            continue
        if not message.strip():
            continue
        print(chat.reply(message), file=out, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0, or 2 for bad arguments or a model that cannot load."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help or a usage error: argparse already printed why
        return int(e.code or 0)
    for name, ok in (("--max-new-tokens", args.max_new_tokens >= 1), ("--temperature", args.temperature >= 0),
                     ("--top-p", 0 < args.top_p <= 1)):
        if not ok:
            print(f"error: {name}={getattr(args, name[2:].replace('-', '_'))} is out of range "
                  "(max-new-tokens >= 1, temperature >= 0, 0 < top-p <= 1)", file=sys.stderr)
            return 2
    try:
        tokenizer, model = load_chat_model(args.model, args.dtype, args.device, args.trust_remote_code)
        chat = Chat.create(model, tokenizer, args.prompt_format, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    except Exception as e:  # missing model, no network, bad weights, no template: one line, no traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: cannot load model {args.model!r}: {type(e).__name__}: {first}", file=sys.stderr)
        return 2
    if args.prompt is not None:
        print(chat.reply(args.prompt), flush=True)
        return 0
    return interactive(chat)


if __name__ == "__main__":
    raise SystemExit(main())

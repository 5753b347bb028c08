"""What `granular-po compare` measures on the test pairs, per run: one model load, per-item values.

Every metric is a list over the test items (pairs or questions) so that arms can be paired item by item:

- `preference_accuracy`: the pair's sequence-level log-ratio margin
  [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)] > 0, summed over every response token and
  the end token, whatever the arm's own token weights (the same definition for every arm; ref = the SFT
  model every run starts from); `sequence_margin` is that margin itself;
- `highlight_logratio`: the mean over the rejected response's highlighted tokens (regions flagged -1) of
  log pi - log ref (None for a pair without one): how far the run pushed the marked error down;
- synthetic tasks: `forced_margin` = log p(right result) - log p(the generator's wrong result), both
  teacher-forced after the prompt and the correct response's own text up to its first stated result
  (`forced_item`), and `forced_accuracy` (margin > 0); `worked_step`: the greedy answer keeps the worked
  step (`synthetic.keeps_worked_step`);
- `accuracy`: greedy task accuracy with `eval`'s rules (records that carry an answer; the synthetic
  tasks read it from the correct response, as today); `rouge_l`: ROUGE-L F1 (the `rouge-score` package)
  of the greedy answer against the correct response, when asked for.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_QUESTION = re.compile(r"What is (\d+) ([*+]) (\d+)\?")


def forced_item(pair: dict) -> dict | None:
    """The forced-decoding probe of one synthetic pair: prompt, the correct response's text before its first
    stated right result (`prefix`), the right and the wrong result (the wrong one as the generator wrote
    it in the incorrect response), and `end`, the character after the result (so that a shorter number
    pays for ending there). None when the pair states no right result."""
    from granular_po.apps.answers import extract_answer

    right, wrong = extract_answer(pair["correct_response"]), extract_answer(pair["incorrect_response"])
    found = re.search(rf"(?<!\d){right}(?!\d)", pair["correct_response"]) if right is not None else None
    if found is None or wrong is None or wrong == right:
        return None
    text = pair["correct_response"]
    return {"prompt": pair["prompt"], "prefix": text[:found.start()], "right": str(right), "wrong": str(wrong),
            "end": text[found.end():found.end() + 1]}


def worked_steps(prompts: Sequence[str], completions: Sequence[str]) -> list[bool | None]:
    """Per greedy answer, whether it keeps the worked step (None where the prompt is no synthetic question)."""
    from granular_po.data.synthetic import Question, keeps_worked_step

    out: list[bool | None] = []
    for prompt, completion in zip(prompts, completions):
        m = _QUESTION.fullmatch(prompt.strip())
        out.append(keeps_worked_step(completion, Question(int(m[1]), m[2], int(m[3]))) if m else None)
    return out


def response_logps(model: Any, rows: Sequence[tuple[list[int], list[int]]], batch_size: int = 8) -> list[list[float]]:
    """log p of each response token given the prompt and the tokens before it: rows of (prompt ids,
    response ids), right-padded in batches (a causal model reads no padding before a real token)."""
    import torch

    device = next(model.parameters()).device
    out: list[list[float]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
            seqs = [p + r for p, r in batch]
            width = max(len(s) for s in seqs)
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            mask = torch.zeros(len(seqs), width, dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            with torch.no_grad():
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # (B, T, V)
            logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None].to(device))[..., 0]  # (B, T-1)
            for i, (p, r) in enumerate(batch):
                out.append(logps[i, len(p) - 1:len(p) - 1 + len(r)].tolist())
    finally:
        model.train(was_training)
    return out


def encode_pairs(records: Sequence, tokenizer: Any, max_length: int, max_prompt_length: int) -> list[dict]:
    """The training encoding of each pair (prompt format, truncation, end token), granular weights off."""
    from granular_po.data.encode import EncodeOptions, encode_record, resolve_layout
    from granular_po.data.masks import GranularOptions

    enc = EncodeOptions(max_length=max_length, max_prompt_length=max_prompt_length)
    layout = resolve_layout(tokenizer, enc)
    return [encode_record(r, tokenizer, enc, GranularOptions(), layout) for r in records]


def shares_prefix(model: Any, rows: Sequence[tuple[list[int], list[int], list[int]]]) -> bool:
    """Whether `model` scores (shared ids, tail, tail) rows exactly with the prefix read once
    (`forward.prompt_sharing.shared_prefix_conflict`, checked on the model); else say why, once per call."""
    from granular_po.forward.prompt_sharing import shared_prefix_conflict

    longest = max((len(s) + max(len(a), len(b)) for s, a, b in rows), default=0)
    why_not = shared_prefix_conflict(model, longest)
    if why_not is not None:
        logger.info("scoring: one forward per side (%s)", why_not)
    return why_not is None


def paired_tail_logps(model: Any, rows: Sequence[tuple[list[int], list[int], list[int]]], batch_size: int = 8,
                      shared: bool | None = None) -> tuple[list[list[float]], list[list[float]]]:
    """log p of each token of both continuations of (shared ids, tail a, tail b) rows: the shared ids read once
    (`shared`: True, the default where `shares_prefix`), or one padded forward per side (`response_logps`, the
    reference path). Both give the same numbers (tests/test_compare_scoring.py)."""
    from granular_po.forward.prompt_sharing import tail_logps

    if shared is None:
        shared = shares_prefix(model, rows)
    if shared:
        pairs = tail_logps(model, list(rows), batch_size)
        return [a for a, _ in pairs], [b for _, b in pairs]
    return (response_logps(model, [(s, a) for s, a, _ in rows], batch_size),
            response_logps(model, [(s, b) for s, _, b in rows], batch_size))


def sequence_logps(model: Any, encoded: Sequence[dict], batch_size: int = 8,
                   shared: bool | None = None) -> dict[str, list[list[float]]]:
    """Per pair, the token log-probs of the chosen and the rejected response (end token included), the prompt
    read once where exact (`paired_tail_logps`)."""
    chosen, rejected = paired_tail_logps(model, [(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in encoded],
                                         batch_size, shared)
    return {"chosen": chosen, "rejected": rejected}


def preference_metrics(policy: dict, reference: dict, encoded: Sequence[dict]) -> dict[str, list]:
    """Per pair: sequence-level log-ratio margin, whether it is > 0, and the highlighted-token log-ratio of
    the rejected response (mean over its tokens flagged -1; None without one)."""
    margins, highlight = [], []
    for i, e in enumerate(encoded):
        ratio = {side: [a - b for a, b in zip(policy[side][i], reference[side][i])] for side in ("chosen", "rejected")}
        margins.append(sum(ratio["chosen"]) - sum(ratio["rejected"]))
        marked = [r for r, flag in zip(ratio["rejected"], e["rejected_flags"]) if flag == -1]
        highlight.append(sum(marked) / len(marked) if marked else None)
    return {"sequence_margin": margins, "preference_accuracy": [float(m > 0) for m in margins],
            "highlight_logratio": highlight}


def forced_margins(model: Any, tokenizer: Any, items: Sequence[dict], batch_size: int = 8,
                   shared: bool | None = None) -> list[float]:
    """log p(right + end) - log p(wrong + end) after prompt and prefix, from the first token where the two
    continuations differ; the end-of-response token is not counted. The prompt and the prefix's tokens before
    that first difference are read once for both sides (`paired_tail_logps`; `shared=False`: one forward per
    side, the reference path)."""
    from granular_po.data.records import make_record

    records = [make_record(it["prompt"], it["prefix"] + it["right"] + it["end"], it["prefix"] + it["wrong"] + it["end"],
                           "forced", i) for i, it in enumerate(items)]
    rows = []
    for e in encode_pairs(records, tokenizer, max_length=10_000, max_prompt_length=5_000):
        right, wrong = e["chosen_ids"][:-1], e["rejected_ids"][:-1]  # without the end-of-response token
        k = next(j for j in range(min(len(right), len(wrong)) + 1)
                 if j == min(len(right), len(wrong)) or right[j] != wrong[j])
        rows.append((e["prompt_ids"] + right[:k], right[k:], wrong[k:]))
    right_logps, wrong_logps = paired_tail_logps(model, rows, batch_size, shared)
    return [sum(r) - sum(w) for r, w in zip(right_logps, wrong_logps)]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 of each prediction against its reference (rouge-score, with stemming)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as error:  # pragma: no cover - a declared dependency
        raise SystemExit("--rouge needs the rouge-score package: pip install 'rouge-score>=0.1.2'") from error
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def load_model_pair(model_dir: Path):
    from granular_po.models import load_model, load_tokenizer

    return load_tokenizer(str(model_dir)), load_model(str(model_dir))


def mean_of(values: Sequence) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def read_cache(path: Path) -> dict:
    """A cache file's JSON; {} (recomputed, never trusted) when it cannot be read whole."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        print(f"{path}: unreadable, recomputed", flush=True)
        return {}
    return stored if isinstance(stored, dict) else {}


def write_cache(path: Path, value: dict) -> None:
    """Written beside and renamed into place: a kill leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


SCORES_VERSION = 1  # raise when a metric's definition changes: cached SFT test scores are then recomputed


class TestScorer:
    """Scores one model directory on the test pairs: the reference (SFT) side computed once and cached,
    then per run one model load for every metric above (greedy answers passed in or generated here).

    Built on the validation pairs too (`--choose-on preference`), where only `preference` is called: the
    learning rate is then chosen on the same preference accuracy that is reported on test."""

    def __init__(self, test_path: Path, sft: Path, cache: Path, max_length: int, max_prompt_length: int,
                 synthetic: bool, rouge: bool, max_new_tokens: int, batch_size: int):
        from granular_po.apps.eval import read_pairs
        from granular_po.data.formats import load_data

        self.pairs = read_pairs(test_path)
        self.records, _ = load_data(test_path)  # as training reads it; on_invalid=error: a bad record names itself
        self.sft, self.cache, self.synthetic, self.rouge = sft, cache, synthetic, rouge
        self.lengths = (max_length, max_prompt_length)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.forced = [it for it in (forced_item(p) for p in self.pairs) if it is not None] if synthetic else []
        self._reference: dict | None = None
        self.scorings = 0  # model directories scored by this scorer (`score`), cached baselines not counted

    def reference(self) -> dict:
        """The SFT model's token log-probs of every test pair, cached in `cache` (keyed by weights and data)."""

        from granular_po.apps.stages import checkpoint_key

        key = {"model": checkpoint_key(self.sft), "pairs": len(self.pairs), "lengths": list(self.lengths),
               "data": [[r.prompt, r.chosen, r.rejected] for r in self.records]}
        if self._reference is None and self.cache.is_file():
            stored = read_cache(self.cache)
            if stored.get("key") == json.loads(json.dumps(key)):
                self._reference = stored["logps"]
        if self._reference is None:
            tokenizer, model = load_model_pair(self.sft)
            self._reference = sequence_logps(model, self._encode(tokenizer), self.batch_size)
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            write_cache(self.cache, {"key": key, "logps": self._reference})
        return self._reference

    def baseline(self, completions: Sequence[str] | None, cache: Path) -> dict[str, list]:
        """`score(self.sft, completions)`, cached in `cache` (JSON) so that a resumed comparison does not score
        the SFT model again. Keyed by the SFT weights (`checkpoint_key`), the test data, every scoring
        setting, the completions and `SCORES_VERSION`: a cache whose key differs is said and recomputed."""
        import hashlib

        from granular_po.apps.stages import checkpoint_key

        def digest(value) -> str:
            return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()

        key = {"version": SCORES_VERSION, "model": checkpoint_key(self.sft),
               "data": digest([self.pairs, [repr(r) for r in self.records]]), "lengths": list(self.lengths),
               "synthetic": self.synthetic, "rouge": self.rouge, "max_new_tokens": self.max_new_tokens,
               "batch_size": self.batch_size, "completions": None if completions is None else digest(list(completions))}
        if cache.is_file():
            stored = read_cache(cache)
            if stored.get("key") == key:
                print(f"test scores of the SFT model: cached in {cache}", flush=True)
                return stored["items"]
            changed = sorted(k for k in key if stored.get("key", {}).get(k) != key[k])
            print(f"test scores of the SFT model: recomputed ({', '.join(changed)} changed since {cache})", flush=True)
        items = self.score(self.sft, completions)
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_cache(cache, {"key": key, "items": items})
        return items

    def _encode(self, tokenizer) -> list[dict]:
        return encode_pairs(self.records, tokenizer, *self.lengths)

    def questions(self) -> list[tuple[int, str, Any]]:
        """(place in the file, as `PreferenceRecord.index`, prompt, answer) of the records that carry an `answer` field."""
        from granular_po.apps.eval import Question, question_of

        # `eval`'s own rules (an empty or non-scalar answer is not gradable), as the validation questions
        found = ((i, question_of(p, i)) for i, p in enumerate(self.pairs) if isinstance(p, dict) and "answer" in p)
        return [(i, q.prompt, q.answer) for i, q in found if isinstance(q, Question)]

    def score(self, model_dir: Path, completions: Sequence[str] | None = None) -> dict[str, list]:
        """Per-item values of every metric for one run (`completions`: the greedy answers to the synthetic
        test questions, in order, when already generated)."""
        from granular_po.apps.answers import is_correct, stated_answer
        from granular_po.apps.eval import generate

        reference = self.reference()  # before the run's model loads: one model in memory at a time
        self.scorings += 1
        tokenizer, model = load_model_pair(model_dir)
        items = self._preference(tokenizer, model, reference)
        if self.synthetic:
            margins = forced_margins(model, tokenizer, self.forced, self.batch_size)
            items["forced_margin"] = margins
            items["forced_accuracy"] = [float(m > 0) for m in margins]
            if completions is not None:
                items["worked_step"] = [None if w is None else float(w) for w in
                                        worked_steps([p["prompt"] for p in self.pairs], completions)]
        elif self.rouge or self.questions():
            prompts = [r.prompt for r in self.records]
            completions = [c for start in range(0, len(prompts), self.batch_size)
                           for c in generate(model, tokenizer, prompts[start:start + self.batch_size],
                                             self.max_new_tokens)]
            # keyed by the record's place in the file: the loader skips some records (identical responses,
            # flag 0) that `self.pairs` still holds, so a completion's position is not its pair's
            graded = dict((i, a) for i, _, a in self.questions())
            if graded:
                items["accuracy"] = [float(is_correct(stated_answer(c, graded[r.index]), graded[r.index]))
                                     if r.index in graded else None for r, c in zip(self.records, completions)]
            items["completions"] = list(completions)
        if self.rouge and completions is not None:
            items["rouge_l"] = rouge_l(completions, [r.chosen for r in self.records])
        del model
        return items

    def preference(self, model_dir: Path) -> dict[str, list]:
        """Per pair, the preference metrics alone (`preference_metrics`) of one model directory: no generation."""
        reference = self.reference()
        tokenizer, model = load_model_pair(model_dir)
        items = self._preference(tokenizer, model, reference)
        del model
        return items

    def _preference(self, tokenizer, model, reference: dict) -> dict[str, list]:
        encoded = self._encode(tokenizer)
        return preference_metrics(sequence_logps(model, encoded, self.batch_size), reference, encoded)

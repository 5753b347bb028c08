"""The research code's hub datasets (hh, shp, se), read as it read them, as preference records.

What carries over from the research code (the TDPO repository's `preference_datasets.py`):

- prompts are "\\n\\nHuman: {question}\\n\\nAssistant:" and shp / se responses start with a space;
- hh: one pair per row, the prompt cut at the chosen transcript's last "\\n\\nAssistant:";
- shp: pairs ordered by `labels`, kept only when the higher score is at least twice the lower;
- se: the hub has one split ('train'); it is shuffled with seed 42 and its first 1% is the test split,
  the rest train. Every pair of answers (i, j), i < j, of a question is a preference pair, the
  higher `pm_score` chosen (on a tie the later answer, as there): n(n-1)/2 pairs per question. HTML is
  stripped as there: the text of each top-level paragraph, and `<code>` blocks kept as
  `<code>...</code>`, joined by blank lines;
- SFT (`sft=True`): se and shp give one record per prompt, its highest-scored response (the first on
  a tie), on both sides of the record as the research code's SFT batches had it.

Where this differs on purpose (README "Hub datasets"): hh SFT keeps one record per pair (the research
code kept the last chosen response of each prompt: records are never merged by prompt here), and an se
answer that is empty after HTML stripping is left out of its pairs (counted, `se_empty_answer`) instead
of being trained on as a lone space.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from granular_po.data.records import _admit, _check_on_invalid, _check_text, _describe, make_record
from granular_po.data.schema import DataError, LoadReport, PreferenceRecord

HUB_DATASETS = {
    "hh": "Anthropic/hh-rlhf",
    "shp": "stanfordnlp/SHP",
    "se": "HuggingFaceH4/stack-exchange-preferences",
}
_ASSISTANT = "\n\nAssistant:"
_HUMAN = "\n\nHuman: "
SE_TEST_SHARE = 0.01  # the research code's test split of se: the first 1% after shuffle(seed=42)
SE_SEED = 42


def _prompt(text: str) -> str:
    return _HUMAN + text + _ASSISTANT


def _row_text(row: Mapping[str, Any], key: str, source: str, index: int) -> str:
    if key not in row:
        raise DataError(source, index, key, "missing", "missing_field")
    return _check_text(row[key], key, source, index, None, False)


# ---------------------------------------------------------------------------------------------------
# hh


def convert_hh_row(row: Mapping[str, Any], index: int, source: str = HUB_DATASETS["hh"],
                   eos_text: str | None = None) -> PreferenceRecord:
    """Anthropic/hh-rlhf row {chosen, rejected} (whole transcripts) -> shared prompt + two responses.

    The prompt is everything up to and including the last "\\n\\nAssistant:" of the chosen transcript.
    """
    chosen, rejected = _row_text(row, "chosen", source, index), _row_text(row, "rejected", source, index)
    cut = chosen.rfind(_ASSISTANT)
    if cut < 0:
        raise DataError(source, index, "chosen", "no '\\n\\nAssistant:' turn in the transcript", "hh_format")
    prompt = chosen[: cut + len(_ASSISTANT)]
    if not rejected.startswith(prompt):
        raise DataError(source, index, "rejected", "does not start with the chosen transcript's prompt (up to "
                        "its last '\\n\\nAssistant:')", "hh_format")
    return make_record(prompt, chosen[len(prompt):], rejected[len(prompt):], source, index, eos_text=eos_text)


# ---------------------------------------------------------------------------------------------------
# shp


def _shp_scores(row: Mapping[str, Any], source: str, index: int) -> list[float]:
    scores = []
    for key in ("score_A", "score_B"):
        value = row.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise DataError(source, index, key, f"must be a number, got {_describe(value)}", "bad_type")
        scores.append(value)
    return scores


def convert_shp_row(row: Mapping[str, Any], index: int, source: str = HUB_DATASETS["shp"],
                    min_score_ratio: float = 2.0, eos_text: str | None = None) -> PreferenceRecord:
    """stanfordnlp/SHP row -> record; pairs whose score ratio is under `min_score_ratio` raise "shp_low_ratio".

    As in the research code: prompt "\\n\\nHuman: {history}\\n\\nAssistant:", responses with a leading space,
    `labels` 1 means A is preferred.
    """
    history = _row_text(row, "history", source, index)
    ref_a, ref_b = _row_text(row, "human_ref_A", source, index), _row_text(row, "human_ref_B", source, index)
    label = row.get("labels")
    if type(label) is not int or label not in (0, 1):
        raise DataError(source, index, "labels", f"must be 0 or 1, got {_describe(label)}", "bad_type")
    high, low = max(_shp_scores(row, source, index)), min(_shp_scores(row, source, index))
    ratio = high / low if low > 0 else (math.inf if high > 0 else 1.0)
    if ratio < min_score_ratio:
        raise DataError(source, index, "score_A", f"score ratio {ratio:.2f} is under {min_score_ratio} (the "
                        "research code's filter)", "shp_low_ratio")
    chosen, rejected = (ref_a, ref_b) if label == 1 else (ref_b, ref_a)
    return make_record(_prompt(history), " " + chosen, " " + rejected, source, index, eos_text=eos_text)


def shp_sft_records(rows: Iterable[Mapping[str, Any]], source: str = HUB_DATASETS["shp"],
                    min_score_ratio: float = 2.0, eos_text: str | None = None
                    ) -> tuple[list[PreferenceRecord], list[DataError]]:
    """One SFT record per prompt: its highest-scored response over the rows that pass the ratio filter
    (the first on a tie, in row order, A before B), indexed by the row it came from."""
    best: dict[str, tuple[float, str, int]] = {}
    errors: list[DataError] = []
    for index, row in enumerate(rows):
        try:
            record = convert_shp_row(row, index, source, min_score_ratio, eos_text)
        except DataError as e:
            errors.append(e)
            continue
        for text, score in zip((row["human_ref_A"], row["human_ref_B"]), _shp_scores(row, source, index)):
            if record.prompt not in best or score > best[record.prompt][0]:
                best[record.prompt] = (score, " " + text, index)
    records = [PreferenceRecord(prompt, text, text, (), source, index) for prompt, (_, text, index) in best.items()]
    return records, errors


# ---------------------------------------------------------------------------------------------------
# se


def strip_html_tags(html: str) -> str:
    """The research code's HTML stripping for StackExchange: for each top-level element, a paragraph
    gives its own text nodes (not those of nested tags), a `<pre>` each `<code>` inside it and a
    top-level `<code>` itself, as `<code>...</code>`; everything else is dropped; joined by blank lines."""
    from bs4 import BeautifulSoup, NavigableString  # late: only se needs it

    parts = []
    for element in BeautifulSoup(html, "html.parser").children:
        if isinstance(element, NavigableString):
            continue
        if element.name == "p":
            parts.append("".join(child.string for child in element.children if isinstance(child, NavigableString)))
        elif element.name == "pre":
            parts.extend("<code>" + code.get_text() + "</code>" for code in element.find_all("code"))
        elif element.name == "code":
            parts.append("<code>" + element.get_text() + "</code>")
    return "\n\n".join(parts)


def _se_answers(row: Mapping[str, Any], source: str, index: int, html: bool) -> tuple[str, list[str], list[float]]:
    """(prompt, responses with their leading space, scores) of one se row, HTML stripped."""
    question = _row_text(row, "question", source, index)
    answers = row.get("answers")
    if not isinstance(answers, (list, tuple)):
        raise DataError(source, index, "answers", f"must be a list, got {_describe(answers)}", "bad_type")
    texts, scores = [], []
    for k, answer in enumerate(answers):
        field = f"answers[{k}]"
        if not isinstance(answer, Mapping) or not isinstance(answer.get("text"), str):
            raise DataError(source, index, field, "must be an object with a string 'text'", "bad_type")
        score = answer.get("pm_score")
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise DataError(source, index, field, f"pm_score must be a number, got {_describe(score)}", "bad_type")
        texts.append(" " + (strip_html_tags(answer["text"]) if html else answer["text"]))
        scores.append(score)
    return _prompt(strip_html_tags(question) if html else question), texts, scores


def _empty_answer(source: str, index: int, k: int) -> DataError:
    return DataError(source, index, f"answers[{k}]", "is empty after HTML stripping (the research code trained "
                     "on it as a lone space)", "se_empty_answer")


def convert_se_row(row: Mapping[str, Any], index: int, source: str = HUB_DATASETS["se"],
                   first_index: int | None = None, html: bool = True, eos_text: str | None = None
                   ) -> tuple[list[PreferenceRecord], list[DataError]]:
    """stack-exchange-preferences row -> every pair of its answers (i, j), i < j, the higher `pm_score`
    chosen (the later answer on a tie): n(n-1)/2 pairs, in the research code's order. Pairs are numbered
    from `first_index` (default `index`, the row); those with an answer left empty by the HTML stripping
    come back as errors (code "se_empty_answer"), in place of their record."""
    prompt, texts, scores = _se_answers(row, source, index, html)
    start = index if first_index is None else first_index
    records: list[PreferenceRecord] = []
    errors: list[DataError] = []
    n = 0
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            win, lose = (i, j) if scores[i] > scores[j] else (j, i)
            pair_index, n = start + n, n + 1
            empty = [k for k in (win, lose) if not texts[k].strip()]
            if empty:
                errors.append(_empty_answer(source, pair_index, empty[0]))
                continue
            try:
                records.append(make_record(prompt, texts[win], texts[lose], source, pair_index, eos_text=eos_text,
                                           fields=("question", f"answers[{win}]", f"answers[{lose}]")))
            except DataError as e:
                errors.append(e)
    return records, errors


def se_sft_record(row: Mapping[str, Any], index: int, source: str = HUB_DATASETS["se"], html: bool = True,
                  eos_text: str | None = None) -> PreferenceRecord | None:
    """The SFT record of one se row: its highest-scored non-empty answer (the first on a tie) on both
    sides; None for a question without such an answer."""
    prompt, texts, scores = _se_answers(row, source, index, html)
    kept = [k for k in range(len(texts)) if texts[k].strip()]
    if not kept:
        return None
    best = max(kept, key=scores.__getitem__)
    return make_record(prompt, texts[best], texts[best], source, index, eos_text=eos_text,
                       fields=("question", f"answers[{best}]", f"answers[{best}]"))


def se_split(dataset, split: str):
    """The research code's se splits of the one hub split: shuffle(seed=42), the first 1% is test."""
    if split not in ("train", "test"):
        raise ValueError(f"se has a train and a test split (1% of the hub's 'train'), not {split!r}")
    shuffled = dataset.shuffle(seed=SE_SEED)
    cut = int(len(shuffled) * SE_TEST_SHARE)
    return shuffled.select(range(cut) if split == "test" else range(cut, len(shuffled)))


# ---------------------------------------------------------------------------------------------------
# Loading


def load_hub_records(name: str, split: str = "train", on_invalid: str = "error", cache_dir: str | None = None,
                     eos_text: str | None = None, min_score_ratio: float = 2.0, sft: bool = False,
                     path: str | None = None) -> tuple[list[PreferenceRecord], LoadReport]:
    """Load hh / shp / se (`datasets.load_dataset`) and convert them as the research code did.

    `sft=True` gives the SFT records (see the module docstring); `path` reads the hub dataset from
    another place `datasets.load_dataset` accepts (a local copy: a directory of parquet / json files).
    """
    _check_on_invalid(on_invalid)
    kinds = {**{k: k for k in HUB_DATASETS}, **{v: k for k, v in HUB_DATASETS.items()}}
    if name not in kinds:
        raise ValueError(f"unknown hub dataset {name!r}; known: {', '.join(kinds)}")
    kind, hub_id = kinds[name], HUB_DATASETS[kinds[name]]
    if kind == "se" and split not in ("train", "test"):
        raise ValueError(f"se has a train and a test split (1% of the hub's 'train'), not {split!r}")
    source = f"{hub_id}:{split}"
    report = LoadReport(source)
    import datasets  # late: importing it is slow and only this function needs it

    try:
        rows = datasets.load_dataset(path or hub_id, split="train" if kind == "se" else split, cache_dir=cache_dir)
    except Exception as e:
        raise DataError(source, None, None, f"cannot load the hub dataset: {type(e).__name__}: {e}",
                        "hub_unavailable") from e
    if kind == "se":
        rows = se_split(rows, split)
    if kind == "shp" and sft:
        records, errors = shp_sft_records(rows, source, min_score_ratio, eos_text)
        _count(report, records, errors, on_invalid)
        return records, report
    records = []
    for index, row in enumerate(rows):
        errors: list[DataError] = []
        try:
            if kind == "hh":
                new = [convert_hh_row(row, index, source, eos_text)]
                if sft:  # one record per pair (see the module docstring), the chosen response on both sides
                    new = [PreferenceRecord(r.prompt, r.chosen, r.chosen, (), r.source, r.index) for r in new]
            elif kind == "shp":
                new = [convert_shp_row(row, index, source, min_score_ratio, eos_text)]
            elif sft:
                new = [r for r in [se_sft_record(row, index, source, eos_text=eos_text)] if r is not None]
            else:
                new, errors = convert_se_row(row, index, source, first_index=report.n_read, eos_text=eos_text)
        except DataError as e:
            new, errors = [], [e]
        _count(report, new, errors, on_invalid)
        records.extend(new)
    return records, report


def _count(report: LoadReport, records: list[PreferenceRecord], errors: list[DataError], on_invalid: str) -> None:
    """Count kept records and admit (raise, or count as skipped) the errors."""
    for error in errors:
        report.n_read += 1
        _admit(error, on_invalid, report)
    report.n_read += len(records)
    report.n_kept += len(records)

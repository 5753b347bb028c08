"""QA-FEEDBACK (FineGrainedRLHF, Wu et al. 2023, arXiv 2306.01693) as preference records.

QA-FEEDBACK re-splits ASQA's long-form questions; for each question a T5 policy's first sample
(`prediction 1`) carries human fine-grained feedback: error spans with a type (`feedback.errors`:
`start`, `end`, `error type` in Irrelevant / Wrong-Grounding / Unverifiable / Redundant / Incoherent)
and a human edit of the answer that fixes them (`feedback.corrected-prediction`). The data is the
repository's `tasks/qa_feedback/data/*_feedback.json` (Apache-2.0).

One row becomes one record:

- `incorrect_response`: `prediction 1`, trailing whitespace cut (offsets are unchanged by that);
- `correct_response`: `corrected-prediction`, trailing whitespace cut;
- `masked_regions`: each error span `[start, end, -1]`. Offsets are half-open Python string indices
  into `prediction 1` (checked on the whole dev split: 931 of 1373 spans end on a ".", none starts or
  ends inside a word, none overlaps another);
- `prompt`: the question; with `with_passages`, the grounding passages first ("Passage 1: {title}\\n
  {sentences}" blocks), then "Question: {question}", so that a prompt cut from its start
  (`truncation_mode=keep_end`) keeps the question.

A row without a correction (empty), or whose correction equals the prediction, has nothing to prefer:
skipped and counted by reason (`correction_missing`, `correction_identical`) with its row index.
`error_types` keeps only the spans of those types (the others are counted, not turned into regions).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Collection, Mapping
from typing import Any

from granular_po.data.records import _check_on_invalid, _describe, _region, make_record, parse_rows
from granular_po.data.schema import DataError, LoadReport, PreferenceRecord

ERROR_TYPES = ("Irrelevant", "Wrong-Grounding", "Unverifiable", "Redundant", "Incoherent")
# Filters, not faults: always skipped and counted, whatever `on_invalid` says.
QA_FEEDBACK_FILTERS = frozenset({"correction_missing", "correction_identical"})


def _text(row: Mapping[str, Any], key: str, source: str, index: int) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise DataError(source, index, key, "missing" if key not in row else f"must be a string, got "
                        f"{_describe(value)}", "missing_field" if key not in row else "bad_type")
    return value


def qa_prompt(row: Mapping[str, Any], source: str, index: int, with_passages: bool) -> str:
    """The question alone, or the passages then "Question: ..." (see the module docstring)."""
    question = _text(row, "question", source, index).strip()
    if not with_passages:
        return question
    passages = row.get("passages")
    if not isinstance(passages, list):
        raise DataError(source, index, "passages", f"must be a list, got {_describe(passages)}", "bad_type")
    blocks = []
    for k, passage in enumerate(passages):  # [title, sentence, sentence, ...]
        if not (isinstance(passage, list) and passage and all(isinstance(s, str) for s in passage)):
            raise DataError(source, index, f"passages[{k}]", "must be a list of strings [title, sentence, ...]",
                            "bad_type")
        blocks.append(f"Passage {k + 1}: {passage[0].strip()}\n" + " ".join(s.strip() for s in passage[1:]))
    return "\n\n".join([*blocks, f"Question: {question}"])


def convert_qa_feedback_row(row: Any, index: int, source: str, with_passages: bool = False,
                            error_types: Collection[str] | None = None,
                            dropped_types: Counter | None = None) -> PreferenceRecord:
    """One QA-FEEDBACK row -> a record (see the module docstring), or a DataError saying why not.

    Spans whose type is not in `error_types` (None: all) are left out and counted in `dropped_types`.
    """
    if not isinstance(row, Mapping):
        raise DataError(source, index, None, f"a row must be a JSON object, got {_describe(row)}", "not_object")
    feedback = row.get("feedback")
    if not isinstance(feedback, Mapping):
        raise DataError(source, index, "feedback", f"must be an object, got {_describe(feedback)}", "bad_type")
    prediction = _text(row, "prediction 1", source, index).rstrip()
    correction = feedback.get("corrected-prediction")
    if correction is not None and not isinstance(correction, str):
        raise DataError(source, index, "feedback.corrected-prediction", f"must be a string, got "
                        f"{_describe(correction)}", "bad_type")
    correction = (correction or "").rstrip()
    if not correction.strip():
        raise DataError(source, index, "feedback.corrected-prediction", "is empty: the annotator gave no "
                        "correction, so the pair has no correct response", "correction_missing")
    if correction == prediction:
        raise DataError(source, index, "feedback.corrected-prediction", "equals 'prediction 1': the pair has "
                        "nothing to prefer", "correction_identical")
    record = make_record(qa_prompt(row, source, index, with_passages), correction, prediction, source, index,
                         fields=("question", "feedback.corrected-prediction", "prediction 1"))
    errors = feedback.get("errors", [])
    if not isinstance(errors, list):
        raise DataError(source, index, "feedback.errors", f"must be a list, got {_describe(errors)}", "bad_type")
    regions = []
    for k, error in enumerate(errors):
        field = f"feedback.errors[{k}]"
        if not isinstance(error, Mapping):
            raise DataError(source, index, field, f"must be an object, got {_describe(error)}", "bad_region")
        kind = error.get("error type")
        if error_types is not None and kind not in error_types:
            if dropped_types is not None:
                dropped_types[str(kind)] += 1
            continue
        start, end = error.get("start"), error.get("end")
        if end == start:  # marks no character: a region would reach no token
            raise DataError(source, index, field, f"is empty (start = end = {start})", "bad_region")
        regions.append(_region([start, end, -1], field, record))
    regions.sort(key=lambda r: (r.start, r.end))
    return PreferenceRecord(record.prompt, record.chosen, record.rejected, tuple(regions), source, index)


def load_qa_feedback(path: str | os.PathLike[str], with_passages: bool = False, on_invalid: str = "error",
                     error_types: Collection[str] | None = None
                     ) -> tuple[list[PreferenceRecord], LoadReport, Counter]:
    """Read a QA-FEEDBACK `*_feedback.json` file (a JSON list of rows) into records.

    Returns the records (each keeps its row index), the load report (skips by reason, with row
    indices) and the count of spans left out by `error_types`, by type.
    """
    _check_on_invalid(on_invalid)
    if error_types is not None:
        unknown = sorted(set(error_types) - set(ERROR_TYPES))
        if unknown:
            raise ValueError(f"unknown error type(s) {', '.join(map(repr, unknown))}; QA-FEEDBACK's are "
                             f"{', '.join(ERROR_TYPES)}")
    source = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
    except FileNotFoundError:
        raise DataError(source, None, None, "file not found", "file_missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(source, None, None, f"not a JSON file: {e}", "bad_json") from None
    if not isinstance(rows, list):
        raise DataError(source, None, None, f"expected a JSON list of QA-FEEDBACK rows, got {_describe(rows)}",
                        "not_a_list")
    report, dropped = LoadReport(source), Counter()
    records = list(parse_rows(((i, None, row) for i, row in enumerate(rows)), source, on_invalid, report,
                              parse=lambda row, src, i, _eos: convert_qa_feedback_row(row, i, src, with_passages,
                                                                                      error_types, dropped),
                              skip_codes=QA_FEEDBACK_FILTERS))
    return records, report, dropped

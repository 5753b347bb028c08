"""Label Studio's JSON export (Export -> JSON) as preference records.

The project is set up with `examples/label_studio/config.xml`: tasks carry `data.prompt`,
`data.correct_response` and `data.incorrect_response`, each response a `<Text>` named like its data
key, with a `<Labels>` offering "good" and "error". An export is a JSON list of tasks; each task's
`annotations[].result[]` holds one item per highlighted span:
`{"type": "labels", "from_name": ..., "to_name": "incorrect_response",
"value": {"start": 14, "end": 16, "text": "54", "labels": ["error"]}}`.

What a span becomes (the side, and so the flag, comes from `to_name`):

| label   | in correct_response           | in incorrect_response                       |
|---------|-------------------------------|---------------------------------------------|
| "good"  | region, flag 1                | no region (unmarked text is not an error)    |
| "error" | refused: the pair contradicts itself | region, flag -1                      |

Several annotations of one task: `merge` takes the union of their spans (overlapping or touching
spans of one side joined), `latest` only the annotation updated last (`updated_at`, else
`created_at`). Cancelled annotations (`was_cancelled`, "skipped" in the UI) are left out and counted;
a task with none left is skipped by reason (`no_annotation`, `all_cancelled`). Offsets are Python
string indices (code points; Label Studio stores code points since its emoji-offset fix): a span
whose `value.text` differs from the response's characters at its offsets is refused with the task id.
Predictions (model pre-annotations) and results of other types (choices, ratings) are not read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from granular_po.data.annotate import _merge
from granular_po.data.records import _check_on_invalid, _describe, make_record, parse_rows
from granular_po.data.schema import DataError, LoadReport, PreferenceRecord, Region, RegionFlag

ANNOTATOR_MODES = ("merge", "latest")
SIDES = {"correct_response": RegionFlag.CORRECT, "incorrect_response": RegionFlag.INCORRECT}
LABELS = ("good", "error")
# Filters, not faults: always skipped and counted, whatever `on_invalid` says.
LABEL_STUDIO_FILTERS = frozenset({"no_annotation", "all_cancelled", "identical_responses"})
Notes = dict[str, list]  # what was read but is not a region -> the task id, once per occurrence


def _when(annotation: Mapping[str, Any]) -> datetime:
    """The annotation's last update (ISO 8601, "Z" allowed; naive times read as UTC), else its creation;
    the earliest time when it has neither."""
    for key in ("updated_at", "created_at"):
        value = annotation.get(key)
        if isinstance(value, str):
            try:
                stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
            return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)
    return datetime.min.replace(tzinfo=timezone.utc)


def _utf16_hint(text: str, start: int, end: int, expected: str) -> str:
    """A hint when the offsets read right as UTF-16 code units (Label Studio before its emoji fix)."""
    units = text.encode("utf-16-le")
    if units[2 * start:2 * end].decode("utf-16-le", errors="replace") == expected:
        return " (they match when counted in UTF-16 code units, as Label Studio before 1.0 counted them: " \
               "re-export from a current Label Studio)"
    return ""


class _Task:
    """One task being converted: its texts, and the spans of its annotations, by side."""

    def __init__(self, task: Any, index: int, source: str):
        if not isinstance(task, Mapping):
            raise DataError(source, index, None, f"a task must be a JSON object, got {_describe(task)}", "not_object")
        self.index, self.source = index, source
        self.id = task.get("id", f"#{index}")
        data = task.get("data")
        if not isinstance(data, Mapping):
            raise self.error("data", f"must be an object, got {_describe(data)}", "bad_type")
        self.texts = {}
        for key in ("prompt", *SIDES):
            if not isinstance(data.get(key), str):
                raise self.error(f"data.{key}", "missing (the task's data must hold prompt, correct_response and "
                                 "incorrect_response, as examples/label_studio/config.xml shows them)"
                                 if key not in data else f"must be a string, got {_describe(data[key])}",
                                 "missing_field" if key not in data else "bad_type")
            self.texts[key] = data[key]

    def error(self, field: str | None, reason: str, code: str) -> DataError:
        return DataError(self.source, self.index, field, f"task {self.id}: {reason}", code)

    def spans(self, annotation: Mapping[str, Any], a: int, notes: Notes) -> dict[str, list[tuple[int, int]]]:
        """The region spans of one annotation, by side, each checked against the text it marks."""
        result = annotation.get("result", [])
        if not isinstance(result, list):
            raise self.error(f"annotations[{a}].result", f"must be a list, got {_describe(result)}", "bad_type")
        out: dict[str, list[tuple[int, int]]] = {side: [] for side in SIDES}
        for r, item in enumerate(result):
            field = f"annotations[{a}].result[{r}]"
            if not isinstance(item, Mapping) or item.get("type") != "labels":
                notes.setdefault("results of other types than labels (not read)", []).append(self.id)
                continue
            side, value = item.get("to_name"), item.get("value")
            if side not in SIDES:
                raise self.error(f"{field}.to_name", f"labels a {_describe(side)}, not correct_response or "
                                 "incorrect_response (name each response's <Text> after its data key)", "unknown_target")
            if not isinstance(value, Mapping):
                raise self.error(f"{field}.value", f"must be an object, got {_describe(value)}", "bad_region")
            start, end = self._offsets(value, side, f"{field}.value")
            labels = value.get("labels")
            if not isinstance(labels, list) or not labels or any(str(x).lower() not in LABELS for x in labels):
                raise self.error(f"{field}.value.labels", f"must name 'good' or 'error', got {_describe(labels)}",
                                 "unknown_label")
            kinds = {str(x).lower() for x in labels}
            if side == "correct_response" and "error" in kinds:
                raise self.error(f"{field}.value.labels", f"'error' marked in the correct response "
                                 f"({self.texts[side][start:end]!r}): the pair contradicts itself; correct the "
                                 "pair, or skip the task with --skip-invalid", "error_in_correct")
            if side == "incorrect_response" and "error" not in kinds:
                notes.setdefault("'good' spans in incorrect responses (not regions)", []).append(self.id)
                continue
            out[side].append((start, end))
        return out

    def _offsets(self, value: Mapping[str, Any], side: str, field: str) -> tuple[int, int]:
        start, end, text = value.get("start"), value.get("end"), self.texts[side]
        if type(start) is not int or type(end) is not int or not 0 <= start < end <= len(text):
            raise self.error(field, f"start {_describe(start)} / end {_describe(end)} are not offsets of a "
                             f"non-empty span of the {side} (length {len(text)})", "bad_region")
        expected = value.get("text")
        if expected is not None and text[start:end] != expected:
            raise self.error(f"{field}.text", f"{expected!r} is not the {side}'s text at [{start}, {end}), which "
                             f"reads {text[start:end]!r}: the task's text changed after annotation, or the offsets "
                             f"count something else{_utf16_hint(text, start, end, expected)}", "span_text_mismatch")
        return start, end


def convert_task(task: Any, index: int, source: str, annotators: str, notes: Notes) -> PreferenceRecord:
    """One exported task -> a record (see the module docstring), or a DataError saying why not."""
    t = _Task(task, index, source)
    annotations = task.get("annotations", task.get("completions", []))  # "completions": before Label Studio 1.0
    if not isinstance(annotations, list):
        raise t.error("annotations", f"must be a list, got {_describe(annotations)}", "bad_type")
    if not annotations:
        raise t.error("annotations", "nobody annotated this task", "no_annotation")
    kept = []
    for a, annotation in enumerate(annotations):
        if not isinstance(annotation, Mapping):
            raise t.error(f"annotations[{a}]", f"must be an object, got {_describe(annotation)}", "bad_type")
        if annotation.get("was_cancelled"):
            notes.setdefault("cancelled annotations (left out)", []).append(t.id)
            continue
        kept.append((a, annotation))
    if not kept:
        raise t.error("annotations", "its only annotation was cancelled (skipped)" if len(annotations) == 1 else f"all {len(annotations)} of its annotations were cancelled (skipped)", "all_cancelled")
    if annotators == "latest":  # the last updated; on a tie the later in the list
        kept = [max(kept, key=lambda pair: (_when(pair[1]), pair[0]))]
    spans = [t.spans(annotation, a, notes) for a, annotation in kept]
    if len(kept) > 1:
        notes.setdefault("tasks with several annotations merged", []).append(t.id)
    regions = [Region(s, e, flag) for side, flag in SIDES.items()
               for s, e in _merge([span for by_side in spans for span in by_side[side]])]
    chosen, rejected = t.texts["correct_response"], t.texts["incorrect_response"]
    if chosen == rejected:
        raise t.error("data.incorrect_response", "is identical to the correct response: the pair has nothing to "
                      "prefer", "identical_responses")
    return make_record(t.texts["prompt"], chosen, rejected, source, index, tuple(regions),
                       fields=("data.prompt", "data.correct_response", "data.incorrect_response"))


def load_label_studio(path: str | os.PathLike[str], annotators: str = "merge", on_invalid: str = "error"
                      ) -> tuple[list[PreferenceRecord], LoadReport, list[str]]:
    """Read a Label Studio JSON export into records, one per task (each keeps its position in the
    export as `index`); also returns notes on what was read but is not a region (counts)."""
    _check_on_invalid(on_invalid)
    if annotators not in ANNOTATOR_MODES:
        raise ValueError(f"annotators must be one of {ANNOTATOR_MODES}, got {annotators!r}")
    source = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            tasks = json.load(f)
    except FileNotFoundError:
        raise DataError(source, None, None, "file not found", "file_missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(source, None, None, f"not a JSON file ({e}): export the project as JSON (not CSV, "
                        "TSV or CONLL)", "bad_json") from None
    if not isinstance(tasks, list):
        raise DataError(source, None, None, f"expected Label Studio's JSON export, a list of tasks, got "
                        f"{_describe(tasks)}", "not_a_list")
    if tasks and all(isinstance(t, Mapping) and "data" not in t and "annotations" not in t for t in tasks):
        raise DataError(source, None, None, "tasks have no 'data' and no 'annotations': this looks like the "
                        "JSON-MIN export (flat rows without to_name or was_cancelled); export the project as JSON", "not_label_studio")
    report, notes = LoadReport(source), {}
    records = list(parse_rows(((i, None, task) for i, task in enumerate(tasks)), source, on_invalid, report,
                              parse=lambda task, src, i, _eos: convert_task(task, i, src, annotators, notes),
                              skip_codes=LABEL_STUDIO_FILTERS))
    return records, report, [_note(what, ids) for what, ids in sorted(notes.items())]


def _note(what: str, ids: list, show: int = 10) -> str:
    """'cancelled annotations (left out): 2 (tasks 3, 7)'."""
    tasks = list(dict.fromkeys(ids))  # first appearance order, once each
    more = f", ... ({len(tasks) - show} more)" if len(tasks) > show else ""
    return f"{what}: {len(ids)} (task{'s' if len(tasks) > 1 else ''} {', '.join(map(str, tasks[:show]))}{more})"

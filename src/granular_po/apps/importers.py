"""`granular-po import SOURCE IN OUT`: turn other people's annotated data into our records (JSONL).

    granular-po import qa-feedback dev_feedback.json examples/qa_feedback/dev.jsonl [--with-passages]
    granular-po import label-studio export.json pairs.jsonl [--annotators merge|latest]

Each source's reader lives in `data/` (`data/qa_feedback.py`, `data/label_studio.py`); this module is
only their command line: it prints what was kept and, by reason, what was skipped and where.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from granular_po.apps.help import DefaultsFormatter
from granular_po.data.label_studio import ANNOTATOR_MODES, load_label_studio
from granular_po.data.qa_feedback import ERROR_TYPES, load_qa_feedback
from granular_po.data.records import write_records
from granular_po.data.schema import DataError, plural


def _common(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("input", help=what)
    parser.add_argument("output", help="where to write the records (.json: a JSON list, else JSONL)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="skip and count malformed rows (tasks) instead of stopping at the first")


def build_parser() -> argparse.ArgumentParser:
    """`granular-po import` and its sources as sub-commands."""
    parser = argparse.ArgumentParser(prog="granular-po import", description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsFormatter)
    sources = parser.add_subparsers(dest="source", required=True, metavar="SOURCE",
                                    help="where the data comes from (each has its own --help)")
    qa = sources.add_parser("qa-feedback", formatter_class=DefaultsFormatter,
                            help="QA-FEEDBACK (FineGrainedRLHF): error spans and a human correction",
                            description="QA-FEEDBACK's *_feedback.json -> records: the human correction as "
                            "correct_response, 'prediction 1' as incorrect_response, each error span a -1 "
                            "region; rows without a correction or with an identical one are skipped and named.")
    _common(qa, "a QA-FEEDBACK *_feedback.json file (FineGrainedRLHF, tasks/qa_feedback/data/)")
    qa.add_argument("--with-passages", action="store_true",
                    help="put the grounding passages in the prompt before the question (default: the question alone)")
    qa.add_argument("--error-types", type=lambda s: [t.strip() for t in s.split(",") if t.strip()],
                    metavar="T1,T2", help=f"keep only spans of these types (default: all: {', '.join(ERROR_TYPES)})")
    ls = sources.add_parser("label-studio", formatter_class=DefaultsFormatter,
                            help="a Label Studio JSON export (examples/label_studio/config.xml)",
                            description="A Label Studio JSON export -> records: each labelled span a region, "
                            "its side (and flag) from to_name; cancelled annotations skipped and counted.")
    _common(ls, "Label Studio's JSON export (Export -> JSON), a list of tasks")
    ls.add_argument("--annotators", choices=ANNOTATOR_MODES, default="merge",
                    help="merge: the union of every submitted annotation's spans; latest: only the most "
                    "recently updated annotation of each task")
    return parser


def _write(records, output: str) -> str | None:
    try:
        write_records(records, output)
    except OSError as e:
        return f"error: cannot write {output}: {e.strerror or e}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """CLI `granular-po import SOURCE IN OUT`: exit 0 on success, 2 on bad input (message, no traceback)."""
    args = build_parser().parse_args(argv)
    on_invalid = "skip" if args.skip_invalid else "error"
    try:
        if args.source == "qa-feedback":
            records, report, dropped = load_qa_feedback(args.input, args.with_passages, on_invalid,
                                                        args.error_types)
            notes = [f"spans left out by --error-types: {', '.join(f'{k}={v}' for k, v in sorted(dropped.items()))}"
                     ] if dropped else []
        else:
            records, report, notes = load_label_studio(args.input, args.annotators, on_invalid)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not records:
        print(f"{report.summary()}\nerror: no record left to write to {args.output}", file=sys.stderr)
        return 2
    if (error := _write(records, args.output)) is not None:
        print(error, file=sys.stderr)
        return 2
    bare = sum(not r.regions for r in records)
    print(report.summary())
    for message in report.first_errors:
        print(f"  {message}")
    if bare:
        print(f"  {plural(bare, 'record')} kept without a span (a response-level pair: every token weighs 1)")
    for note in notes:
        print(f"  {note}")
    print(f"wrote {plural(len(records), 'record')} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

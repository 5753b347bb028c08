"""`granular-po annotate IN OUT`: derive masked_regions of minimally edited pairs from a character diff.

    granular-po annotate pairs.jsonl annotated.jsonl [--include-correct] [--max-edit-ratio 0.5]
    granular-po annotate pairs.parquet annotated.jsonl --column chosen=good --column rejected=bad

The input is read as `train` reads it (JSON / JSONL, parquet, CSV, a save_to_disk directory, a hub id,
TRL's conversational format); the output is always our format (JSONL, or a JSON list for .json).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from granular_po.apps.help import DefaultsFormatter, add_column_option, column_option
from granular_po.data.annotate import annotate_file
from granular_po.data.schema import DataError, plural

_SHOW_INDICES = 20  # indices listed per category in the printed summary; the dict keeps them all


def _indices(indices: list[int]) -> str:
    shown = ", ".join(map(str, indices[:_SHOW_INDICES]))
    return shown + (f", ... ({len(indices) - _SHOW_INDICES} more)" if len(indices) > _SHOW_INDICES else "")


def format_summary(summary: dict[str, Any]) -> str:
    """The summary of `annotate_file` as a few human-readable lines."""
    lines = [f"{summary['source']}: read {plural(summary['read'], 'record')}; annotated {summary['annotated']}, already "
             f"annotated {summary['already_annotated']}; wrote {summary['written']} to {summary['output']}"]
    reasons = {
        "too_large_diff": f"diff too large (edit ratio > {summary['max_edit_ratio']}), not a minimal edit",
        "identical": "identical responses",
        "no_span": "the incorrect response only lacks text at its end (nothing to mark)",
    }
    for key, why in reasons.items():
        if summary[key]:
            lines.append(f"  not written, {why}: {len(summary[key])} (records {_indices(summary[key])})")
    if summary["skipped"]:
        named = summary.get("skipped_records", {})
        counts = "; ".join(f"{k}={v}" + (f": records {_indices(named[k])}" if named.get(k) else "")
                           for k, v in sorted(summary["skipped"].items()))
        lines.append(f"  not written, skipped while loading: {sum(summary['skipped'].values())} ({counts})")
        lines += [f"    {message}" for message in summary.get("skip_messages", [])]
    return "\n".join(lines)


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The options of `granular-po annotate`."""
    parser = argparse.ArgumentParser(prog="granular-po annotate", description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsFormatter)
    parser.add_argument("input", help="pairs of prompt / correct_response / incorrect_response in any format train "
                        "reads: JSON list, JSONL, parquet, CSV, a save_to_disk directory[:split], a hub id org/name:split, "
                        "or - (stdin)")
    parser.add_argument("output", help="where to write the annotated pairs (.json: a JSON list, else JSONL)")
    parser.add_argument("--include-correct", action="store_true",
                        help="also mark the differing characters of the correct response (flag 1)")
    parser.add_argument("--max-edit-ratio", type=_ratio, default=0.5,
                        help="leave out pairs whose differing characters exceed this share")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="skip and count invalid records instead of stopping at the first")
    parser.add_argument("--eos-text", default=None, help="reject records whose text contains this EOS string "
                        "(none checked if not given)")
    add_column_option(parser)
    parser.add_argument("--in-place", action="store_true",
                        help="allow OUTPUT to be INPUT: replace it (the pairs that cannot be annotated are dropped)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI `granular-po annotate IN OUT`: exit 0 on success, 2 on bad input (message, no traceback)."""
    args = build_parser().parse_args(argv)
    try:
        columns = column_option(args.column)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = annotate_file(args.input, args.output, args.include_correct, args.max_edit_ratio,
                                "skip" if args.skip_invalid else "error", args.eos_text, in_place=args.in_place,
                                columns=columns)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {args.output}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

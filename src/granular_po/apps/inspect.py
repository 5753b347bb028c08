"""`granular-po inspect DATA --tokenizer NAME`: validate a data file and show the exact token weights.

    granular-po inspect data.jsonl --tokenizer smollm2-135m --html weights.html --json weights.jsonl

Prints a validation summary (exit status 1 when the data is invalid); `--html` writes a self-contained
page with every response token boxed, the weighted ones shaded by their weight (hover for the value) and
the prompt behind a toggle; `--json` writes one line per record with the response ids, their token
strings and weights (the prompt excluded, the end-of-response token last).

The weights are training's own: each option below is the training key of the same name (`--sides` is
`granular.sides`, `--kl-weights` is `granular.kl_weights` ...), the records are encoded by the encoder
`train` uses, and TDPO's KL weights, where `--kl-weights all` makes them differ from the margin's, are
read from a batch of the trainer's collator through the objective's own `statistic_weights`.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from granular_po.apps.help import DefaultsFormatter, add_column_option, column_option
from granular_po.data.encode import (
    PROMPT_FORMATS,
    TRUNCATION_MODES,
    EncodeOptions,
    TokenLayout,
    admit_reached,
    encode_record,
    resolve_layout,
)
from granular_po.data.masks import CHOICES, GranularOptions, projected_regions, token_in_regions
from granular_po.data.schema import DataError, LoadReport, PreferenceRecord
from granular_po.settings import field_docs

DEFAULT_MODEL = "smollm2-135m"


def build_parser() -> argparse.ArgumentParser:
    """The options of `granular-po inspect`; encoding and weighting options default (and are described)
    as the training keys of the same name are."""
    enc, gran = field_docs(EncodeOptions), field_docs(GranularOptions)
    p = argparse.ArgumentParser(prog="granular-po inspect", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("data", help="records {prompt, correct_response, incorrect_response, ...}: a JSON / JSONL, "
                   "parquet or CSV file, a save_to_disk directory (DIR:split), a hub id org/name:split, or - (stdin)")
    add_column_option(p)
    p.add_argument("--tokenizer", default=DEFAULT_MODEL, help="hub id, local directory, or smollm2-135m "
                   "(the embedded default model's tokenizer)")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default=EncodeOptions.prompt_format,
                   help=enc["prompt_format"])
    p.add_argument("--max-length", type=int, default=EncodeOptions.max_length, help=enc["max_length"])
    p.add_argument("--max-prompt-length", type=int, default=EncodeOptions.max_prompt_length,
                   help=enc["max_prompt_length"])
    p.add_argument("--truncation-mode", choices=TRUNCATION_MODES, default=EncodeOptions.truncation_mode,
                   help=enc["truncation_mode"])
    p.add_argument("--on-invalid", choices=("error", "skip"), default="error",
                   help="a bad record: error (report it, exit 1) or skip (count it and go on)")
    p.add_argument("--granular", action=argparse.BooleanOptionalAction, default=True,
                   help=gran["enabled"] + " On here, to show the regions; training's granular.enabled is off.")
    p.add_argument("--outside-weight", type=float, default=GranularOptions.outside_weight,
                   help=gran["outside_weight"])
    p.add_argument("--unannotated-weight", type=float, default=GranularOptions.unannotated_weight,
                   help=gran["unannotated_weight"])
    p.add_argument("--include-eos", action=argparse.BooleanOptionalAction, default=GranularOptions.include_eos,
                   help=gran["include_eos"])
    for key in ("sides", "after_first_error", "kl_weights"):  # the objective options (granular.<key>)
        p.add_argument(f"--{key.replace('_', '-')}", choices=CHOICES[key], default=getattr(GranularOptions, key),
                       help=gran[key] + (" Shown for loss=tdpo (DPO's KL is only logged, with the margin's "
                                         "weights): --json adds chosen_kl_weights / rejected_kl_weights."
                                         if key == "kl_weights" else ""))
    p.add_argument("--html", metavar="OUT.html", help="write the token viewer page here (none if not given)")
    p.add_argument("--json", metavar="OUT.jsonl", help="write response ids, token strings and weights per "
                   "record here (none if not given)")
    p.add_argument("--html-max-pairs", type=int, default=1000, help="pairs shown in the HTML page")
    return p


def load_tokenizer(name: str):
    """The embedded default through `granular_po.models` when available, else `AutoTokenizer`."""
    if name == DEFAULT_MODEL:
        try:
            from granular_po.models import load_tokenizer as load_default
        except ImportError:
            load_default = None
        if load_default is not None:
            return load_default(name)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, trust_remote_code=False)


# ------------------------------------------------------------------------------------------ encoding


def encode_all(records: Sequence[PreferenceRecord], tokenizer, enc: EncodeOptions, gran: GranularOptions,
               layout: TokenLayout) -> list[dict[str, Any]]:
    """encode_record with offsets, plus the chosen tokens hit by projected rejected-side regions."""
    out = []
    for record in records:
        row = encode_record(record, tokenizer, enc, gran, layout, with_offsets=True)
        row["projected"] = token_in_regions(row["chosen_offsets"], projected_regions(record))
        out.append(row)
    return out


def add_kl_weights(rows: Sequence[dict[str, Any]], pad_token_id: int, gran: GranularOptions) -> None:
    """With `kl_weights=all`, add each row's TDPO KL weights (`chosen_kl_weights`, `rejected_kl_weights`, the
    end token last) as the trainer reads them: the row collated by `PreferenceCollator` and the weights taken
    from `LossSettings.statistic_weights`. Otherwise the KL reads the margin's weights (`*_weights`): nothing
    is added."""
    from granular_po.data.collate import PreferenceCollator
    from granular_po.losses import LossType
    from granular_po.training.objectives import LossSettings

    settings = LossSettings(loss=LossType.TDPO, kl_weights=gran.kl_weights)
    if not settings.kl_over_all_tokens:
        return
    collate = PreferenceCollator(pad_token_id)
    for row in rows:
        batch = collate([row])
        kl = settings.statistic_weights(batch)["kl_weights"]  # (2, T): rows chosen, rejected
        for r, side in enumerate(("chosen", "rejected")):
            start, end = batch["host"]["prompt_lengths"][r], batch["host"]["lengths"][r]
            row[f"{side}_kl_weights"] = kl[r, start:end].tolist()


def summarize(report: LoadReport, records, rows, tokenizer, layout: TokenLayout, gran: GranularOptions) -> list[str]:
    """The validation summary, one line per fact."""
    counts = {}
    for side in ("chosen", "rejected"):
        weights = [w for row in rows for w in row[f"{side}_weights"]]
        counts[side] = (sum(1 for w in weights if w != 0), len(weights))
    nonzero = counts["chosen"][0] + counts["rejected"][0]
    total = counts["chosen"][1] + counts["rejected"][1]
    end_tok = tokenizer.convert_ids_to_tokens(layout.end_token_id)
    lines = [
        report.summary(),
        f"annotated pairs: {sum(r.is_annotated for r in records)} of {len(records)}",
        f"tokenizer: {getattr(tokenizer, 'name_or_path', '?')}; prompt format: {'chat' if layout.chat else 'raw'}; "
        f"end-of-response token: {end_tok!r} (id {layout.end_token_id})",
        "granular: " + (f"on (outside_weight={gran.outside_weight:g}, unannotated_weight="
                        f"{gran.unannotated_weight:g}, include_eos={gran.include_eos}, sides={gran.sides}, "
                        f"after_first_error={gran.after_first_error}, kl_weights={gran.kl_weights})"
                        if gran.enabled else "off"),
        f"response tokens carrying weight: {nonzero}/{total} = {nonzero / max(total, 1):.1%} "
        f"(chosen {counts['chosen'][0]}/{counts['chosen'][1]}, rejected {counts['rejected'][0]}/{counts['rejected'][1]})",
    ]
    if rows and "chosen_kl_weights" in rows[0]:
        kl = [w for row in rows for side in ("chosen", "rejected") for w in row[f"{side}_kl_weights"]]
        kl_nonzero = sum(1 for w in kl if w != 0)
        lines.append(f"TDPO's KL (kl_weights=all) weighs {kl_nonzero}/{len(kl)} response tokens; the margin "
                     "keeps the weights above (DPO's KL is only logged)")
    lines += [
        f"regions reaching no token: {sum(len(row['unreached_regions']) for row in rows)}"
        + (" (beside regions of the same response that do)" if gran.enabled else " (unused: granular off)"),
        f"truncated pairs: {sum(row['truncated'] for row in rows)}",
    ]
    lines += [f"  {msg}" for msg in report.first_errors]
    return lines


# ------------------------------------------------------------------------------------------ HTML

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.3em; } h2 { font-size: 1em; margin: 0 0 .4em; } h2 small { color: #555; font-weight: normal; }
.summary { font-family: ui-monospace, monospace; font-size: .85em; white-space: pre-wrap; background: #eef;
  padding: .6em; border-radius: 4px; }
.pair { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .8em 1em; margin: 1em 0; }
.label { font-size: .75em; text-transform: uppercase; color: #555; margin-top: .6em; }
details.prompt-box { margin-top: .6em; }
details.prompt-box > summary { cursor: pointer; font-size: .75em; text-transform: uppercase; color: #555; }
.legend { line-height: 2; }
.legend p { margin: .3em 0; }
.text { font-family: ui-monospace, monospace; font-size: .9em; white-space: pre-wrap; word-break: break-word;
  line-height: 1.9; }
.prompt { color: #444; background: #f4f4f4; padding: .3em; }
.tok { border: 1px solid #bbb; border-radius: 3px; padding: 0 1px; margin: 0 1px 0 0; }
.w-off { color: #595959; }
.w-on { border-color: #66a; }
.w-pos { background: #b9f3c3; border-color: #2a8a3e; color: #0b4d1a; font-weight: 600; }
.w-neg { background: #ffc2c2; border-color: #b02a2a; color: #6b0d0d; font-weight: 600; }
.w-proj { background: #ffe3b0; border-color: #c47f00; font-weight: 600; }
.end { font-size: .75em; font-style: italic; }
.ws { color: #6e6e6e; font-weight: normal; }
.gap { color: #595959; }
.cut { color: #b02a2a; font-style: italic; }
"""
_WS = {" ": '<span class="ws">\u00b7</span>', "\t": '<span class="ws">\u2192</span>\t',
       "\n": '<span class="ws">\u21b5</span>\n', "\r": '<span class="ws">\u240d</span>'}


def _show(text: str) -> str:
    """Escape text for HTML with spaces, tabs and newlines made visible."""
    return re.sub(r"[ \t\n\r]", lambda m: _WS[m.group()], html.escape(text))


def _tok_class(weight: float, flag: int, projected: bool) -> str:
    if flag > 0:
        return "w-pos"
    if flag < 0:
        return "w-neg"
    if projected:
        return "w-proj"
    return "w-on" if weight else "w-off"


def weight_shade(weight: float) -> str:
    """The background of a weighted token outside any region: darker with the weight (0.1 faint, 1 full),
    so `--outside-weight 0.1` looks unlike weight 1. Text stays dark on it (contrast above 7:1)."""
    alpha = 0.08 + 0.37 * min(max(weight, 0.0), 1.0)
    return f"background-color: rgba(70, 70, 220, {alpha:.3f})"


def _tok_span(classes: str, weight: float, title: str, body: str) -> str:
    """One token box: its class, its weight (shade and `data-weight`) and a tooltip with weight and ids."""
    style = f' style="{weight_shade(weight)}"' if classes.endswith("w-on") else ""
    return (f'<span class="tok {classes}" data-weight="{weight:g}"{style} title="{html.escape(title)}">'
            f"{body}</span>")


def render_tokens(text: str, row: dict[str, Any], side: str, tokenizer, weights_key: str | None = None) -> str:
    """One response as boxed tokens. Tokens sharing one char span (byte pieces of an emoji) share a box."""
    ids, offsets = row[f"{side}_ids"], row[f"{side}_offsets"]
    weights, flags = row[weights_key or f"{side}_weights"], row[f"{side}_flags"]
    kl = row.get(f"{side}_kl_weights") if weights_key is None else None  # only where it differs
    projected = row["projected"] if weights_key == "sft_weights" else [False] * len(ids)
    parts, pos, i, n = [], 0, 0, len(ids) - 1  # the last id is the end-of-response token
    while i < n:
        s, e = offsets[i]
        j = i + 1
        while j < n and tuple(offsets[j]) == (s, e) and s < e:
            j += 1
        if s > pos:
            parts.append(f'<span class="gap">{_show(text[pos:s])}</span>')
        piece = text[max(s, pos):e] if e > s else tokenizer.convert_ids_to_tokens(ids[i])
        cls = _tok_class(weights[i], flags[i], projected[i])
        title = (f"weight {weights[i]:g}" + (f" · KL weight {kl[i]:g}" if kl else "")
                 + f" · id{'s' if j - i > 1 else ''} {' '.join(map(str, ids[i:j]))} · chars [{s}, {e})")
        parts.append(_tok_span(cls, weights[i], title, _show(piece)))
        pos, i = max(pos, e), j
    rest = text[pos:]
    if rest.strip() and row.get("truncated"):
        parts.append(f'<span class="cut" title="{len(rest)} characters cut by truncation">[\u2026 cut]</span>')
    elif rest:
        parts.append(f'<span class="gap">{_show(rest)}</span>')
    end_name = tokenizer.convert_ids_to_tokens(ids[-1])
    cls = _tok_class(weights[-1], 0, False)
    kl_note = f" · KL weight {kl[-1]:g}" if kl else ""
    parts.append(_tok_span(f"end {cls}", weights[-1], f"end-of-response token · weight {weights[-1]:g}{kl_note} · id {ids[-1]}",
                           html.escape(end_name)))
    return "".join(parts)


def render_html(title: str, summary: Sequence[str], records, rows, tokenizer, max_pairs: int) -> str:
    """The whole viewer page: summary, legend, then one block per pair."""
    shades = " ".join(f'<span class="tok w-on" style="{weight_shade(w)}" title="weight {w:g}">weight {w:g}</span>'
                      for w in (0.1, 0.5, 1))
    legend = ('<div class="legend"><p><span class="tok w-pos">region in chosen (flag 1)</span> '
              '<span class="tok w-neg">region in rejected (flag -1)</span> '
              f'{shades} <span class="tok w-off">weight 0</span> '
              '— weighted tokens outside a region are shaded by their weight; the last box is the '
              'end-of-response token: weight 1 in a response with a region (include_eos), the unannotated '
              'weight in the other response of an annotated pair; hover any token for its weight and ids; '
              '\u00b7 is a space, \u21b5 a newline.</p>'
              '<p><span class="tok w-proj">projected</span> The row <em>chosen, SFT weights</em> is what SFT '
              '(loss=sft with granular=true) trains on: SFT sees only the chosen response, so each region '
              'flagged -1 (in the rejected response) is projected onto the chosen one through a character '
              'alignment and marks the text that replaced it.</p>'
              '<p>Click <em>prompt</em> on a card to show the prompt as the model sees it.</p></div>')
    blocks = []
    for record, row in zip(records[:max_pairs], rows[:max_pairs]):
        prompt_note = f" as the model sees it ({len(row['prompt_ids'])} tokens{', truncated' if row['truncated'] else ''})"
        prompt = tokenizer.decode(row["prompt_ids"], skip_special_tokens=False)
        block = [f'<section class="pair" id="record-{record.index}">',
                 f"<h2>#{record.index} <small>{html.escape(record.source)}</small></h2>",
                 f'<details class="prompt-box"><summary>prompt{prompt_note}</summary>'
                 f'<div class="text prompt">{_show(prompt)}</div></details>',
                 f'<div class="label">chosen</div><div class="text chosen">'
                 f"{render_tokens(record.chosen, row, 'chosen', tokenizer)}</div>",
                 f'<div class="label">rejected</div><div class="text rejected">'
                 f"{render_tokens(record.rejected, row, 'rejected', tokenizer)}</div>"]
        if record.rejected_regions and row["sft_weights"] != row["chosen_weights"]:
            block.append('<div class="label">chosen, SFT weights (rejected regions projected)</div>'
                         f'<div class="text sft">{render_tokens(record.chosen, row, "chosen", tokenizer, "sft_weights")}</div>')
        blocks.append("\n".join(block) + "\n</section>")
    more = f"<p>showing the first {max_pairs} of {len(records)} pairs</p>" if len(records) > max_pairs else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
            f'<div class="summary">{html.escape(chr(10).join(summary))}</div>\n{legend}\n{more}\n'
            + "\n".join(blocks) + "\n</body></html>\n")


def json_lines(rows: Sequence[dict[str, Any]], tokenizer) -> str:
    """One JSON object per record: response ids, their token strings (each id decoded alone, so a piece
    of a multi-byte character shows as U+FFFD) and weights; prompt excluded, end token included."""
    out = []
    for row in rows:
        line: dict[str, Any] = {"index": row["index"]}
        for side in ("chosen", "rejected"):
            line[f"{side}_ids"] = row[f"{side}_ids"]
            line[f"{side}_tokens"] = [tokenizer.decode([i], skip_special_tokens=False) for i in row[f"{side}_ids"]]
            line[f"{side}_weights"] = row[f"{side}_weights"]
            if f"{side}_kl_weights" in row:  # TDPO's KL weights, where they differ from the margin's
                line[f"{side}_kl_weights"] = row[f"{side}_kl_weights"]
        out.append(json.dumps(line, ensure_ascii=False) + "\n")
    return "".join(out)


# ------------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (0 ok, 1 invalid data, 2 bad arguments or tokenizer)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help or a usage error: argparse already printed why
        return int(e.code or 0)
    try:
        columns = column_option(args.column)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        enc = EncodeOptions(args.max_length, args.max_prompt_length, args.prompt_format, args.truncation_mode)
        gran = GranularOptions(enabled=args.granular, outside_weight=args.outside_weight,
                               unannotated_weight=args.unannotated_weight, include_eos=args.include_eos,
                               kl_weights=args.kl_weights, sides=args.sides, after_first_error=args.after_first_error)
    except ValueError as e:  # the options' checks name config keys: say the flags typed here
        message = str(e)
        for action in sorted(parser._actions, key=lambda a: -len(a.dest)):  # outside_weight before granular
            if action.option_strings:
                message = re.sub(rf"\b(granular\.)?{action.dest}\b", action.option_strings[0], message)
        print(f"error: {message}", file=sys.stderr)
        return 2
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        layout = resolve_layout(tokenizer, enc)
    except Exception as e:  # missing model, no network, slow tokenizer: one line, no traceback
        print(f"error: cannot load tokenizer {args.tokenizer!r}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2

    from granular_po.data.formats import load_data
    from granular_po.data.shape import check_fields, shape_warnings

    try:
        records, report = load_data(args.data, on_invalid=args.on_invalid, eos_text=tokenizer.eos_token,
                                    columns=columns)
        check_fields(report, args.on_invalid)  # a field misspelt in every record: invalid, as at train
    except DataError as e:
        print(f"invalid data: {e}", file=sys.stderr)
        return 1
    rows = encode_all(records, tokenizer, enc, gran, layout)
    if gran.enabled:  # a region that reaches no token: refused or skipped, as train does (build_dataset)
        try:
            keep = admit_reached(records, [row["unreached_regions"] for row in rows], tokenizer, enc,
                                 args.on_invalid, report)
        except DataError as e:
            print(f"invalid data: {e}", file=sys.stderr)
            return 1
        records, rows = [records[k] for k in keep], [rows[k] for k in keep]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else layout.end_token_id
    add_kl_weights(rows, pad, gran)
    summary = summarize(report, records, rows, tokenizer, layout, gran) + shape_warnings(report, records, gran)
    print("\n".join(summary))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(json_lines(rows, tokenizer))
        print(f"wrote {args.json}")
    if args.html:
        page = render_html(f"granular-po inspect: {args.data}", summary, records, rows, tokenizer, args.html_max_pairs)
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(page)
        print(f"wrote {args.html}")
    if not records:
        print("invalid data: no valid record left", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

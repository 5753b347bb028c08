"""`granular-po demo`: the arithmetic-correction experiment end to end, with a report a person reads.

    make demo                                  # = granular-po demo (report in report/)
    granular-po demo --out report --quick      # a smoke run of a few steps

1. data: `data.synthetic` arithmetic-correction pairs, train and eval sharing no question, written as
   research-format JSON into <out>/data/;
2. model: the embedded SmolLM2-135M-Instruct, converted once to a Hugging Face directory, or the local
   model directory given as `--model DIR` (its own tokenizer);
3. SFT, then 4. granular TDPO2 from its output, each through the train entry point users run
   (`python -u -m granular_po.apps.cli train OVERRIDES`, the same as `python -u train.py OVERRIDES`),
   runs in <out>/runs/{demo_sft,demo_tdpo};
5. task accuracy of the base, SFT and final models by greedy generation on the held-out questions;
6. <out>/report.md with the commands, settings, accuracies, preference metrics and PNG curves.

Re-running reuses what is finished: a run whose newest checkpoint is at its final step is not started
again (an unfinished one resumes), and task accuracies are cached per checkpoint in <out>/eval/.

(Over 350 lines: the report's text, tables and plots are most of it; the stages shared with
`compare` live in `stages.py`.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from granular_po.apps.help import DefaultsFormatter
from granular_po.apps.stages import (
    checkpoint_key,
    data_fingerprint,
    evaluate_model,
    hydra_value,
    passive_openmp,
    train_stage,
)
from granular_po.settings import field_docs

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes chosen so the whole demo fits in 20 minutes on 2 CPU cores (see README, 'The demo')."""

    n_train: int = 256
    """Training pairs (questions repeat with other templates and errors)."""
    n_eval: int = 40
    """Held-out questions: the eval split and the task-accuracy questions."""
    seed: int = 0
    """Data, initialisation and data order."""
    mark_correct: bool = True
    """Also highlight the right digits in the correct response (flag 1)."""
    sft_steps: int = 24
    """SFT optimizer steps."""
    sft_batch_size: int = 8
    """SFT examples per step."""
    sft_lr: float = 3e-5
    """SFT learning rate."""
    tdpo_steps: int = 24
    """Granular TDPO2 optimizer steps."""
    tdpo_batch_size: int = 4
    """TDPO pairs per step (a TDPO step costs ~2.5 SFT steps per pair: policy and reference, both responses)."""
    tdpo_lr: float = 5e-6
    """TDPO learning rate (1e-5 made the answers unstable here: accuracy 0.65 after SFT -> 0.525)."""
    beta: float = 0.1
    """TDPO temperature (loss.beta)."""
    alpha: float = 0.5
    """TDPO2 KL weight (loss.alpha)."""
    optimizer: str = "AdamW"
    """AdamW: the research default (SGD, lr 5e-6, 150 warmup steps) barely moves a model in a few dozen steps."""
    warmup_steps: int = 4
    """Linear warmup steps of both stages."""
    max_length: int = 128
    """Prompt (chat template included) + response tokens; ours are ~50."""
    max_prompt_length: int = 96
    """Prompt tokens kept."""
    n_evals: int = 3
    """Trainer evaluations on the eval split per run (SFT: one more, before step 1)."""
    n_eval_pairs: int = 24
    """Eval pairs those evaluations use (task accuracy uses all n_eval questions)."""
    max_new_tokens: int = 48
    """Greedy generation budget per question."""


QUICK = dict(n_train=32, n_eval=8, sft_steps=4, sft_batch_size=4, tdpo_steps=4, tdpo_batch_size=4,
             n_evals=2, n_eval_pairs=8, max_new_tokens=24)


# ---------------------------------------------------------------- stages


def make_data(out: Path, s: DemoSettings) -> tuple[Path, Path, list[dict], list[dict]]:
    """Write <out>/data/{train,eval}.json (deterministic in the settings); returns paths and pairs."""
    from granular_po.data.synthetic import split_train_eval, write_json

    train, evals = split_train_eval(s.n_train, s.n_eval, seed=s.seed, mark_correct=s.mark_correct)
    train_path, eval_path = out / "data" / "train.json", out / "data" / "eval.json"
    for path, pairs in ((train_path, train), (eval_path, evals)):
        if not path.is_file() or json.loads(path.read_text()) != pairs:
            write_json(path, pairs)
    return train_path, eval_path, train, evals


def model_overrides(model: str) -> list[str]:
    return [f"model={DEFAULT_MODEL}"] if model == DEFAULT_MODEL else [f"model.name_or_path={hydra_value(model)}"]


def common_overrides(model: str, train_path: Path, eval_path: Path, runs: Path, s: DemoSettings) -> list[str]:
    return [
        *model_overrides(model), "datasets=[ours]",
        f"custom_train_path={hydra_value(train_path)}", f"custom_eval_path={hydra_value(eval_path)}",
        f"local_dirs=[{hydra_value(runs)}]", f"seed={s.seed}", f"optimizer={s.optimizer}",
        f"warmup_steps={s.warmup_steps}", f"max_length={s.max_length}", f"max_prompt_length={s.max_prompt_length}",
        "eval_batch_size=16", f"n_eval_examples={s.n_eval_pairs}", "trainer=BasicTrainer",
    ]


def schedule_overrides(steps: int, batch_size: int, n_evals: int, lr: float) -> list[str]:
    """steps -> the research code's example counts: n_examples, eval_every; one checkpoint at the end."""
    every = max(1, -(-steps // max(1, n_evals)))
    return [f"batch_size={batch_size}", f"n_examples={steps * batch_size}", f"eval_every={every * batch_size}",
            f"save_every={steps * batch_size}", f"lr={lr:g}"]


def sft_overrides(model: str, train_path: Path, eval_path: Path, runs: Path, s: DemoSettings) -> list[str]:
    return [*common_overrides(model, train_path, eval_path, runs, s), "loss=sft", "granular=false",
            "exp_name=demo_sft", *schedule_overrides(s.sft_steps, s.sft_batch_size, s.n_evals, s.sft_lr)]


def tdpo_overrides(model: str, train_path: Path, eval_path: Path, runs: Path, s: DemoSettings) -> list[str]:
    archive = runs / "demo_sft" / "LATEST"
    return [*common_overrides(model, train_path, eval_path, runs, s), "loss=tdpo", f"loss.alpha={s.alpha:g}",
            f"loss.beta={s.beta:g}", "loss.if_tdpo2=true", "granular=true", "exp_name=demo_tdpo",
            "do_first_eval=false",  # policy = reference before step 1: every reward 0, nothing to measure
            f"model.archive={hydra_value(archive)}",
            *schedule_overrides(s.tdpo_steps, s.tdpo_batch_size, s.n_evals, s.tdpo_lr)]


# ---------------------------------------------------------------- the report

PREFERENCE_KEYS = ("rewards_eval/accuracies", "rewards_eval/margins", "rewards_eval/chosen", "rewards_eval/rejected",
                   "kl_eval/chosen", "kl_eval/rejected", "kl_eval/margin", "loss/eval")


def accuracy_rows(results: dict[str, dict], out: Path) -> list[dict]:
    from granular_po.apps.report import binomial_se

    rows = []
    for label, r in results.items():
        model = Path(r["model"])
        shown = model.resolve().relative_to(out) if model.resolve().is_relative_to(out) else model.name
        rows.append({"model": label, "weights": str(shown), "task accuracy": r["accuracy"],
                     "± s.e.": binomial_se(r["accuracy"], r["n"]), "correct": f"{r['correct']}/{r['n']}"})
    return rows


def write_plots(out: Path, sft_records: list[dict], tdpo_records: list[dict]) -> list[tuple[str, str]]:
    """loss / reward accuracy / margin / KL curves (train and eval vs step); returns (file, caption)."""
    from granular_po.apps.report import curve, plot_curves, plot_panels

    def both(records, train_key, eval_key):
        return {"train": curve(records, train_key, "train"), "eval": curve(records, eval_key, "eval")}

    plot_panels({"stage 1: SFT": both(sft_records, "loss/train", "loss/eval"),
                 "stage 2: granular TDPO2": both(tdpo_records, "loss/train", "loss/eval")},
                out / "loss.png", ylabel="loss", title="loss (SFT: summed negative log-likelihood per response; TDPO2: preference loss)")
    plot_curves(both(tdpo_records, "rewards_train/accuracies", "rewards_eval/accuracies"), out / "reward_accuracy.png",
                title="TDPO2 reward accuracy (chosen reward > rejected reward)", ylabel="accuracy")
    plot_curves(both(tdpo_records, "rewards_train/margins", "rewards_eval/margins"), out / "margins.png",
                title="TDPO2 reward margin (chosen - rejected)", ylabel="margin")
    plot_curves(both(tdpo_records, "kl_train/margin", "kl_eval/margin"), out / "kl.png",
                title="TDPO2 sequential KL margin (chosen - rejected)", ylabel="KL margin")
    return [("loss.png", "Loss, train (every step) and eval"),
            ("reward_accuracy.png", "TDPO2 reward accuracy, train batches and the eval split"),
            ("margins.png", "TDPO2 reward margin"), ("kl.png", "TDPO2 sequential KL margin")]


def preference_rows(records: list[dict]) -> list[dict]:
    """One row per preference metric, one column per evaluation step."""
    from granular_po.apps.report import curve

    evals = {key: dict(zip(*curve(records, key, "eval"))) for key in PREFERENCE_KEYS}
    steps = sorted({step for values in evals.values() for step in values})
    return [{"metric": key, **{f"step {step}": evals[key].get(step) for step in steps}}
            for key in PREFERENCE_KEYS if evals[key]]


def changed_answers(results: dict[str, dict], limit: int = 10) -> list[dict]:
    """Questions where the models disagree on correctness, with each model's (shortened) answer."""
    labels = list(results)
    rows = []
    for i, first in enumerate(results[labels[0]]["rows"]):
        per = [results[label]["rows"][i] for label in labels]
        if len({r["correct"] for r in per}) > 1:
            row = {"question": first["prompt"], "answer": first["answer"]}
            for label, r in zip(labels, per):
                text = r["completion"].strip().replace("\n", " ")
                row[label] = ("✓ " if r["correct"] else "✗ ") + (text[:70] + "…" if len(text) > 70 else text)
            rows.append(row)
    return rows[:limit]


def _settings_rows(s: DemoSettings) -> list[dict]:
    return [
        {"setting": "loss", "SFT": "sft (granular=false)", "TDPO2": f"tdpo, if_tdpo2=true, beta {s.beta:g}, alpha {s.alpha:g}"},
        {"setting": "token weights", "SFT": "every response token",
         "TDPO2": "highlighted digits + end-of-response token (granular=true)"},
        {"setting": "optimizer, lr", "SFT": f"{s.optimizer}, {s.sft_lr:g}", "TDPO2": f"{s.optimizer}, {s.tdpo_lr:g}"},
        {"setting": "steps x pairs per step", "SFT": f"{s.sft_steps} x {s.sft_batch_size}",
         "TDPO2": f"{s.tdpo_steps} x {s.tdpo_batch_size}"},
        {"setting": "warmup steps, max_length", "SFT": f"{s.warmup_steps}, {s.max_length}",
         "TDPO2": f"{s.warmup_steps}, {s.max_length}"},
    ]


def write_report(out: Path, s: DemoSettings, model: str, sft: dict, tdpo: dict, results: dict[str, dict],
                 train_pairs: list[dict], eval_pairs: list[dict], timings: dict[str, float]) -> tuple[Path, str]:
    """Write <out>/report.md and its PNGs; returns (path, the accuracy table)."""
    from granular_po.apps.report import first_value, last_value, markdown_table, read_metrics

    sft_records, tdpo_records = read_metrics(sft["run_dir"]), read_metrics(tdpo["run_dir"])
    plots = write_plots(out, sft_records, tdpo_records)
    table = markdown_table(accuracy_rows(results, out))
    labels = list(results)
    base, final = results[labels[0]], results[labels[-1]]
    pref_rows = preference_rows(tdpo_records)
    sft_eval = (first_value(sft_records, "loss/eval", "eval"), last_value(sft_records, "loss/eval", "eval"))
    runtime = {name: last_value(recs, "train_runtime", "summary") for name, recs in
               (("SFT", sft_records), ("TDPO2", tdpo_records))}
    when_ran = "seconds when it ran"
    time_rows = [
        {"stage": "default model ready (converted once, then read from the cache)" if model == DEFAULT_MODEL
         else "model ready (a local directory)", "seconds": timings["model"]},
        {"stage": "SFT" + (" (reused)" if sft["reused"] else ""), "seconds": timings["sft"],
         when_ran: sft["seconds_when_run"], "Trainer's train_runtime": runtime["SFT"]},
        {"stage": "TDPO2" + (" (reused)" if tdpo["reused"] else ""), "seconds": timings["tdpo"],
         when_ran: tdpo["seconds_when_run"], "Trainer's train_runtime": runtime["TDPO2"]},
        {"stage": "task accuracy of 3 models (cached results are reused)", "seconds": timings["eval"],
         when_ran: sum(r.get("seconds", 0.0) for r in results.values())},
        {"stage": "total, this invocation", "seconds": timings["total"]},
    ]
    example = json.dumps(train_pairs[0], ensure_ascii=False)
    lines = [
        "# granular-po demo: arithmetic correction, SFT then granular TDPO2",
        "",
        f"Model `{model}`; {len(train_pairs)} training pairs, {len(eval_pairs)} held-out questions. "
        f"Task accuracy (greedy generation, exact match of the stated result): base **{base['accuracy']:.3f}**, "
        f"final **{final['accuracy']:.3f}**. These are the figures this run produced; nothing here is asserted "
        "to rise.",
        "",
        "## Task accuracy on the held-out questions",
        "",
        table,
        f"s.e.: the binomial standard error, sqrt(p (1 - p) / n); one question is {1 / max(1, base['n']):.3f} "
        "of accuracy, so differences of a few questions are within noise.",
        "",
        "## Preference metrics of the final run (TDPO2, eval split, from `runs/demo_tdpo/metrics.jsonl`)",
        "",
        "Rewards are beta x the weighted log-ratio (policy vs reference) over the *highlighted* tokens and the "
        "end-of-response token, as trained (granular=true); reward accuracy is the share of eval pairs whose "
        "chosen reward exceeds the rejected one. Before step 1 policy and reference are the same model (every "
        "reward 0, loss log 2), so the first evaluation is after the first steps.",
        "",
        markdown_table(pref_rows, float_format=".4g"),
        f"SFT eval loss (summed negative log-likelihood per response): {sft_eval[0]:.3f} before step 1, "
        f"{sft_eval[1]:.3f} after step {s.sft_steps}." if None not in sft_eval else "SFT eval loss: not logged.",
        "",
        "## Curves",
        "",
        *[f"![{caption}]({name})\n\n*{caption}.*\n" for name, caption in plots],
        "## Answers that differ between the models",
        "",
        markdown_table(changed_answers(results)) or "No question changed correctness.\n",
        "## What ran",
        "",
        f"- Data (`granular_po.data.synthetic`, seed {s.seed}): {len(train_pairs)} training pairs over "
        f"{len({p['prompt'] for p in train_pairs})} distinct prompts, {len(eval_pairs)} eval pairs on other "
        "questions (no question shared, 7 * 8 and 8 * 7 counted as one), in `data/train.json` and `data/eval.json`. "
        "Wrong digits are highlighted with flag -1" + (", the right ones with flag 1" if s.mark_correct else "")
        + f". A training pair:\n\n  ```json\n  {example}\n  ```",
        f"- Stage 1 (run directory `runs/demo_sft`):\n\n  ```bash\n  {sft['command']}\n  ```",
        f"- Stage 2 (run directory `runs/demo_tdpo`, from the stage-1 output):\n\n  ```bash\n  {tdpo['command']}\n  ```",
        "- `python -u train.py` at the repository root takes the same overrides. Steps are given as the research "
        "code's example counts (`n_examples` = steps x `batch_size`; `eval_every` in examples). The trainer's "
        f"evaluations use the first {s.n_eval_pairs} eval pairs (`n_eval_examples`); task accuracy all "
        f"{s.n_eval} eval questions, greedy, at most {s.max_new_tokens} new tokens.",
        f"- Optimizer: {s.optimizer} instead of the research default SGD with lr 5e-6 and 150 warmup steps, which "
        "barely moves the model in a few dozen steps.",
        "",
        markdown_table(_settings_rows(s)),
        "Time on this machine:",
        "",
        markdown_table(time_rows, float_format=".0f"),
        f"Machine: {_machine()}. Re-running `granular-po demo` reuses finished runs and cached accuracies; "
        "`--fresh` retrains.",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path, table


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    d = DemoSettings()
    p = argparse.ArgumentParser(prog="granular-po demo", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--out", default="report", help="report directory (data, runs, eval cache, report.md, PNGs)")
    p.add_argument("--quick", action="store_true", help="a smoke run: a few steps on a few examples")
    p.add_argument("--fresh", action="store_true", help="delete this report's runs and eval cache first")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="DIR",
                   help="the model to run the demo on: smollm2-135m (the embedded SmolLM2-135M-Instruct) or a "
                        "local Hugging Face model directory (a causal LM with its tokenizer, e.g. a run's LATEST)")
    docs = field_docs(DemoSettings)
    for field, value in asdict(d).items():  # default None: "not given", so --quick can change it
        quick = f"; {QUICK[field]} with --quick" if field in QUICK else ""
        shown = str(value).lower() if isinstance(value, bool) else value
        text = f"{docs.get(field, '')} (default: {shown}{quick})"
        if isinstance(value, bool):
            p.add_argument(f"--{field.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=None,
                           help=text)
        else:
            p.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=None, help=text)
    return p


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    s = DemoSettings()
    if args.quick:
        s = replace(s, **QUICK)
    given = {f: getattr(args, f) for f in asdict(s) if getattr(args, f, None) is not None}
    return replace(s, **given)


def model_problem(model: str) -> str | None:
    """Why `--model` cannot run the demo (None: it can): the embedded default, or a local directory with
    a model config and a tokenizer. Checked before any data is written or any stage starts."""
    if model == DEFAULT_MODEL:
        return None
    path = Path(model).expanduser()
    if not path.is_dir():
        return (f"--model {model}: no such directory (give {DEFAULT_MODEL}, the embedded default, or a local "
                "Hugging Face model directory)")
    if not (path / "config.json").is_file():
        return f"--model {model}: not a Hugging Face model directory (no config.json in it)"
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return f"--model {model}: no tokenizer in the directory (tokenizer.json); the demo uses the model's own"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if problem := model_problem(args.model):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.model != DEFAULT_MODEL:  # the training subprocesses and the report see one absolute path
        args.model = str(Path(args.model).expanduser().resolve())
    passive_openmp()
    s = settings_from_args(args)
    out = Path(args.out).resolve()
    runs = out / "runs"
    if args.fresh:
        for sub in (runs / "demo_sft", runs / "demo_tdpo", out / "eval"):
            shutil.rmtree(sub, ignore_errors=True)
    t_start = time.monotonic()
    timings: dict[str, float] = {}

    print(f"[1/6] data: {s.n_train} training pairs, {s.n_eval} held-out questions -> {out / 'data'}", flush=True)
    train_path, eval_path, train_pairs, eval_pairs = make_data(out, s)
    fingerprint = data_fingerprint(train_path, eval_path)

    print(f"[2/6] model: {args.model}", flush=True)
    t = time.monotonic()
    from granular_po.models import resolve_model_path

    base_dir = Path(resolve_model_path(args.model))
    timings["model"] = time.monotonic() - t

    print("[3/6] stage 1: SFT", flush=True)
    sft = train_stage("SFT", sft_overrides(args.model, train_path, eval_path, runs, s), runs / "demo_sft",
                      s.sft_steps, fingerprint)
    print("[4/6] stage 2: granular TDPO2 from the SFT model", flush=True)
    sft_key = checkpoint_key(runs / "demo_sft" / "LATEST")  # a retrained SFT model invalidates stage 2
    tdpo = train_stage("TDPO2", tdpo_overrides(args.model, train_path, eval_path, runs, s), runs / "demo_tdpo",
                       s.tdpo_steps, f"{fingerprint}|{sft_key}")
    timings["sft"], timings["tdpo"] = sft["seconds"], tdpo["seconds"]

    print("[5/6] task accuracy by greedy generation", flush=True)
    from granular_po.apps.eval import questions_from_pairs

    questions = questions_from_pairs(eval_pairs)
    t = time.monotonic()
    models = {"base": base_dir, "SFT": runs / "demo_sft" / "LATEST", "final (SFT + TDPO2)": runs / "demo_tdpo" / "LATEST"}
    results = {label: evaluate_model(path, questions, out / "eval" / f"{i}.json", s.max_new_tokens, label,
                                     tokenizer_dir=base_dir)
               for i, (label, path) in enumerate(models.items())}
    timings["eval"] = time.monotonic() - t

    print("[6/6] report", flush=True)
    timings["total"] = time.monotonic() - t_start
    path, table = write_report(out, s, args.model, sft, tdpo, results, train_pairs, eval_pairs, timings)
    print(f"\nreport: {path}\n\ntask accuracy on {len(questions)} held-out questions (greedy):\n{table}")
    print(f"total {timings['total'] / 60:.1f} min", flush=True)
    return 0


def _machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return f"{device}; {platform.python_implementation()} {platform.python_version()}, torch {torch.__version__}"


if __name__ == "__main__":
    raise SystemExit(main())

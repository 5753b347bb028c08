"""`granular-po compare`: {DPO, TDPO2} x {granular, response-level} from one SFT checkpoint.

    granular-po compare                       # the demo's data and SFT run (made if missing), out: report/compare
    granular-po compare --sft report/runs/demo_sft --train report/data/train.json --eval report/data/eval.json \
        --steps 24 --lr-granular 2e-5 --lr-response 5e-6 --out report/compare

Every cell trains from the same SFT weights on the same data with the same steps, batch size and seed;
only the loss, the token weights (`granular=true|false`) and, when asked, the learning rate differ.
The grid runs as Hydra multiruns of the train entry point, one per learning rate (granular and
response-level halves), with `exp_name=cmp_${loss.name}_g${granular.enabled}` naming each cell's run.
A cell whose run already ended at the final step is reused. Task accuracy is measured at every saved
checkpoint (cached in <out>/eval/), eval reward accuracy read from each run's metrics.jsonl; the
table goes to <out>/compare.md, the plots beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from granular_po.apps.demo import (
    DEFAULT_MODEL,
    QUICK,
    DemoSettings,
    common_overrides,
    make_data,
    sft_overrides,
)
from granular_po.apps.help import DefaultsFormatter
from granular_po.apps.stages import (
    check_stamp,
    checkpoint_key,
    data_fingerprint,
    evaluate_model,
    finished,
    hydra_value,
    passive_openmp,
    run_stage,
    shown_command,
    train_command,
    train_stage,
)
from granular_po.training import checkpoints

LOSSES = ("dpo", "tdpo")
LOSS_LABELS = {"dpo": "DPO", "tdpo": "TDPO2"}
EXP_NAME = "cmp_${loss.name}_g${granular.enabled}"  # resolved per job by Hydra: cmp_tdpo_gTrue, ...


@dataclass(frozen=True)
class Cell:
    loss: str
    granular: bool

    @property
    def exp_name(self) -> str:
        return f"cmp_{self.loss}_g{self.granular}"

    @property
    def label(self) -> str:
        return f"{LOSS_LABELS[self.loss]}, {'granular' if self.granular else 'response-level'}"


CELLS = tuple(Cell(loss, granular) for loss in LOSSES for granular in (True, False))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="granular-po compare", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--sft", default=None, help="SFT run directory, or a model directory (its LATEST, step-N); "
                   "default: the demo's SFT run in --demo-out (trained first when missing)")
    p.add_argument("--train", default=None, help="training pairs (default: the demo's data)")
    p.add_argument("--eval", default=None, help="eval pairs: eval split and task-accuracy questions (default: "
                   "the demo's)")
    p.add_argument("--out", default="report/compare", help="runs, eval cache, compare.md and plots")
    p.add_argument("--demo-out", default="report", help="where the demo's data and SFT run live")
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per cell")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step")
    p.add_argument("--lr", type=float, default=5e-6, help="learning rate of every cell")
    p.add_argument("--lr-granular", type=float, default=None, help="learning rate of the granular cells "
                   "(default: --lr)")
    p.add_argument("--lr-response", type=float, default=None, help="learning rate of the response-level cells "
                   "(default: --lr)")
    p.add_argument("--optimizer", default="AdamW", help="torch.optim class of every cell")
    p.add_argument("--warmup-steps", type=int, default=2, help="linear warmup steps of every cell")
    p.add_argument("--beta", type=float, default=0.1, help="DPO / TDPO temperature (loss.beta)")
    p.add_argument("--alpha", type=float, default=0.5, help="TDPO2's KL weight")
    p.add_argument("--checkpoints", type=int, default=2, help="saved checkpoints per cell (task accuracy at each)")
    p.add_argument("--evals", type=int, default=4, help="evaluations on the eval split per cell (reward accuracy)")
    p.add_argument("--n-eval", type=int, default=None, help="task accuracy on the first N eval questions "
                   "(default: all)")
    p.add_argument("--n-eval-pairs", type=int, default=24, help="eval pairs of the trainer's preference evaluation")
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy generation budget per question")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    p.add_argument("--quick", action="store_true", help="a smoke run: 4 steps, 2 checkpoints")
    p.add_argument("--fresh", action="store_true", help="delete this comparison's runs and eval cache first")
    p.add_argument("--model", default=DEFAULT_MODEL, help=argparse.SUPPRESS)  # tests: a tiny base model dir
    return p


def sft_model_dir(sft: str) -> Path:
    """An SFT run directory -> its LATEST; a model directory as it is (resolved, so it cannot move)."""
    path = Path(sft).expanduser()
    if (path / checkpoints.LATEST).exists():
        path = path / checkpoints.LATEST
    if not (path / "config.json").is_file():
        raise SystemExit(f"--sft {sft}: neither a run directory with LATEST nor a Hugging Face model directory")
    return path.resolve()


def demo_sft(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """The demo's data and SFT run (trained now when missing): (train, eval, SFT model dir)."""
    from dataclasses import replace

    s = DemoSettings(seed=args.seed)
    if args.quick:
        s = replace(s, **QUICK)
    out = Path(args.demo_out).resolve()
    train_path, eval_path, _, _ = make_data(out, s)
    if args.sft is None:
        runs = out / "runs"
        print(f"SFT checkpoint: the demo's ({runs / 'demo_sft'})", flush=True)
        train_stage("SFT", sft_overrides(args.model, train_path, eval_path, runs, s), runs / "demo_sft",
                    s.sft_steps, data_fingerprint(train_path, eval_path))
        return train_path, eval_path, (runs / "demo_sft" / checkpoints.LATEST).resolve()
    return train_path, eval_path, sft_model_dir(args.sft)


def grid_overrides(args, train_path: Path, eval_path: Path, sft: Path, runs: Path) -> list[str]:
    """Overrides shared by every cell (loss, granular and lr are added per half)."""
    s = DemoSettings(seed=args.seed, optimizer=args.optimizer, warmup_steps=args.warmup_steps,
                     n_eval_pairs=args.n_eval_pairs)
    save = max(1, -(-args.steps // max(1, args.checkpoints)))
    every = max(1, -(-args.steps // max(1, args.evals)))
    return [
        *common_overrides(args.model, train_path, eval_path, runs, s), f"model.archive={hydra_value(sft)}",
        f"++loss.beta={args.beta:g}", "++loss.if_tdpo2=true", f"++loss.alpha={args.alpha:g}",
        "do_first_eval=false",  # policy = reference before step 1: every reward 0
        f"batch_size={args.batch_size}", f"n_examples={args.steps * args.batch_size}",
        f"eval_every={every * args.batch_size}", f"save_every={save * args.batch_size}",
    ]


def sweep_groups(todo: list[Cell]) -> list[list[Cell]]:
    """Cells to train as multiruns: one sweep when they form a full loss x granular product, else one per
    granular value (a sweep always runs the whole product, and finished cells must not be retrained)."""
    if not todo:
        return []
    losses = dict.fromkeys(c.loss for c in todo)
    granulars = dict.fromkeys(c.granular for c in todo)
    if len(todo) == len(losses) * len(granulars):
        return [todo]
    return [[c for c in todo if c.granular == g] for g in granulars]


def run_grid(args, shared: list[str], runs: Path, out: Path, fingerprint: str) -> dict[str, float]:
    """One Hydra multirun per learning rate over the cells that are not finished; returns seconds per half."""
    lrs = {True: args.lr_granular or args.lr, False: args.lr_response or args.lr}
    halves = {lr: [g for g in (True, False) if lrs[g] == lr] for lr in dict.fromkeys(lrs.values())}
    seconds, commands = {}, []
    for lr, granulars in halves.items():
        todo = []
        for cell in (c for c in CELLS if c.granular in granulars):
            overrides = [*shared, f"loss={cell.loss}", f"granular={str(cell.granular).lower()}", f"lr={lr:g}"]
            check_stamp(runs / cell.exp_name, {"overrides": overrides, "data": fingerprint}, cell.label)
            if finished(runs / cell.exp_name, args.steps):
                print(f"{cell.label}: reusing {runs / cell.exp_name} (finished at step {args.steps})", flush=True)
            else:
                todo.append(cell)
        for group in sweep_groups(todo):
            half = "_".join(dict.fromkeys("granular" if c.granular else "response" for c in group))
            sweep = [
                "-m", f"loss={','.join(dict.fromkeys(c.loss for c in group))}",
                f"granular={','.join(dict.fromkeys(str(c.granular).lower() for c in group))}",
                f"lr={lr:g}", f"exp_name={EXP_NAME}",
                f"hydra.sweep.dir={hydra_value(out / 'hydra' / half)}", "hydra.sweep.subdir=${exp_name}",
                *shared,
            ]
            print(f"grid ({half}, lr {lr:g}): {shown_command(sweep)}", flush=True)
            seconds[f"grid {half}"] = run_stage(train_command(sweep), f"grid ({half})")
            commands.append(shown_command(sweep))
            missing = [c.label for c in group if not finished(runs / c.exp_name, args.steps)]
            if missing:
                raise SystemExit(f"the multirun ended without a final checkpoint for {missing}")
    if commands:  # appended: an invocation that reuses cells keeps the record of what trained them
        out.mkdir(parents=True, exist_ok=True)
        path = out / "commands.txt"
        old = path.read_text().splitlines() if path.is_file() else []
        path.write_text("\n".join(dict.fromkeys(old + commands)) + "\n")
    return seconds


def evaluate_cells(runs: Path, out: Path, sft: Path, questions, max_new_tokens: int) -> dict[str, dict[int, dict]]:
    """Task accuracy of the SFT model (step 0 of every cell) and of each cell's saved checkpoints."""
    start = evaluate_model(sft, questions, out / "eval" / "sft.json", max_new_tokens, "SFT (step 0)")
    table = {}
    for cell in CELLS:
        table[cell.exp_name] = {0: start}
        for step, path in checkpoints.complete_checkpoints(runs / cell.exp_name):
            table[cell.exp_name][step] = evaluate_model(
                path, questions, out / "eval" / cell.exp_name / f"step-{step}.json", max_new_tokens,
                f"{cell.label}, step {step}")
    return table


def write_outputs(args, out: Path, runs: Path, sft: Path, accuracy: dict[str, dict[int, dict]],
                  timings: dict[str, float], n_questions: int) -> tuple[Path, str]:
    """compare.md, task_accuracy.png, eval_reward_accuracy.png, eval_margin.png; returns (path, table)."""
    from granular_po.apps.report import (
        binomial_se,
        curve,
        last_value,
        markdown_table,
        plot_curves,
        read_metrics,
    )

    rows, task_curves, reward_curves, margin_curves = [], {}, {}, {}
    for cell in CELLS:
        records = read_metrics(runs / cell.exp_name)
        by_step = accuracy[cell.exp_name]
        steps = sorted(by_step)
        task_curves[cell.label] = (steps, [by_step[s]["accuracy"] for s in steps])
        reward_curves[cell.label] = curve(records, "rewards_eval/accuracies", "eval")
        margin_curves[cell.label] = curve(records, "rewards_eval/margins", "eval")
        final = by_step[steps[-1]]
        rows.append({
            "cell": cell.label, "lr": f"{(args.lr_granular if cell.granular else args.lr_response) or args.lr:g}",
            "steps": steps[-1], "task accuracy, SFT": by_step[0]["accuracy"], "task accuracy, final": final["accuracy"],
            "± s.e.": binomial_se(final["accuracy"], final["n"]), "correct": f"{final['correct']}/{final['n']}",
            "eval reward accuracy": last_value(records, "rewards_eval/accuracies", "eval"),
            "eval margin": last_value(records, "rewards_eval/margins", "eval"),
            "eval KL margin": last_value(records, "kl_eval/margin", "eval"),
        })
    plot_curves(task_curves, out / "task_accuracy.png", title="task accuracy (greedy, held-out questions)",
                ylabel="accuracy")
    plot_curves(reward_curves, out / "eval_reward_accuracy.png", title="eval reward accuracy", ylabel="accuracy")
    plot_curves(margin_curves, out / "eval_margin.png", title="eval reward margin", ylabel="margin")
    table = markdown_table(rows, float_format=".3f")
    commands = (out / "commands.txt").read_text().strip() if (out / "commands.txt").is_file() else ""
    lines = [
        "# granular-po compare: {DPO, TDPO2} x {granular, response-level}",
        "",
        f"From `{sft}`: {args.steps} steps x {args.batch_size} pairs per cell, seed {args.seed}, "
        f"{args.optimizer}, beta {args.beta:g} (TDPO2: alpha {args.alpha:g}). Task accuracy by greedy generation "
        f"on {n_questions} held-out questions; eval reward metrics on the eval split from each run's metrics.jsonl, "
        "under the cell's own token weights (granular: highlighted tokens and end-of-response token; "
        "response-level: every response token), so they compare within a row, not across the granular axis.",
        "",
        table,
        "s.e.: binomial standard error of the final task accuracy, sqrt(p (1 - p) / n).",
        "",
        "![task accuracy vs steps](task_accuracy.png)",
        "",
        "![eval reward accuracy vs steps](eval_reward_accuracy.png)",
        "",
        "![eval reward margin vs steps](eval_margin.png)",
        "",
        "## Commands",
        "",
        "```bash",
        commands or "# no command recorded",
        "```",
        "",
        "Hydra multirun, one call per learning rate; DPO ignores the `loss.if_tdpo2` and `loss.alpha` keys added "
        f"for TDPO2. Runs in `{runs}`. Seconds this invocation: "
        + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + ".",
        "",
    ]
    path = out / "compare.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path, table


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    passive_openmp()
    if args.quick:
        args.steps, args.checkpoints, args.evals = min(args.steps, 4), min(args.checkpoints, 2), min(args.evals, 2)
    out = Path(args.out).resolve()
    runs = out / "runs"
    if args.fresh:
        for sub in [out / "eval", out / "hydra", *(runs / c.exp_name for c in CELLS)]:
            shutil.rmtree(sub, ignore_errors=True)
        (out / "commands.txt").unlink(missing_ok=True)
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    if args.train is None or args.eval is None:
        train_path, eval_path, sft = demo_sft(args)
        train_path = Path(args.train).resolve() if args.train else train_path
        eval_path = Path(args.eval).resolve() if args.eval else eval_path
    else:
        train_path, eval_path = Path(args.train).resolve(), Path(args.eval).resolve()
        sft = sft_model_dir(args.sft) if args.sft else demo_sft(args)[2]
    timings["SFT"] = time.monotonic() - t0
    fingerprint = f"{data_fingerprint(train_path, eval_path)}|{checkpoint_key(sft)}"
    shared = grid_overrides(args, train_path, eval_path, sft, runs)
    timings.update(run_grid(args, shared, runs, out, fingerprint))

    from granular_po.apps.eval import questions_from_pairs, read_pairs

    questions = questions_from_pairs(read_pairs(eval_path))[: args.n_eval]
    t = time.monotonic()
    accuracy = evaluate_cells(runs, out, sft, questions, args.max_new_tokens)
    timings["task accuracy"] = time.monotonic() - t
    timings["total"] = time.monotonic() - t0
    path, table = write_outputs(args, out, runs, sft, accuracy, timings, len(questions))
    (out / "timings.json").write_text(json.dumps(timings, indent=1))
    print(f"\n{path}\n\n{table}\ntotal {timings['total'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

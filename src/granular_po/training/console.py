"""What a person reads while a run trains: one line per logging step, one progress bar, no escapes in logs.

`ConsoleCallback` replaces the Trainer's `ProgressCallback`, which prints every log as a dict of
strings (`{'loss': '0.6931', ...}`) and moves the cursor up (`\\x1b[A`) to redraw nested bars, which a
log file keeps as garbage. Here:
- a terminal (stdout and stderr both TTYs) gets one training bar, with metric lines printed above it;
- anything else (a pipe, a log file) gets plain lines only, and the libraries' own bars are turned off;
- a line shows the metrics a person follows, numbers as numbers; every metric still goes to
  `metrics.jsonl` (`MetricsFileCallback`).
"""

from __future__ import annotations

import math
import sys
import time

from transformers import TrainerCallback

# (metric key, label) in the order a line shows them; `{split}` is train or eval. Keys absent from a
# log (no KL for DPO, no rewards for SFT) are left out of its line.
LINE_METRICS = (
    ("loss/{split}", "loss"),
    ("nll_per_token/{split}", "nll/token"),  # SFT: the per-token figure TRL reports as its loss
    ("rewards_{split}/accuracies", "reward acc"),
    ("rewards_{split}/margins", "margin"),
    ("kl_{split}/margin", "kl margin"),
    ("grad_norm", "grad norm"),
    ("learning_rate", "lr"),
    ("nonfinite_skipped", "non-finite steps skipped"),
)


def interactive() -> bool:
    """Progress bars only where a person watches a terminal; a pipe or a log file gets plain lines."""
    return all(getattr(stream, "isatty", lambda: False)() for stream in (sys.stdout, sys.stderr))


def quiet_library_bars() -> None:
    """Turn off the progress bars of datasets, transformers and huggingface_hub (for non-terminals):
    they redraw with carriage returns and leave one line per update in a log file."""
    import datasets
    import huggingface_hub
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def number(value: float) -> str:
    """A metric as a number a person reads: 4 significant digits, integers without a decimal point."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or (math.isfinite(value) and value == int(value) and abs(value) < 1e6):
        return str(int(value))
    return f"{value:.4g}"


def metric_line(logs: dict, split: str) -> str:
    """The shown metrics of one log, `label value` pairs separated by two spaces."""
    parts = []
    for key, label in LINE_METRICS:
        value = logs.get(key.format(split=split))
        if value is not None:
            parts.append(f"{label} {number(value)}")
    return "  ".join(parts)


class ConsoleCallback(TrainerCallback):
    """One line per logging step (train lines at most every `minimum_interval` seconds; evaluations, the
    first and the last step always), one training bar on a terminal; remembers the last metrics."""

    def __init__(self, minimum_interval: float = 0.0, bars: bool | None = None, out=None):
        self.minimum_interval = minimum_interval
        self.bars = interactive() if bars is None else bars
        self.out = out
        self.train_bar = None
        self.eval_bar = None
        self.last_train: dict = {}
        self.last_eval: dict = {}
        self.summary: dict = {}
        self._last_print = -math.inf

    def _print(self, text: str) -> None:
        out = self.out or sys.stdout
        if self.train_bar is not None:
            self.train_bar.write(text, file=out)
        else:
            print(text, file=out, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.bars:
            from tqdm.auto import tqdm

            self.train_bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training",
                                  unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.train_bar is not None:
            self.train_bar.update(state.global_step - self.train_bar.n)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not (state.is_world_process_zero and self.bars and self.train_bar is not None):
            return
        if self.eval_bar is None:
            from tqdm.auto import tqdm

            total = len(eval_dataloader) if eval_dataloader is not None else None
            self.eval_bar = tqdm(total=total, desc="evaluating", leave=False, dynamic_ncols=True)
        self.eval_bar.update(1)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        width = len(str(state.max_steps))
        if "train_runtime" in logs:  # the Trainer's closing summary: shown in the end block
            self.summary = dict(logs)
        elif any(key.startswith(("eval_", "loss/eval")) for key in logs):
            self.last_eval = {**logs, "step": state.global_step}
            self._print(f"eval  {state.global_step:>{width}}/{state.max_steps}  {metric_line(logs, 'eval')}")
        else:
            self.last_train = {**logs, "step": state.global_step}
            now = time.monotonic()
            edge = state.global_step in (1, state.max_steps)
            if edge or now - self._last_print >= self.minimum_interval:
                self._last_print = now
                speed = logs.get("examples_per_second")
                tail = f"  {number(speed)} ex/s" if speed else ""
                self._print(f"step  {state.global_step:>{width}}/{state.max_steps}  "
                            f"{metric_line(logs, 'train')}{tail}")

    def on_train_end(self, args, state, control, **kwargs):
        for bar in (self.eval_bar, self.train_bar):
            if bar is not None:
                bar.close()
        self.eval_bar = self.train_bar = None

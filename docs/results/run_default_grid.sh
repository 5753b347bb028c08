#!/usr/bin/env bash
# The default grid of `granular-po compare` (issue 15) on both tasks, each task with its own SFT model
# trained on its own training split. Seeds are interleaved (seed 0 of both tasks, then seed 1 of both,
# ...), so a stopped job leaves both tasks with the same seeds finished. Resumable: run it again after
# a stop and every finished run, score and SFT model is reused (each `--seeds k` invocation reuses
# the runs of the one before; the last one is exactly the default grid). Run from the repository root:
#   nohup bash docs/results/run_default_grid.sh > report/default-grid.log 2>&1 &
# or, as the reports in docs/results were made, one job per task on one core each (two one-thread
# processes use two cores better than one two-thread process at this model size):
#   for task in styled arithmetic; do TASKS=$task OMP_NUM_THREADS=1 \
#     nohup bash docs/results/run_default_grid.sh >> report/default-grid-$task.log 2>&1 & done
# FROZEN_SRC points at a copy of src/ taken at the start, so edits made while it runs cannot reach it.
set -euo pipefail
export PYTHONPATH="${FROZEN_SRC:-$PWD/src}" HF_HUB_OFFLINE=1
for seeds in 1 2 3; do
  for task in ${TASKS:-styled arithmetic}; do
    echo "=== $(date -u +%H:%M:%S) task $task: default grid, seeds $seeds"
    .venv/bin/granular-po compare --task "$task" --out "report/compare-$task" --seeds "$seeds"
  done
done
echo "=== $(date -u +%H:%M:%S) done"

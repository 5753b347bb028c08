#!/usr/bin/env bash
# The default grid of `granular-po compare` (issue 15) on both tasks, one after the other, each task
# with its own SFT model trained on its own training split. Resumable: run it again after a stop and
# every finished run, score and SFT model is reused. Run from the repository root:
#   nohup bash docs/results/run_default_grid.sh > report/default-grid.log 2>&1 &
# FROZEN_SRC points at a copy of src/ taken at the start, so edits made while it runs cannot reach it.
set -euo pipefail
export PYTHONPATH="${FROZEN_SRC:-$PWD/src}" HF_HUB_OFFLINE=1
for task in ${TASKS:-styled arithmetic}; do
  echo "=== $(date -u +%H:%M:%S) task $task: default grid"
  .venv/bin/granular-po compare --task "$task" --out "report/compare-$task"
done
echo "=== $(date -u +%H:%M:%S) done"

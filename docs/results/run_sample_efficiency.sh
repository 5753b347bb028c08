#!/usr/bin/env bash
# Issue 15 item 5: sample efficiency of the best granular and response-level cells, after the default
# grid of `docs/results/run_default_grid.sh` (same --out: every grid run is reused, only the 32- and
# 128-pair runs of the two validation-best cells are trained and scored). Resumable like the grid.
# Run from the repository root, one job per task on one core each:
#   for task in styled arithmetic; do TASKS=$task OMP_NUM_THREADS=1 \
#     nohup bash docs/results/run_sample_efficiency.sh >> report/sample-efficiency-$task.log 2>&1 & done
# WAIT_FOR: a PID (the task's grid job) to wait for first. FROZEN_SRC: as in run_default_grid.sh.
set -euo pipefail
export PYTHONPATH="${FROZEN_SRC:-$PWD/src}" HF_HUB_OFFLINE=1
if [ -n "${WAIT_FOR:-}" ]; then
  while kill -0 "$WAIT_FOR" 2>/dev/null; do sleep 30; done
fi
for task in ${TASKS:-styled arithmetic}; do
  echo "=== $(date -u +%H:%M:%S) task $task: sample efficiency, --pairs ${PAIRS:-32,128}"
  .venv/bin/granular-po compare --task "$task" --out "report/compare-$task" --seeds 3 --pairs "${PAIRS:-32,128}"
done
echo "=== $(date -u +%H:%M:%S) done"

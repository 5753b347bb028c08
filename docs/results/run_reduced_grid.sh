#!/usr/bin/env bash
# The reduced grid run for docs/results/ (issue 15): both tasks, one seed at a time, interleaved, so a
# stopped job leaves each task with the same seeds finished. Every invocation reuses the finished runs
# of the one before (same overrides) and rewrites the task's compare.md. Run from the repository root:
#   nohup bash docs/results/run_reduced_grid.sh > report/reduced-grid.log 2>&1 &
set -euo pipefail
# the code as it was at the start (later edits to the worktree do not reach a running grid)
export PYTHONPATH="${FROZEN_SRC:-$PWD/src}"
REDUCED=(--losses tdpo --adamw 3,10 --sgd '' --steps 12 --n-val 32 --n-test 200 --sft-steps 24
         --n-eval-pairs 16 --max-new-tokens 40)
for seeds in 1 2 3; do
  for task in styled arithmetic; do
    echo "=== $(date -u +%H:%M:%S) task $task, seeds $seeds"
    granular-po compare --task "$task" --out "report/compare-$task" --seeds "$seeds" "${REDUCED[@]}"
  done
done
echo "=== $(date -u +%H:%M:%S) done"

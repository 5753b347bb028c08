#!/usr/bin/env bash
# The reduced grid run for docs/results/reduced/ (issue 15): both tasks, one seed at a time, interleaved, so a
# stopped job leaves both tasks with the same seeds finished. Every invocation reuses the finished runs
# of the one before (same overrides) and rewrites the task's compare.md. One SFT model (trained on the
# styled task's training split) is the start of every run of both tasks. Run from the repository root:
#   nohup bash docs/results/reduced/run_reduced_grid.sh > report/reduced-grid.log 2>&1 &
set -euo pipefail
# the code as it was at the start (later edits to the worktree do not reach a running grid)
export PYTHONPATH="${FROZEN_SRC:-$PWD/src}"
REDUCED=(--losses tdpo --adamw 10 --sgd '' --steps 8 --n-val 32 --n-test 200 --sft-steps 24
         --n-eval-pairs 16 --max-new-tokens 40 --eval-batch-size 64)
for seeds in 1 2 3; do
  echo "=== $(date -u +%H:%M:%S) task styled, seeds $seeds"
  granular-po compare --task styled --out report/compare-styled --seeds "$seeds" "${REDUCED[@]}"
  echo "=== $(date -u +%H:%M:%S) task arithmetic, seeds $seeds"
  granular-po compare --task arithmetic --out report/compare-arithmetic --sft report/compare-styled/runs/sft \
    --seeds "$seeds" "${REDUCED[@]}"
done
echo "=== $(date -u +%H:%M:%S) done"

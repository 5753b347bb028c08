#!/usr/bin/env bash
# The decisive experiment, Part B (docs/results/decisive/PLAN.md): QA-FEEDBACK's human error spans.
# From the repository root, after Part A (the anchored arm is the one Part A's primary metric favours at
# confound 1.0; ANCHORED overrides it, default granular-klall as the plan says when Part A is unfinished).
# Resumable: run it again after any stop; every finished run and score is reused.
#   nohup bash docs/results/decisive/commands_qa.sh >> report/decisive/qa.log 2>&1 &
# The data: examples/qa_feedback/dev.jsonl, written by
#   granular-po import qa-feedback dev_feedback.json examples/qa_feedback/dev.jsonl   (question only)
# 481 pairs kept of 500 (examples/qa_feedback/README.md). One pass of SFT over the training split's
# corrections: 385 pairs / 8 = 48 steps.
set -euo pipefail
export PYTHONPATH="${FROZEN_SRC:-$PWD/src}" HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
anchored="${ANCHORED:-granular-klall: loss=tdpo granular=true granular.kl_weights=all}"
echo "=== $(date -u +%H:%M:%S) QA-FEEDBACK, anchored arm: $anchored"
.venv/bin/granular-po compare --data examples/qa_feedback/dev.jsonl --split 0.8,0.1,0.1 --split-seed 0 \
  --sft-steps 48 --sft-batch-size 8 --sft-lr 3e-5 \
  --base-lr 5e-6 --adamw 1 --sgd '' --steps 16 --batch-size 4 --seeds 3 \
  --max-length 384 --max-prompt-length 256 --max-new-tokens 128 --n-eval-pairs 8 --rouge \
  --out report/decisive/qa-feedback \
  --arm 'response: loss=tdpo granular=false' \
  --arm 'granular: loss=tdpo granular=true' \
  --arm "$anchored"
echo "=== $(date -u +%H:%M:%S) done"

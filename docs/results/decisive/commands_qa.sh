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
# Code: a frozen copy of src/ at 5167d26 (named here before any Part B run; Part A's frozen 21c4035 has
# no `compare --data`), so later edits on main cannot reach the runs:
#   git worktree add /work/frozen-qa-wt 5167d26 && cp -r /work/frozen-qa-wt/src /work/frozen/src-qa \
#     && echo 5167d26 > /work/frozen/src-qa.commit
# Amended once, after seed 0 (see the results README, "What we learned while it ran"): 5167d26's report step
# crashed on data without answers and two arms (task accuracy paired as None - None) after seed 0 had been
# trained and scored. The runs resumed from 688a6b9, whose src/ differs from 5167d26 in that report step only
# (`git diff 5167d26 688a6b9 -- src`: two lines of compare/report.py); training and scoring are 5167d26's:
#   git archive 688a6b9 src | tar -x -C /tmp/fx && mv /tmp/fx/src /work/frozen/src-qa2 \
#     && echo 688a6b9 > /work/frozen/src-qa2.commit
set -euo pipefail
frozen="${FROZEN_SRC:-/work/frozen/src-qa2}"
if [ "$(cat "$frozen.commit" 2>/dev/null)" != 688a6b9 ]; then
  echo "Part B runs from src/ at 688a6b9 in $frozen (with $frozen.commit): create it as above" >&2; exit 2
fi
export PYTHONPATH="$frozen" HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
anchored="${ANCHORED:-granular-klall: loss=tdpo granular=true granular.kl_weights=all}"
echo "=== $(date -u +%H:%M:%S) QA-FEEDBACK, code $(cat "$frozen.commit"), anchored arm: $anchored"
.venv/bin/granular-po compare --data examples/qa_feedback/dev.jsonl --split 0.8,0.1,0.1 --split-seed 0 \
  --sft-steps 48 --sft-batch-size 8 --sft-lr 3e-5 \
  --base-lr 5e-6 --adamw 1 --sgd '' --steps 16 --batch-size 4 --seeds 3 \
  --max-length 384 --max-prompt-length 256 --max-new-tokens 128 --n-eval-pairs 8 --rouge \
  --out report/decisive/qa-feedback \
  --arm 'response: loss=tdpo granular=false' \
  --arm 'granular: loss=tdpo granular=true' \
  --arm "$anchored"
echo "=== $(date -u +%H:%M:%S) done"

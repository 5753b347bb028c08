#!/usr/bin/env bash
# The decisive experiment, Part A (docs/results/decisive/PLAN.md), exactly as run. From the repository root.
# Resumable: run it again after any stop; every finished run and score is reused.
#
# 1. The SFT model: the default grid's styled SFT recipe, trained once with main at 330d54e (before
#    issue 20's fixes, as the default grid trained it: AdamW 3e-5, 24 steps x 8, weight decay 0):
#      cp -r src /work/frozen/src-sft
#      PYTHONPATH=/work/frozen/src-sft HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python docs/results/decisive/make_sft.py
# 2. The arms, from a frozen copy of src/ at 21c4035 (main with the objective options, compare's arms and
#    issue 20's precision / optimizer / eval fixes), one job per confound, one thread each:
#      cp -r src /work/frozen/src-exp      # at 21c4035
#      for c in 1.0 0.75; do CONFOUND=$c nohup bash docs/results/decisive/commands.sh \
#        >> report/decisive/styled-c$c.log 2>&1 & done
set -euo pipefail
export PYTHONPATH="${FROZEN_SRC:-/work/frozen/src-exp}" HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
c="${CONFOUND:?set CONFOUND=1.0 or 0.75}"
echo "=== $(date -u +%H:%M:%S) confound $c, code $(cat "${FROZEN_SRC:-/work/frozen/src-exp}.commit" 2>/dev/null || echo '?')"
.venv/bin/granular-po compare --task styled --confound "$c" --highlight digits \
  --sft report/decisive/sft-base/runs/sft/LATEST \
  --adamw 3 --sgd '' --seeds 8 --n-eval-pairs 8 \
  --out "report/decisive/styled-c$c" \
  --arm 'response: loss=tdpo granular=false' \
  --arm 'granular: loss=tdpo granular=true' \
  --arm 'granular-klall: loss=tdpo granular=true granular.kl_weights=all' \
  --arm 'granular-klall-nll: loss=tdpo granular=true granular.kl_weights=all loss.nll_alpha=1.0'
echo "=== $(date -u +%H:%M:%S) done"

#!/usr/bin/env bash
# Follow-up to Part A (docs/results/decisive/PLAN_nll.md): Part A's confound-1.0 command with a fifth arm,
# response-level TDPO2 + RPO's NLL term, from Part A's frozen code (src/ at 21c4035) and SFT model. The
# four recorded arms are reused (run directories with their results are not retrained); only the new
# arm's 8 runs are trained and scored. From the repository root, after commands.sh's confound 1.0:
#   setsid nohup bash docs/results/decisive/commands_nll.sh >> report/decisive/styled-c1.0-nll.log 2>&1 &
# Resumable: run it again after any stop; every finished run and score is reused.
set -euo pipefail
frozen="${FROZEN_SRC:-/work/frozen/src-exp}"
case "$(cat "$frozen.commit" 2>/dev/null)" in
  21c4035*) ;;
  *) echo "the follow-up runs from Part A's frozen src/ at 21c4035 in $frozen (see commands.sh)" >&2; exit 2 ;;
esac
export PYTHONPATH="$frozen" HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
echo "=== $(date -u +%H:%M:%S) follow-up: response-nll at confound 1.0, code $(cat "$frozen.commit")"
.venv/bin/granular-po compare --task styled --confound 1.0 --highlight digits \
  --sft report/decisive/sft-base/runs/sft/LATEST \
  --adamw 3 --sgd '' --seeds 8 --n-eval-pairs 8 \
  --out report/decisive/styled-c1.0 \
  --arm 'response: loss=tdpo granular=false' \
  --arm 'granular: loss=tdpo granular=true' \
  --arm 'granular-klall: loss=tdpo granular=true granular.kl_weights=all' \
  --arm 'granular-klall-nll: loss=tdpo granular=true granular.kl_weights=all loss.nll_alpha=1.0' \
  --arm 'response-nll: loss=tdpo granular=false loss.nll_alpha=1.0'
echo "=== $(date -u +%H:%M:%S) done"

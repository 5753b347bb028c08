#!/usr/bin/env bash
# The GPU check of issue 14, in one command, with nothing fetched (no network needed):
#
#   bash bench/gpu_check.sh             # on a CUDA machine: ~5 min on one H100 (budget: 8)
#   bash bench/gpu_check.sh --dry-run   # the same steps on a tiny model on the CPU (~1 min; CI runs it)
#
# 1. a random-weight model of SmolLM2-1.7B's shape, built from its config with the embedded SmolLM2
#    tokenizer (bench/make_model.py);
# 2. bench/step.py --device cuda --dtype bf16 at 4 pairs x 1024 tokens, AdamW: our SFT, DPO, TDPO2
#    chunked / naive / granular against TRL's DPOTrainer (synchronised step times, peak CUDA memory);
# 3. chunked vs naive token statistics in bf16 autocast: values, gradients (against float64) and peak
#    memory (bench/stats_check.py);
# 4. one FSDP2 step of granular TDPO2 through torchrun, one process per GPU.
# The report goes to bench/gpu_results.md (dry run: $GPU_CHECK_DIR/gpu_results.md) with the device's name.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; fi
WORK=${GPU_CHECK_DIR:-$(mktemp -d -t gpu-check-XXXX)}
mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY" = 1 ]; then
  SHAPE=tiny DEVICE=cpu SEQ=32 BATCH=1 STEPS=1 WARMUP=0 NPROC=1 OUT="$WORK/gpu_results.md"
  STEP_EXTRA=(--in-process --no-micro)  # warm-up 0: one step each, the code paths only
  STATS=(--device cpu --rows 2 --seq-len 32 --hidden 64)
  export CUDA_VISIBLE_DEVICES=""
else
  SHAPE=smollm2-1.7b DEVICE=cuda SEQ=1024 BATCH=4 STEPS=3 WARMUP=1 OUT=bench/gpu_results.md
  STEP_EXTRA=()
  STATS=(--device cuda --rows 8 --seq-len 1024 --hidden 2048)
  NPROC=$("$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: use --dry-run'; print(torch.cuda.device_count())")
fi
stamp() { echo "[$(date +%H:%M:%S)] $*"; }

stamp "model: $SHAPE"
"$PY" bench/make_model.py --shape "$SHAPE" --out "$WORK/model"

stamp "step times and memory: ours against TRL ($DEVICE, bf16, $BATCH pairs x $SEQ tokens)"
"$PY" bench/step.py --model "$WORK/model" --device "$DEVICE" --dtype bf16 --batch "$BATCH" --seq-len "$SEQ" \
  --optimizer AdamW --steps "$STEPS" --warmup "$WARMUP" --configs trl-dpo,dpo,tdpo,tdpo-naive,tdpo-gran,sft \
  --out "$WORK/step.md" "${STEP_EXTRA[@]}"

stamp "chunked vs naive statistics in bf16"
"$PY" bench/stats_check.py "${STATS[@]}" --vocab 49152 > "$WORK/stats.md"

stamp "one FSDP2 step ($NPROC process(es))"
"$PY" - "$WORK/pairs.json" "$BATCH" "$SEQ" <<'PYEOF'
import json, sys
sys.path.insert(0, "bench")
from workloads import make_pairs
path, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
open(path, "w").write(json.dumps(make_pairs(batch, words_per_response=2 * seq)))
PYEOF
FSDP_START=$(date +%s)
"$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" train.py \
  model.name_or_path="$WORK/model" model.block_name=LlamaDecoderLayer trainer=FSDPTrainer datasets=[ours] \
  custom_train_path="$WORK/pairs.json" local_dirs=["$WORK/runs"] exp_name=fsdp debug=true loss=tdpo \
  loss.beta=0.1 loss.if_tdpo2=true granular=true batch_size="$BATCH" n_examples="$BATCH" max_length="$SEQ" \
  max_prompt_length=$((SEQ / 4)) optimizer=AdamW lr=5e-6 warmup_steps=0 do_first_eval=false \
  > "$WORK/fsdp.log" 2>&1 || { tail -40 "$WORK/fsdp.log"; exit 1; }
FSDP_SECONDS=$(( $(date +%s) - FSDP_START ))
FSDP_LINE=$(grep -E "^step +1/1" "$WORK/fsdp.log" | tail -1 || true)
[ -n "$FSDP_LINE" ] || { tail -40 "$WORK/fsdp.log"; echo "the FSDP run logged no step"; exit 1; }

DEVICE_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU (dry run)')")
{
  echo "# GPU check (issue 14): $DEVICE_NAME"
  echo
  echo "\`bash bench/gpu_check.sh$([ "$DRY" = 1 ] && echo ' --dry-run')\`, $(date '+%Y-%m-%d %H:%M'); model: random weights of the $SHAPE shape, SmolLM2 tokenizer."
  echo
  sed 's/^# Benchmark/## Step benchmark/' "$WORK/step.md"
  echo
  echo "## Token statistics"
  echo
  cat "$WORK/stats.md"
  echo
  echo "## FSDP2"
  echo
  echo "One step of granular TDPO2 over $NPROC process(es) (torchrun, trainer=FSDPTrainer), ${FSDP_SECONDS} s including start-up: \`$FSDP_LINE\`"
  grep -E "notice: trainer=FSDPTrainer" "$WORK/fsdp.log" | head -1 | sed 's/^/(/; s/$/)/' || true
} > "$OUT"
stamp "report: $OUT"

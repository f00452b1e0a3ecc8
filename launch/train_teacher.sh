#!/usr/bin/env bash
# Pretrain a bundled teacher from scratch on this interpreter's Python standard library, export it to
# Hugging Face format with its tokenizer, measure its held-out loss and write its model card.
#
#   bash launch/train_teacher.sh dense|moe OUT_DIR [--set section.key=value ...]
#
# Steps: corpus + SentencePiece tokenizer (DATA_DIR, reused when unchanged) -> megatron datasets ->
# `teacher init` (config.json + tokenizer = model.hf_dir, random_init) -> training with the lm objective
# (launch/recipes/teacher_KIND.yaml under torchrun) -> checkpoints_tools/mcore_to_hf.py --dtype bfloat16
# -> `teacher card` (held-out loss on the valid split, README.md + teacher_card.json in OUT_DIR).
#
# Env (defaults: the recipe, sized for one H100):
#   STEPS  SEQ_LENGTH  MICRO_BATCH  GLOBAL_BATCH  LR  EVAL_INTERVAL   training overrides
#   DATA_DIR (runs/teacher_data)  RUN_DIR (runs/teacher_KIND)  VOCAB_SIZE (4096)
#   OVERWRITE=1   replace an existing OUT_DIR       RESUME=1   continue RUN_DIR's checkpoints
#   PLATFORM, NPROC_PER_NODE, PYTHON, ...: launch/common.sh
# Examples:
#   PLATFORM=cuda bash launch/train_teacher.sh dense megatron_attnedit/assets/teachers/qwen3-tiny-stdlib
#   PLATFORM=cpu STEPS=3 SEQ_LENGTH=128 MICRO_BATCH=2 GLOBAL_BATCH=2 EVAL_INTERVAL=2 \
#     bash launch/train_teacher.sh moe /tmp/teacher_moe        # a smoke test, ~2 minutes on 2 cores
set -euo pipefail
if [ $# -lt 2 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
fi
KIND=$1
OUT_DIR=$2
shift 2
case "$KIND" in
  dense|moe) ;;
  *) echo "error: KIND must be dense or moe (got '$KIND')" >&2; exit 2 ;;
esac
if [ -e "$OUT_DIR/config.json" ] && [ "${OVERWRITE:-0}" != 1 ]; then
  echo "error: $OUT_DIR already holds a model; set OVERWRITE=1 to replace it" >&2
  exit 2
fi
COMMAND_ENV=$(env | grep -E '^(PLATFORM|STEPS|SEQ_LENGTH|MICRO_BATCH|GLOBAL_BATCH|LR|EVAL_INTERVAL|VOCAB_SIZE|NPROC_PER_NODE)=' | sort | tr '\n' ' ' || true)
COMMAND="${COMMAND_ENV}bash launch/train_teacher.sh $KIND $OUT_DIR${*:+ $*}"

source "$(dirname "$0")/common.sh"   # resolves PLATFORM; sets ROOT, PY, PYTHONPATH, run_torchrun
DATA_DIR=${DATA_DIR:-runs/teacher_data}
RUN_DIR=${RUN_DIR:-runs/teacher_$KIND}
VOCAB_SIZE=${VOCAB_SIZE:-4096}

echo "[teacher] 1/5 corpus + tokenizer in $DATA_DIR" >&2
"$PY" -m megatron_attnedit.teacher data --out "$DATA_DIR" --vocab-size "$VOCAB_SIZE"

echo "[teacher] 2/5 datasets" >&2
"$PY" -m megatron_attnedit.teacher datasets --corpus "$DATA_DIR/corpus" --tokenizer-dir "$DATA_DIR/tokenizer" \
  --out "$DATA_DIR/datasets"
SPLIT=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["split"])' "$DATA_DIR/datasets/datasets.json")

if [ "${RESUME:-0}" != 1 ] && [ -d "$RUN_DIR" ]; then
  if [ ! -f "$RUN_DIR/.train_teacher" ]; then
    echo "error: $RUN_DIR exists and was not made by train_teacher.sh; remove it or set RUN_DIR" >&2
    exit 2
  fi
  rm -rf "$RUN_DIR"   # a fresh run: a stale checkpoint of another schedule must not be resumed
fi
mkdir -p "$RUN_DIR"
touch "$RUN_DIR/.train_teacher"
"$PY" -m megatron_attnedit.teacher init --kind "$KIND" --tokenizer-dir "$DATA_DIR/tokenizer" --out "$RUN_DIR/init"

SETS=(model.hf_dir="$RUN_DIR/init" data.data_path="[$DATA_DIR/datasets/train_valid]" data.split="$SPLIT"
      data.tokenizer_dir="$DATA_DIR/tokenizer" training.run_dir="$RUN_DIR")
[ -n "${STEPS:-}" ] && SETS+=(training.train_iters="$STEPS")
[ -n "${SEQ_LENGTH:-}" ] && SETS+=(data.seq_length="$SEQ_LENGTH")
[ -n "${MICRO_BATCH:-}" ] && SETS+=(data.micro_batch_size="$MICRO_BATCH")
[ -n "${GLOBAL_BATCH:-}" ] && SETS+=(data.global_batch_size="$GLOBAL_BATCH")
[ -n "${LR:-}" ] && SETS+=(optimizer.lr="$LR" optimizer.min_lr="$("$PY" -c "print($LR / 10)")")
[ -n "${EVAL_INTERVAL:-}" ] && SETS+=(training.eval_interval="$EVAL_INTERVAL")
if [ -n "${STEPS:-}" ]; then   # keep warmup below a short schedule
  SETS+=(optimizer.lr_warmup_iters="$(( STEPS / 10 ))")
fi

echo "[teacher] 3/5 training ($PLATFORM)" >&2
START=$(date +%s)
( run_torchrun --recipe "$ROOT/launch/recipes/teacher_$KIND.yaml" --set objective.name=lm "${SETS[@]}" "$@" )
TRAIN_SECONDS=$(( $(date +%s) - START ))

echo "[teacher] 4/5 export to $OUT_DIR" >&2
OVER=()
[ "${OVERWRITE:-0}" = 1 ] && OVER=(--overwrite)
"$PY" "$ROOT/checkpoints_tools/mcore_to_hf.py" --load-dir "$RUN_DIR/checkpoints" --save-dir "$OUT_DIR" --dtype bfloat16 \
  --no-progress "${OVER[@]}"

echo "[teacher] 5/5 held-out loss + model card" >&2
"$PY" -m megatron_attnedit.teacher card --hf-dir "$OUT_DIR" --kind "$KIND" --corpus "$DATA_DIR/corpus" \
  --datasets "$DATA_DIR/datasets" --run-dir "$RUN_DIR" --train-seconds "$TRAIN_SECONDS" --command "$COMMAND" \
  --device "$([ "$PLATFORM" = cuda ] && echo cuda || echo cpu)"

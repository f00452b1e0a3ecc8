# Shared by launch/pretrain.sh and launch/distill.sh (sourced, not run): environment defaults for
# torchrun and the accelerator, then `run_torchrun ARGS...` starts `python -m megatron_attnedit.train`.
#
# Env (launcher concerns only; everything about the run is in the recipe):
#   NNODES (1)  NODE_RANK (0)  MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)
#   NPROC_PER_NODE (all visible GPUs / NPUs, 1 on CPU)
#   PLATFORM   auto | cuda | npu | cpu   (auto: npu if torch_npu works, else cuda if a GPU, else cpu)
#   PYTHON     interpreter (default: the one launch/install.sh installed into, launch/python.sh)
#   Ascend:    ASCEND_RT_VISIBLE_DEVICES (0..NPROC_PER_NODE-1), ASCEND_HOME (/usr/local/Ascend),
#              HCCL_CONNECT_TIMEOUT (1200), HCCL_EXEC_TIMEOUT (1200), HCCL_IF_IP / HCCL_SOCKET_IFNAME if set
#   GPU:       CUDA_VISIBLE_DEVICES, NCCL_* as usual; CUDA_DEVICE_MAX_CONNECTIONS=1 (megatron TP overlap)

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT/launch/python.sh"
PY=$(attnedit_python)
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
PLATFORM=${PLATFORM:-auto}

if [ "$PLATFORM" = auto ]; then
  PLATFORM=$("$PY" -c 'from megatron_attnedit.platform import detect; print(detect())' 2>/dev/null || echo cpu)
fi

case "$PLATFORM" in
  npu)
    # CANN toolkit environment (compiler, runtime, HCCL); the docker image sets it already.
    ASCEND_HOME=${ASCEND_HOME:-/usr/local/Ascend}
    for f in "$ASCEND_HOME/ascend-toolkit/set_env.sh" "$ASCEND_HOME/nnal/atb/set_env.sh"; do
      # shellcheck disable=SC1090
      [ -f "$f" ] && source "$f"
    done
    if [ -z "${NPROC_PER_NODE:-}" ]; then
      NPROC_PER_NODE=$("$PY" -c 'import torch, torch_npu; print(torch.npu.device_count())' 2>/dev/null || echo 8)
    fi
    export ASCEND_RT_VISIBLE_DEVICES=${ASCEND_RT_VISIBLE_DEVICES:-$(seq -s, 0 $((NPROC_PER_NODE - 1)))}
    export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
    export HCCL_EXEC_TIMEOUT=${HCCL_EXEC_TIMEOUT:-1200}
    export CUDA_DEVICE_MAX_CONNECTIONS=1   # MindSpeed reads the CUDA name too
    export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-2}
    export CPU_AFFINITY_CONF=${CPU_AFFINITY_CONF:-1}
    ;;
  cuda)
    if [ -z "${NPROC_PER_NODE:-}" ]; then
      NPROC_PER_NODE=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
    fi
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}   # NVLink multicast off
    ;;
  cpu)
    NPROC_PER_NODE=${NPROC_PER_NODE:-1}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    ;;
  *)
    echo "error: PLATFORM=$PLATFORM; use auto, cuda, npu or cpu" >&2
    exit 2
    ;;
esac

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=${WANDB_MODE:-offline}
export TOKENIZERS_PARALLELISM=false

run_torchrun() {
  echo "[launch] node $NODE_RANK/$NNODES, $NPROC_PER_NODE process(es) on $PLATFORM, master $MASTER_ADDR:$MASTER_PORT" >&2
  # Static rendezvous on MASTER_ADDR:MASTER_PORT: the same command on every node, NODE_RANK differs.
  exec "$PY" -m torch.distributed.run \
    --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$NPROC_PER_NODE" \
    --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
    -m megatron_attnedit.train --set training.platform="$PLATFORM" "$@"
}

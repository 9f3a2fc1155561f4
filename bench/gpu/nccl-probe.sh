#!/bin/bash
# Multi-GPU with NCCL under the CUDA checkpoint driver API (the step thaw's GPU pipeline takes for
# every process: lock -> checkpoint -> ... -> restore -> unlock), in place, without CRIU: WORLD
# ranks (one process per GPU, bench/gpu/nccl_rank.py) form an NCCL process group and all-reduce;
# every rank is locked and checkpointed (GPU memory into host memory, GPUs released), then restored
# and unlocked; then they all-reduce again. Variants: NCCL's defaults (P2P over NVLink, CUDA IPC
# memory), NCCL_P2P_DISABLE=1 [NCCL_SHM_DISABLE=1] (no peer memory [nor shared host memory]: sockets
# over loopback), and reinit: NCCL's defaults with the group destroyed before the checkpoint and
# formed again after the restore (what pre-checkpoint / post-restore hooks would do).
#
#   WORLDS="2 4" VARIANTS="default p2p-shm-off p2p-off" MIB=1024 bash bench/gpu/nccl-probe.sh
#
# (GPU machine, repository root; NVLink multicast (NVLS) is kept off in every variant.)
#
# Prints one RESULT line per world and variant; logs under $OUT.
set -u
# NVLink multicast stays off whatever a variant sets (it can take a shared host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/thaw-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/nccl.log") 2>&1
TC=$(pwd)/native/cuda/thaw-cuda
make -s -C native/cuda && $TC --version
nvidia-smi --query-gpu=index,name,driver_version,memory.used --format=csv
nvidia-smi topo -m 2>/dev/null | head -8
python3 -c 'import torch; print("torch", torch.__version__, "nccl", torch.cuda.nccl.version(), "gpus", torch.cuda.device_count())'
ms() { python3 -c "print(round(($2-$1)*1000))"; }

run() { # WORLD VARIANT ENV...
  local world=$1 variant=$2; shift 2
  local ctl; ctl=$(mktemp -d)
  local pids=() r
  echo "=== world $world, $variant"
  for ((r = 0; r < world; r++)); do
    env "$@" NCCL_DEBUG=WARN MIB="${MIB:-1024}" python3 bench/gpu/nccl_rank.py "$r" "$world" "$ctl/init" "$ctl" >"$ctl/out.$r" 2>"$ctl/err.$r" &
    pids+=($!)
  done
  for ((i = 0; i < 600; i++)); do [ "$(ls "$ctl"/ready.* 2>/dev/null | wc -l)" -eq "$world" ] && break; sleep 0.1; done
  if [ "$(ls "$ctl"/ready.* 2>/dev/null | wc -l)" -ne "$world" ]; then
    echo "RESULT world=$world variant=$variant stage=init ok=0"; tail -5 "$ctl"/err.*; kill -9 "${pids[@]}" 2>/dev/null; return
  fi
  cat "$ctl"/ready.*; echo
  local stage=done rc t0 t1 t2
  t0=$(date +%s.%N)
  for p in "${pids[@]}"; do $TC --action lock --pid "$p" --timeout 10000 || { stage=lock; break; }; done
  [ $stage = done ] && for p in "${pids[@]}"; do $TC --action checkpoint --pid "$p" || { stage=checkpoint; break; }; done
  t1=$(date +%s.%N)
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader | tr '\n' ' '; echo
  if [ $stage = done ]; then
    for p in "${pids[@]}"; do $TC --action restore --pid "$p" || { stage=restore; break; }; done
  fi
  for p in "${pids[@]}"; do $TC --get-state --pid "$p"; $TC --action unlock --pid "$p" 2>/dev/null; done
  t2=$(date +%s.%N)
  touch "$ctl/go"
  local ok=1
  # Ranks left checkpointed by a failed restore never finish: no waiting for them.
  [ $stage = done ] || { kill -9 "${pids[@]}" 2>/dev/null; ok=0; }
  for ((r = 0; r < world; r++)); do
    if ! timeout 60 tail --pid="${pids[$r]}" -f /dev/null; then ok=0; fi
    cat "$ctl/out.$r"; grep -v '^\s*$' "$ctl/err.$r" | tail -3
    grep -q '"ok_after": true' "$ctl/out.$r" && grep -q '"weights_same": true' "$ctl/out.$r" || ok=0
  done
  kill -9 "${pids[@]}" 2>/dev/null
  echo "RESULT world=$world variant=$variant stage=$stage ok=$ok checkpoint_ms=$(ms "$t0" "$t1") restore_ms=$(ms "$t1" "$t2")"
  rm -rf "$ctl"
}

variant_env() {
  case $1 in
    default) ;;
    p2p-shm-off) echo NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 ;;
    p2p-off) echo NCCL_P2P_DISABLE=1 ;;
    shm-off) echo NCCL_SHM_DISABLE=1 ;;
    reinit) echo REINIT=1 ;; # NCCL's defaults, the group destroyed before the checkpoint, formed after
  esac
}
for w in ${WORLDS:-2}; do
  for v in ${VARIANTS:-default p2p-shm-off}; do
    # shellcheck disable=SC2046 # the variant's VAR=VALUE words
    run "$w" "$v" $(variant_env "$v") NCCL_NVLS_ENABLE=0
  done
done
grep '^RESULT' "$OUT/nccl.log"

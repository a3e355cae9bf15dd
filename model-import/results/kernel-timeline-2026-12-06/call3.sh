#!/usr/bin/env bash
# Call 3: the kernel timeline of stage 2 and stage 1 with the products on cubecl's stream (call 2
# left the injection library's directory off LD_LIBRARY_PATH), and stage 2 with the flag route
# (LLAVA_JP_GEMM=cublaslt-flags) in the same call, ours only. Carry .dev (as call 2).
CALL=${CALL:-call3} BINARIES=""
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-400}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
mkdir -p /tmp/cupti && xz -dc .dev/cupti/libcupti.so.12.xz > /tmp/cupti/libcupti.so.12
cp .dev/cupti/libkernel_timeline.so /tmp/cupti/
export LLAVA_JP_CUPTI=/tmp/cupti/libcupti.so.12
timeline() {  # name stage steps analysis-steps [env...]
  local name=$1 stage=$2 steps=$3 range=$4; shift 4
  CAP=${CAP:-100} train_run $name $stage $steps TORCH=0 CUDA_INJECTION64_PATH=/tmp/cupti/libkernel_timeline.so \
    KERNEL_TIMELINE_OUT=$out/$name.tsv LD_LIBRARY_PATH=/tmp/cupti:$LD_LIBRARY_PATH "$@"
  local f=$(ls -S $out/$name.tsv.* 2>/dev/null | head -1)
  [ -n "$f" ] || { echo "== $name: no timeline written"; return; }
  python3 model-import/scripts/kernel_timeline.py "$f" --steps $range --top 25 > "$out/$name-idle.txt"
  head -40 "$out/$name-idle.txt"
  xz -T4 -6 "$f"
}
CAP=90 timeline stage2 2 8 3-7
CAP=90 timeline stage2-flags 2 8 3-7 LLAVA_JP_GEMM=cublaslt-flags
CAP=60 timeline stage1 1 6 3-5
losses
finish

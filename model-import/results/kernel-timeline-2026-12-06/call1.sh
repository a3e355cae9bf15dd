#!/usr/bin/env bash
# Call 1: where the device idles in a full-size training step. Our stage 2 and stage 1 runs
# (ours only) under model-import/scripts/kernel_timeline.c (CUPTI's activity records through
# CUDA_INJECTION64_PATH: every kernel's start and end on one clock), then kernel_timeline.py's
# idle gaps, by the kernels around them. Carry .dev (llava-jp.xz, tokenizer/, cupti/:
# libkernel_timeline.so and libcupti.so.12.xz of the nvidia-cuda-cupti-cu12 12.9 wheel).
CALL=${CALL:-call1} BINARIES=""
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-300}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
mkdir -p /tmp/cupti && xz -dc .dev/cupti/libcupti.so.12.xz > /tmp/cupti/libcupti.so.12
cp .dev/cupti/libkernel_timeline.so /tmp/cupti/
timeline() {  # name stage steps analysis-steps
  local name=$1 stage=$2 steps=$3 range=$4
  CAP=${CAP:-120} train_run $name $stage $steps TORCH=0 CUDA_INJECTION64_PATH=/tmp/cupti/libkernel_timeline.so \
    KERNEL_TIMELINE_OUT=$out/$name.tsv LD_LIBRARY_PATH=/tmp/cupti:$LD_LIBRARY_PATH
  local f=$(ls -S $out/$name.tsv.* 2>/dev/null | head -1)
  [ -n "$f" ] || { echo "== $name: no timeline written"; return; }
  python3 model-import/scripts/kernel_timeline.py "$f" --steps $range --top 30 | tee "$out/$name-idle.txt"
  xz -T4 -6 "$f"
}
timeline stage2 2 8 3-7
timeline stage1 1 6 3-5
finish

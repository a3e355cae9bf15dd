#!/usr/bin/env bash
# Call 3 (branch issue8-kernels-unverified, after call 2 passes): stage 1 (32 x 608) and stage 2
# (8 x 1024) beside PyTorch, then stage 1 again with the flash forward at three blocks per SM
# (FORWARD_MIN_BLOCKS=3: more occupancy, but ptxas spills ~0.8 KB a thread) against the
# default two.
# Carry .dev with llava-jp.xz and tokenizer/tokenizer.json.
CALL=call3 BINARIES=""
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
rm -f /tmp/llava-jp
CAP=170 train_run stage1 1 8
CAP=190 train_run stage2 2 10
CAP=150 train_run stage1-forward3 1 8 TORCH=0 LLAVA_JP_FLASH_DEFINES=FORWARD_MIN_BLOCKS=3
finish

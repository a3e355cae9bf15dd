#!/usr/bin/env bash
# Call 2: full-size stage 1 (batch 32 x 608; the projector trained, the loss back-propagated
# through the frozen LLM), ours with cuBLASLt products and the optimizer kernels, then PyTorch,
# through model-import/scripts/gpu_bench_train.sh. Carry .dev with llava-jp.xz.
CALL=call2 BINARIES=""
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
OURS_TIMEOUT=$(( $(left) - 90 )) timeout $(( $(left) - 10 )) bash model-import/scripts/gpu_bench_train.sh "$out/stage1" 1 ${STEPS:-8}
finish

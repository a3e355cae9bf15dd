#!/usr/bin/env bash
# Call 2: GPT-2's attention from its fused projection as one operation
# (src/flash.rs `try_attention_from_qkv`): its test, then full-size stage 2 (8 x 1024, 40
# steps) with every fused operation on and the GPU's busy share sampled, PyTorch after it, then
# a short run under cubecl's per-kernel profile (PROFILE=1) for the breakdown. cuBLASLt
# products. Also lists the profilers the machine has. Carry .dev with train-test.xz and
# llava-jp.xz.
CALL=call2 BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
for tool in nsys ncu perf gdb py-spy; do echo "$tool: $(command -v $tool || ls /usr/local/cuda*/bin/$tool 2>/dev/null || echo none)"; done
train_tests ${TESTS:-qkv_attention_matches_the_split_route_on_cuda}
train_run fused 2 ${STEPS:-40} TORCH=${TORCH:-1}
train_run profile 2 6 TORCH=0 PROFILE=1
finish

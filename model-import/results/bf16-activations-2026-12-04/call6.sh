#!/usr/bin/env bash
# Call 6: the binary of 50e7eec (comments, and the flash source without its unused Vec16): the
# flash kernels still compile and match the split route, and the autocast affine its burn form.
# Carry .dev with train-test.xz.
CALL=call6 BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
TEST_TIMEOUT=90 train_tests qkv_attention_matches_the_split_route_on_cuda autocast_affine_matches_burn_on_cuda
finish

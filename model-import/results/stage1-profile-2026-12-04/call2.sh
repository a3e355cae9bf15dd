#!/usr/bin/env bash
# Call 2: the tower's quick GELU and the plain residual adds as kernels of our own, LayerNorm
# writing bf16 for the product under autocast. The CUDA tests of the operations touched, training
# parity with PyTorch (both stages, CUDA bf16), then stage 1 (32 x 608) and stage 2 (8 x 1024)
# beside PyTorch.
# Carry .dev with llava-jp.xz, train-test.xz and tokenizer/tokenizer.json.
CALL=call2 BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
export LLAVA_JP_TOKENIZER=$PWD/.dev/tokenizer/tokenizer.json
rm -f /tmp/llava-jp
TEST_TIMEOUT=90 train_tests fused_quick_gelu_matches_pytorch_roundings_on_cuda fused_residual_add_is_exact_on_cuda \
  fused_layer_norm_matches_burn_on_cuda fused_gelu_matches_burn_on_cuda autocast_affine_matches_burn_on_cuda
t=$(( $(left) - 330 )); [ $t -gt 150 ] && t=150
timeout $t bash model-import/scripts/gpu_train_parity.sh "$out/parity" "2 1" "cuda:bf16" 2>&1 | grep -E "==|ours:|max|mean|panicked" | head -20
CAP=150 train_run stage1 1 8
CAP=170 train_run stage2 2 10
finish

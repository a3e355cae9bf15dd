#!/usr/bin/env bash
# Call 2: linear layers' outputs in bf16 under autocast (PyTorch's autocast semantics), the
# flash kernels writing token-major output and qkv's gradient in place, and their K / V / Q / dO
# tiles by cp.async. The CUDA tests of the operations it touches (the autocast affine, the
# residual dropout with a bf16 branch, the chunked loss against its new reference, GELU, the
# qkv attention against the split route), training parity with PyTorch (both stages, CUDA
# bf16), then stage 2 at 8 x 1024 beside PyTorch.
# Carry .dev with llava-jp.xz, train-test.xz and tokenizer/tokenizer.json.
CALL=call2 BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
export LLAVA_JP_TOKENIZER=$PWD/.dev/tokenizer/tokenizer.json
rm -f /tmp/llava-jp
TEST_TIMEOUT=90 train_tests qkv_attention_matches_the_split_route_on_cuda autocast_affine_matches_burn_on_cuda \
  fused_residual_dropout_follows_its_mask_on_cuda linear_cross_entropy_matches_burn_on_cuda fused_gelu_matches_burn_on_cuda
t=$(( $(left) - 240 )); [ $t -gt 200 ] && t=200
timeout $t bash model-import/scripts/gpu_train_parity.sh "$out/parity" "2 1" "cuda:bf16" 2>&1 | grep -E "==|ours:|max|mean|panicked" | head -20
CAP=230 train_run stage2 2 12
finish

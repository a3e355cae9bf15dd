#!/usr/bin/env bash
# (This first call stopped on a dtype mismatch in the vision tower's patch embedding: a bf16
# product concatenated with the f32 class embedding; fixed before call 2.)
# Call 1: linear layers' outputs in bf16 under autocast (PyTorch's autocast semantics). The CUDA
# tests of the operations it touches (the autocast affine, the residual dropout with a bf16
# branch, GELU, the chunked loss against its new reference, the qkv attention, the
# checkpointed run against the plain one), then training parity with PyTorch (both stages,
# CUDA bf16).
# Carry .dev with llava-jp.xz, train-test.xz and tokenizer/tokenizer.json.
CALL=call1 BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
export LLAVA_JP_TOKENIZER=$PWD/.dev/tokenizer/tokenizer.json
rm -f /tmp/llava-jp
TEST_TIMEOUT=90 train_tests autocast_affine_matches_burn_on_cuda fused_residual_dropout_follows_its_mask_on_cuda \
  linear_cross_entropy_matches_burn_on_cuda fused_gelu_matches_burn_on_cuda qkv_attention_matches_the_split_route_on_cuda
t=$(( $(left) - 10 )); [ $t -gt 220 ] && t=220
timeout $t bash model-import/scripts/gpu_train_parity.sh "$out/parity" "2 1" "cuda:bf16" 2>&1 | grep -E "==|ours:|max|mean" | head -20
t=$(( $(left) - 10 )); [ $t -gt 150 ] && t=150
[ $t -gt 40 ] && TEST_TIMEOUT=$t train_tests gradient_checkpointing_gives_the_same_run_on_cuda
finish

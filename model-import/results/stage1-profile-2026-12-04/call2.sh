#!/usr/bin/env bash
# Call 2 (branch issue8-kernels-unverified; not yet run: no GPU was lent after call 1): the
# CUDA tests of the kernels written this session (the tower's quick GELU, the plain residual
# add, LayerNorm writing bf16 and its block-per-row kernels, the flash forward's prefetching
# loop through the qkv attention test), the fuzzer's CUDA legs on attention (right-padded masks
# reach the forward's reload path), then training parity with PyTorch (both stages, CUDA bf16).
# Carry .dev with train-test.xz, backend-fuzz.xz, llava-jp.xz and tokenizer/tokenizer.json.
CALL=call2 BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
export LLAVA_JP_TOKENIZER=$PWD/.dev/tokenizer/tokenizer.json
rm -f /tmp/llava-jp
TEST_TIMEOUT=90 train_tests fused_quick_gelu_matches_pytorch_roundings_on_cuda fused_residual_add_is_exact_on_cuda \
  fused_layer_norm_matches_burn_on_cuda fused_gelu_matches_burn_on_cuda qkv_attention_matches_the_split_route_on_cuda
echo "== fuzz, CUDA legs, attention ($((SECONDS - start)) s)"
LEGS="cuda_bf16_vs_flex cuda_autocast_bf16_vs_flex" ONLY="attention attention_grad" FUZZ_SECONDS=90 LEG_TIMEOUT=150 timeout 170 \
  bash model-import/scripts/gpu_backend_fuzz.sh "$out/fuzz" 2>&1 | tail -8
t=$(( $(left) - 20 )); [ $t -gt 150 ] && t=150
timeout $t bash model-import/scripts/gpu_train_parity.sh "$out/parity" "2 1" "cuda:bf16" 2>&1 | grep -E "==|ours:|max|mean|panicked" | head -20
finish

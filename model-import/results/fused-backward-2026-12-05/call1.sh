#!/usr/bin/env bash
# Call 1 (branch issue8-kernels-unverified; written 2026-12-05 without a GPU): correctness of
# everything on the branch not yet run on a GPU. The CUDA tests of the tower's quick GELU, the
# residual add, LayerNorm's bf16 output and block-per-row kernels, the qkv attention route (the
# flash forward's prefetching loop, the fused backward), the fused backward against the split
# pair; the fuzzer's CUDA attention legs (fused backward by default; right-padded masks reach
# the forward's reload path); then training parity with PyTorch (both stages, CUDA bf16).
# Carry .dev with train-test.xz, backend-fuzz.xz, llava-jp.xz and tokenizer/tokenizer.json.
CALL=call1 BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
export LLAVA_JP_TOKENIZER=$PWD/.dev/tokenizer/tokenizer.json
rm -f /tmp/llava-jp
TEST_TIMEOUT=90 train_tests fused_flash_backward_matches_the_split_pair_on_cuda qkv_attention_matches_the_split_route_on_cuda \
  fused_quick_gelu_matches_pytorch_roundings_on_cuda fused_residual_add_is_exact_on_cuda \
  fused_layer_norm_matches_burn_on_cuda fused_gelu_matches_burn_on_cuda
# cuda_f32_vs_flex replays the f32 LLaVA case that kept the cuBLASLt route opt-in, and fuzzes llava.
echo "== fuzz, CUDA legs, attention and llava ($((SECONDS - start)) s)"
LEGS="cuda_bf16_vs_flex cuda_autocast_bf16_vs_flex cuda_f32_vs_flex" ONLY="attention attention_grad attention_dropout llava" FUZZ_SECONDS=80 LEG_TIMEOUT=140 timeout 230 \
  bash model-import/scripts/gpu_backend_fuzz.sh "$out/fuzz" 2>&1 | tail -40
t=$(( $(left) - 20 )); [ $t -gt 160 ] && t=160
timeout $t bash model-import/scripts/gpu_train_parity.sh "$out/parity" "2 1" "cuda:bf16" 2>&1 | grep -E "==|ours:|max|mean|panicked" | head -20
finish

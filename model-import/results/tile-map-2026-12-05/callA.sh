#!/usr/bin/env bash
# Call A (branch issue8-tile-map; written 2026-12-05 without a GPU): correctness of the tile map.
# The flash kernels' CUDA tests (the fused backward against the split pair and burn's f32
# attention, causal with padding among the cases; the qkv route), the fuzzer's CUDA attention
# legs (random masks, right-padded causal ones included), and training parity with PyTorch.
# Carry .dev with train-test.xz, backend-fuzz.xz, llava-jp.xz and tokenizer/tokenizer.json.
CALL=callA BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_TOKENIZER=$PWD/.dev/tokenizer/tokenizer.json
rm -f /tmp/llava-jp
# A cold machine spends a minute or more compiling the flash kernels (NVRTC and the driver's JIT).
TEST_TIMEOUT=200 train_tests fused_flash_backward_matches_the_split_pair_on_cuda qkv_attention_matches_the_split_route_on_cuda
echo "== fuzz, CUDA legs, attention ($((SECONDS - start)) s)"
LEGS="cuda_bf16_vs_flex cuda_autocast_bf16_vs_flex" ONLY="attention attention_grad attention_dropout" FUZZ_SECONDS=60 LEG_TIMEOUT=110 timeout 190 \
  bash model-import/scripts/gpu_backend_fuzz.sh "$out/fuzz" 2>&1 | tail -14
t=$(( $(left) - 20 )); [ $t -gt 160 ] && t=160
timeout $t bash model-import/scripts/gpu_train_parity.sh "$out/parity" "2 1" "cuda:bf16" 2>&1 | grep -E "==|ours:|max|mean|panicked" | head -20
finish

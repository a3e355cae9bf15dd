#!/usr/bin/env bash
# Call 1: kernel variants from one build (LLAVA_JP_FLASH_SOURCE), correctness first, then speed.
#   fwd.cu    branch issue8-forward-unverified: the forward's exact next-tile prefetch, load_tile's
#             stepped pointers, ex2.approx.ftz, its scaling and masking a template on MASKED
#   fwdbwd.cu the same, and the backward's probabilities and gradients written twice (masked or not)
# The flash kernels' CUDA tests on fwdbwd.cu (then fwd.cu if it fails), the attention bench for
# the built-in source (main), fwd.cu, fwdbwd.cu and the built-in without the map (TILE_MAP=0),
# the fuzzer's CUDA attention legs on fwdbwd.cu.
# Carry .dev (train-test.xz, attention-bench.xz, backend-fuzz.xz, kernels/, tokenizer/).
CALL=call1 BINARIES="train-test attention-bench"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-560}
export LLAVA_JP_TOKENIZER=$PWD/.dev/tokenizer/tokenizer.json
K=$PWD/.dev/kernels
nvidia-smi --query-gpu=name --format=csv,noheader
# A test of the train-test binary on one kernel source: variant (a file in $K, or main), test.
variant_test() {
  local v=$1 name=$2 src=; [ $v != main ] && src=$K/$v.cu
  env ${src:+LLAVA_JP_FLASH_SOURCE=$src} timeout ${TEST_TIMEOUT:-150} /tmp/train-test --ignored --exact $name --nocapture > "$out/$v-$name.log" 2>&1
  echo "== $v $name: $(grep -E 'test result|panicked' "$out/$v-$name.log" | head -2) ($((SECONDS - start)) s)"
  grep -A4 panicked "$out/$v-$name.log" | head -8
  grep -q "test result: ok" "$out/$v-$name.log"
}
passed=
for v in fwdbwd fwd; do
  ok=1
  TEST_TIMEOUT=200 variant_test $v fused_flash_backward_matches_the_split_pair_on_cuda || ok=0
  TEST_TIMEOUT=100 variant_test $v qkv_attention_matches_the_split_route_on_cuda || ok=0
  [ $ok = 1 ] && { passed=$v; break; }
done
echo "== passed: ${passed:-none}"
for v in main fwd fwdbwd main-nomap; do
  src=; defines=; case $v in fwd|fwdbwd) src=$K/$v.cu ;; main-nomap) defines=TILE_MAP=0 ;; esac
  env ${src:+LLAVA_JP_FLASH_SOURCE=$src} LLAVA_JP_FLASH_DEFINES=$defines timeout 60 /tmp/attention-bench --shapes train --flash-train-only --iters 20 \
    > "$out/bench-$v.jsonl" 2> "$out/bench-$v.err"
  echo "== attention bench, $v ($((SECONDS - start)) s)"; cat "$out/bench-$v.jsonl"; tail -2 "$out/bench-$v.err"
done
t=$(( $(left) - 15 )); [ $t -gt 150 ] && t=150
if [ -n "$passed" ] && [ $t -gt 60 ]; then
  echo "== fuzz, CUDA bf16 leg, attention, $passed ($((SECONDS - start)) s)"
  LLAVA_JP_FLASH_SOURCE=$K/$passed.cu LEGS="cuda_bf16_vs_flex" ONLY="attention attention_grad attention_dropout" FUZZ_SECONDS=40 \
    LEG_TIMEOUT=$((t - 10)) timeout $t bash model-import/scripts/gpu_backend_fuzz.sh "$out/fuzz" 2>&1 | tail -8
fi
finish

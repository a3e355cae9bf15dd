#!/usr/bin/env bash
# Call 4 (after calls 1-3): the forward's exact next-tile prefetch, load_tile's stepped
# pointers and ex2.approx.ftz. In order of need, as the budget may cut it short: the flash
# kernels' CUDA tests, the attention bench with the map and without (TILE_MAP=0, now a knob
# LLAVA_JP_FLASH_DEFINES takes), the fuzzer's CUDA attention legs, stage 1 (ours only:
# PyTorch's step is call 2's, on the same card type).
# Carry .dev with train-test.xz, attention-bench.xz, backend-fuzz.xz, llava-jp.xz and tokenizer/.
CALL=call4 BINARIES="train-test attention-bench"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-400}
export LLAVA_JP_TOKENIZER=$PWD/.dev/tokenizer/tokenizer.json
nvidia-smi --query-gpu=name --format=csv,noheader
TEST_TIMEOUT=200 train_tests fused_flash_backward_matches_the_split_pair_on_cuda qkv_attention_matches_the_split_route_on_cuda
for map in 1 0; do
  LLAVA_JP_FLASH_DEFINES=TILE_MAP=$map timeout 60 /tmp/attention-bench --shapes train --flash-train-only --iters 20 > "$out/bench-map$map.jsonl" 2> "$out/bench-map$map.err"
  echo "== attention bench, TILE_MAP=$map ($((SECONDS - start)) s)"; cat "$out/bench-map$map.jsonl"; tail -3 "$out/bench-map$map.err"
done
t=$(( $(left) - 75 )); [ $t -gt 130 ] && t=130
if [ $t -gt 60 ]; then
  LEGS="cuda_bf16_vs_flex" ONLY="attention attention_grad attention_dropout" FUZZ_SECONDS=30 LEG_TIMEOUT=$((t - 10)) timeout $t \
    bash model-import/scripts/gpu_backend_fuzz.sh "$out/fuzz" 2>&1 | tail -8
fi
rm -f /tmp/llava-jp
CAP=70 train_run stage1 1 6 TORCH=0
finish

#!/usr/bin/env bash
# Call 1 (branch issue8-forward: the tile map, and each block's line of it staged in shared
# memory): correctness, then where the forward's time goes. The flash kernels' CUDA tests (the
# fused backward against the split pair and burn's f32 attention, causal with padding among the
# cases; the qkv route), the fuzzer's CUDA attention legs (random masks, right-padded causal
# ones), the attention bench with the map and without (TILE_MAP=0: every tile staged from the
# mask, as before the map) beside SDPA, and Nsight Compute on the forward.
# Carry .dev with train-test.xz, backend-fuzz.xz, attention-bench.xz and tokenizer/tokenizer.json.
CALL=call1 BINARIES="train-test attention-bench"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_TOKENIZER=$PWD/.dev/tokenizer/tokenizer.json
# A cold machine spends a minute or more compiling the flash kernels (NVRTC and the driver's JIT).
TEST_TIMEOUT=200 train_tests fused_flash_backward_matches_the_split_pair_on_cuda qkv_attention_matches_the_split_route_on_cuda
echo "== fuzz, CUDA legs, attention ($((SECONDS - start)) s)"
LEGS="cuda_bf16_vs_flex cuda_autocast_bf16_vs_flex" ONLY="attention attention_grad attention_dropout" FUZZ_SECONDS=50 LEG_TIMEOUT=95 timeout 160 \
  bash model-import/scripts/gpu_backend_fuzz.sh "$out/fuzz" 2>&1 | tail -14
for map in 1 0; do
  LLAVA_JP_FLASH_DEFINES=TILE_MAP=$map timeout 70 /tmp/attention-bench --shapes train --flash-train-only --iters 20 > "$out/bench-map$map.jsonl" 2> "$out/bench-map$map.err"
  echo "== attention bench, TILE_MAP=$map ($((SECONDS - start)) s)"; cat "$out/bench-map$map.jsonl"; tail -3 "$out/bench-map$map.err"
done
timeout 50 python3 model-import/scripts/bench_attention.py 2>&1 | grep -v Warning | grep train > "$out/sdpa.jsonl"
echo "== sdpa ($((SECONDS - start)) s)"; cat "$out/sdpa.jsonl"
# Nsight Compute on the forward at stage 2's shape: where its time goes now.
t=$(( $(left) - 15 )); [ $t -gt 100 ] && t=100
if command -v ncu > /dev/null && [ $t -gt 40 ]; then
  timeout $t ncu --kernel-name flash_attention_forward --launch-skip 4 --launch-count 1 --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    /tmp/attention-bench --shapes "train 8x1024" --forward-only --iters 3 > "$out/ncu-forward.txt" 2>&1
  echo "== ncu forward ($((SECONDS - start)) s)"
  grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Stall|Issue Slots Busy|Eligible Warps|No Eligible|Shared Memory|L2 Hit|ERR" "$out/ncu-forward.txt" | head -40
fi
finish

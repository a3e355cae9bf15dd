#!/usr/bin/env bash
# Call B (after call A passes): what the tile map buys. The attention bench at the training
# shapes with the map (the default) and without (TILE_MAP=0), SDPA beside them; stage 1 beside
# PyTorch, Nsight Compute on the forward, then stage 2.
# Carry .dev with attention-bench.xz, llava-jp.xz and tokenizer/tokenizer.json.
CALL=callB BINARIES="attention-bench"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
for map in 1 0; do
  LLAVA_JP_FLASH_DEFINES=TILE_MAP=$map timeout 90 /tmp/attention-bench --shapes train --flash-train-only --iters 20 > "$out/bench-map$map.jsonl" 2> "$out/bench-map$map.err"
  echo "== attention bench, TILE_MAP=$map ($((SECONDS - start)) s)"; cat "$out/bench-map$map.jsonl"; tail -3 "$out/bench-map$map.err"
done
timeout 60 python3 model-import/scripts/bench_attention.py 2>&1 | grep -v Warning | grep train > "$out/sdpa.jsonl"
echo "== sdpa ($((SECONDS - start)) s)"; cat "$out/sdpa.jsonl"
# Nsight Compute on the forward (5-7x SDPA on 2026-12-05, the widest gap): where it stalls.
if command -v ncu > /dev/null; then
  timeout 100 ncu --kernel-name flash_attention_forward --launch-skip 4 --launch-count 1 --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    /tmp/attention-bench --shapes "train 8x1024" --forward-only --iters 3 > "$out/ncu-forward.txt" 2>&1
  echo "== ncu forward ($((SECONDS - start)) s)"
  grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Stall|Issue Slots Busy|Eligible Warps|No Eligible|Pipe|Shared Memory|L1/TEX Hit|L2 Hit|ERR" "$out/ncu-forward.txt" | head -40
fi
rm -f /tmp/llava-jp
CAP=170 train_run stage1 1 8
CAP=150 train_run stage2 2 10
finish

#!/usr/bin/env bash
# Call 4: where the flash kernels lose to PyTorch's SDPA. The attention bench at the LLM's
# training shape (8 x 16 x 1024 x 128, causal; flash forward and forward + backward) beside
# SDPA, then Nsight Compute (ncu) on each flash kernel at that shape: speed of light,
# occupancy, launch statistics, memory and compute workload, warp stalls.
# Carry .dev with attention-bench.xz.
CALL=call4 BINARIES="attention-bench"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
timeout 150 /tmp/attention-bench --shapes train --flash-train-only --iters 20 > "$out/bench.jsonl" 2> "$out/bench.err"
echo "== bench ($((SECONDS - start)) s)"; cat "$out/bench.jsonl"; tail -3 "$out/bench.err"
timeout 100 python3 model-import/scripts/bench_attention.py 2>&1 | grep -v Warning > "$out/sdpa.jsonl"
echo "== sdpa ($((SECONDS - start)) s)"; head -5 "$out/sdpa.jsonl"
for k in flash_attention_forward flash_attention_backward_dq flash_attention_backward_dkdv; do
  t=$(( $(left) - 30 )); [ $t -gt 150 ] && t=150; [ $t -lt 30 ] && { echo "== ncu $k: skipped"; continue; }
  timeout $t ncu --kernel-name $k --launch-skip 4 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
    --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
    /tmp/attention-bench --shapes train --flash-train-only --iters 3 > "$out/ncu-$k.txt" 2>&1
  echo "== ncu $k ($((SECONDS - start)) s)"; grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Shared Memory Config|Stall|ERR" "$out/ncu-$k.txt" | head -24
done
finish

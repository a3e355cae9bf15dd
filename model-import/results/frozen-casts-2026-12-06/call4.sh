#!/usr/bin/env bash
# Call 4: where the flash kernels stand against PyTorch's SDPA (the attention bench at the
# model's shapes beside bench_attention.py), and where they stall at stage 1's shape
# (32 x 16 heads x 608, D = 128, causal): Nsight Compute's warp states, occupancy, memory and
# per-SASS samples of one forward and one backward launch.
# Carry .dev (attention-bench.xz).
CALL=${CALL:-call4} BINARIES="attention-bench"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-560}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 /tmp/attention-bench --iters 20 --flash-train-only > "$out/ours.jsonl" 2> "$out/ours.err"; echo "== ours ($((SECONDS - start)) s)"; tail -3 "$out/ours.err"; cat "$out/ours.jsonl"
timeout 120 python3 model-import/scripts/bench_attention.py --iters 20 2>&1 | grep -v Warning > "$out/pytorch.jsonl"; echo "== sdpa ($((SECONDS - start)) s)"; cat "$out/pytorch.jsonl"
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
for k in forward backward; do
  t=$(( $(left) - 30 )); [ $t -gt 120 ] && t=120
  [ $t -lt 30 ] && { echo "== ncu $k: skipped"; continue; }
  timeout $t "$ncu" --kernel-name flash_attention_$k --launch-skip 4 --launch-count 1 --clock-control none \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SourceCounters \
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section InstructionStats --import-source no \
    -o "$out/ncu-$k" -f /tmp/attention-bench --shapes stage1 --flash-train-only --iters 3 > "$out/ncu-$k.log" 2>&1
  "$ncu" -i "$out/ncu-$k.ncu-rep" --page details --print-details all > "$out/ncu-$k.txt" 2>&1
  "$ncu" -i "$out/ncu-$k.ncu-rep" --page source --csv --print-source sass > "$out/ncu-$k-sass.csv" 2> "$out/ncu-$k-sass.err"
  xz -9 "$out/ncu-$k-sass.csv"
  echo "== ncu $k ($((SECONDS - start)) s)"
  grep -E "Duration|Warp Cycles Per Issued|Registers Per|Achieved Occupancy|Issue Slots Busy|Stall|Compute \(SM\) Throughput|Memory Throughput|L1/TEX Hit|Shared" "$out/ncu-$k.txt" | head -40
done
finish

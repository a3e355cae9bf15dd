#!/usr/bin/env bash
# Call 3: where a step's time goes now. Nsight Compute on the fused backward at stage 1's
# attention shape (occupancy, stalls), stage 1 with the split backward and with the forward at
# three blocks per SM against call 2's, and the cost of queuing a full-depth step
# (`benches/train.rs --layers 24`: the `host` column is the share of a step the training
# thread spent queuing it).
# Carry .dev with attention-bench.xz, bench-train.xz, llava-jp.xz and tokenizer/tokenizer.json.
CALL=call3 BINARIES="attention-bench bench-train"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
export LLAVA_JP_TOKENIZER=$PWD/.dev/tokenizer/tokenizer.json
timeout 120 ncu --kernel-name flash_attention_backward --launch-skip 4 --launch-count 1 \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
  --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
  /tmp/attention-bench --shapes stage1 --flash-train-only --iters 3 > "$out/ncu-backward.txt" 2>&1
echo "== ncu ($((SECONDS - start)) s)"; grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Stall|ERR" "$out/ncu-backward.txt" | head -24
timeout 100 /tmp/bench-train --bench --backend cuda --layers 24 --steps 12 > "$out/bench-layers24.log" 2>&1
echo "== bench --layers 24 ($((SECONDS - start)) s)"; grep -v "^\s*$" "$out/bench-layers24.log" | tail -6
rm -f /tmp/llava-jp
CAP=130 train_run stage1-split 1 8 TORCH=0 LLAVA_JP_FLASH_BACKWARD=split
CAP=130 train_run stage1-forward3 1 8 TORCH=0 LLAVA_JP_FLASH_DEFINES=FORWARD_MIN_BLOCKS=3
finish

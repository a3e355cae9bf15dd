#!/usr/bin/env bash
# Call 2: where a steady step's device time goes now, every kernel of step 3 timed by Nsight
# Compute (gpu_kernel_profile.sh; stage 1, then stage 2), and where the flash kernels stall at
# stage 1's shape (warp states and per-SASS samples), built-in source, on the attention bench.
# Carry .dev (llava-jp.xz, attention-bench.xz, tokenizer/).
CALL=${CALL:-call2} BINARIES="attention-bench"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-570}
export LLAVA_JP_TOKENIZER=$PWD/.dev/tokenizer/tokenizer.json
nvidia-smi --query-gpu=name --format=csv,noheader
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
for k in backward forward; do
  t=$(( $(left) - 400 )); [ $t -gt 90 ] && t=90
  [ $t -lt 30 ] && { echo "== ncu $k: skipped"; continue; }
  timeout $t "$ncu" --kernel-name flash_attention_$k --launch-skip 4 --launch-count 1 --clock-control none \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SourceCounters \
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section InstructionStats --import-source no \
    -o "$out/ncu-$k" -f /tmp/attention-bench --shapes stage1 --flash-train-only --iters 3 > "$out/ncu-$k.log" 2>&1
  "$ncu" -i "$out/ncu-$k.ncu-rep" --page details --print-details all > "$out/ncu-$k.txt" 2>&1
  "$ncu" -i "$out/ncu-$k.ncu-rep" --page source --csv --print-source sass > "$out/ncu-$k-sass.csv" 2> "$out/ncu-$k-sass.err"
  echo "== ncu $k ($((SECONDS - start)) s)"
  grep -E "Duration|Warp Cycles Per Issued|Registers Per|Achieved Occupancy|Issue Slots Busy|Stall" "$out/ncu-$k.txt" | head -30
done
for stage in 1 2; do
  t=$(( $(left) - 15 )); [ $t -gt 200 ] && t=200
  [ $t -lt 60 ] && { echo "== stage $stage: skipped, $(left) s left"; continue; }
  echo "== stage $stage kernels ($((SECONDS - start)) s, $t s allowed)"
  timeout $t bash model-import/scripts/gpu_kernel_profile.sh "$out/profile" $stage 3-3 2>&1 | grep -v "^==PROF==" | tail -45
  xz -9 "$out/profile/ncu-stage$stage.csv" 2>/dev/null
  rm -f /tmp/llava-jp
done
finish

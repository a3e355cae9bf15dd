#!/usr/bin/env bash
# Call 3 (as run 2026-12-05 on an H100, after call2.sh): the fuzzer's CUDA attention legs again
# (call 1's ran out of time before their summary), Nsight Compute on the fused backward at
# stage 1's attention shape, and stage 1 with the forward at three blocks an SM.
# Carry .dev with attention-bench.xz, train-test.xz, backend-fuzz.xz, llava-jp.xz and
# tokenizer/tokenizer.json.
CALL=call3 BINARIES="attention-bench train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=470
export LLAVA_JP_GEMM=cublaslt LLAVA_JP_TOKENIZER=$PWD/.dev/tokenizer/tokenizer.json
LEGS="cuda_bf16_vs_flex cuda_autocast_bf16_vs_flex" ONLY="attention attention_grad attention_dropout" FUZZ_SECONDS=60 LEG_TIMEOUT=110 timeout 190 \
  bash model-import/scripts/gpu_backend_fuzz.sh "$out/fuzz" 2>&1 | tail -14
echo "== fuzz done ($((SECONDS - start)) s)"
timeout 110 ncu --kernel-name flash_attention_backward --launch-skip 4 --launch-count 1 --section SpeedOfLight --section Occupancy \
  --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
  /tmp/attention-bench --shapes stage1 --flash-train-only --iters 3 > "$out/ncu-backward.txt" 2>&1
echo "== ncu ($((SECONDS - start)) s)"; grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Stall|ERR|Shared Memory Configuration Size|Dynamic Shared" "$out/ncu-backward.txt" | head -24
rm -f /tmp/llava-jp
CAP=130 train_run stage1-forward3 1 8 TORCH=0 LLAVA_JP_FLASH_DEFINES=FORWARD_MIN_BLOCKS=3
finish

#!/usr/bin/env bash
# Call 2 (the machine of call 1, warm): training parity with PyTorch again now that the loss
# runs by vocabulary chunks on CUDA (gpu_train_parity.sh, CUDA bf16, both stages); stage 2 at
# 8 x 1024 beside PyTorch (speed and memory with the chunked loss); the attention bench's flash
# training time with and without the backward knobs, this time with room for burn's compilation.
# Carry .dev with llava-jp.xz, attention-bench.xz and tokenizer/tokenizer.json.
CALL=call2 BINARIES="attention-bench"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
rm -f /tmp/llava-jp
timeout 200 bash model-import/scripts/gpu_train_parity.sh "$out/parity" "2 1" "cuda:bf16" 2>&1 | grep -E "==|ours:|max|mean" | head -20
CAP=230 train_run stage2 2 12
for defines in "" "DQ_KEYS=32 DKDV_QUERIES=16 BACKWARD_MIN_BLOCKS=2" ""; do
  t=$(( $(left) - 5 )); [ $t -gt 120 ] && t=120; [ $t -lt 20 ] && break
  echo "== attention, defines '$defines' ($((SECONDS - start)) s)"
  LLAVA_JP_FLASH_DEFINES="$defines" timeout $t /tmp/attention-bench --flash-train-only --shapes train --iters 20 2>&1 | tail -1
done
finish

#!/usr/bin/env bash
# Call 5: memory and the real recipe's settings at full size, stage 2 (1024 tokens): batch 1
# with and without gradient checkpointing (the seed trained on a 24 GB card), and batch 8 with
# attention / residual dropout on (the recipe's 0.1; the benchmark runs without, as PyTorch's
# does) and with gradient checkpointing. Ours only (PyTorch's numbers: calls 2-3).
# Carry .dev with llava-jp.xz.
CALL=call5 BINARIES=""
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
run() {  # name, steps, sets...
  local name=$1 steps=$2; shift 2
  local t=$(( $(left) - 20 )); [ $t -gt 150 ] && t=150; [ $t -lt 50 ] && { echo "== $name: skipped, $(left) s left"; return; }
  echo "== $name ($((SECONDS - start)) s, $t s allowed)"
  TRAIN_SET="$*" TORCH=0 OURS_TIMEOUT=$(( t - 15 )) timeout $t bash model-import/scripts/gpu_bench_train.sh "$out/$name" 2 $steps
}
run batch1 12 per_device_train_batch_size=1
run batch1-checkpointing 12 per_device_train_batch_size=1 gradient_checkpointing=true
run batch8-dropout 12 dropout=true
run batch8-checkpointing 12 gradient_checkpointing=true
finish

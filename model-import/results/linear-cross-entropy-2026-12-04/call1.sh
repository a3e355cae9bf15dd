#!/usr/bin/env bash
# Call 1: the head's cross-entropy by chunks of the vocabulary (src/linear_cross_entropy.rs)
# and the flash backward's register-budget knobs (LLAVA_JP_FLASH_DEFINES), on the H200:
# the CUDA tests, the attention bench's flash training time for each variant, and stage 2 at
# 1 x 1024 tokens with gradient checkpointing, alone and beside a ballast that leaves 24 GiB.
# Carry .dev with llava-jp.xz, train-test.xz, attention-bench.xz and tokenizer/tokenizer.json.
CALL=call1 BINARIES="train-test attention-bench"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
rm -f /tmp/llava-jp
TEST_TIMEOUT=120 train_tests linear_cross_entropy_matches_burn_on_cuda
LLAVA_JP_FLASH_DEFINES="DQ_KEYS=32 DKDV_QUERIES=16" TEST_TIMEOUT=120 train_tests qkv_attention_matches_the_split_route_on_cuda
for defines in "" "DKDV_QUERIES=16" "DQ_KEYS=32" "DQ_KEYS=32 DKDV_QUERIES=16" "DQ_KEYS=32 DKDV_QUERIES=16 BACKWARD_MIN_BLOCKS=2"; do
  echo "== attention, defines '$defines' ($((SECONDS - start)) s)"
  LLAVA_JP_FLASH_DEFINES="$defines" timeout 60 /tmp/attention-bench --flash-train-only --shapes train --iters 20 2>&1 | tail -2
done
CAP=110 train_run batch1-checkpointing 2 12 TORCH=0 TRAIN_SET="per_device_train_batch_size=1 gradient_checkpointing=true"
CAP=110 train_run batch1-checkpointing-24gib 2 12 TORCH=0 LEAVE_GIB=24 TRAIN_SET="per_device_train_batch_size=1 gradient_checkpointing=true"
for m in $out/*/ours-stage2.metrics.jsonl; do echo "$m: $(tail -1 $m | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r.get("loss"), r.get("device_mb"))')"; done
finish

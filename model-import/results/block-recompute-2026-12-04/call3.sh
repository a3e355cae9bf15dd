#!/usr/bin/env bash
# Call 3 (call 2 again, with whole binaries): the weights, and so gradients and AdamW moments,
# in cubecl's persistent memory (exact-size allocations instead of the sliced pools' pages),
# the device memory in the metrics (`device_mb`). Stage 2 at 1 x 1024 with checkpointing
# (ours), at 8 x 1024 beside PyTorch, at 8 x 1024 with checkpointing (ours); then the CUDA
# checkpointing test in what time is left.
# Carry .dev with llava-jp.xz, train-test.xz and tokenizer/tokenizer.json.
CALL=call3 BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt} LLAVA_JP_TOKENIZER=$PWD/.dev/tokenizer/tokenizer.json
CAP=90 train_run batch1-checkpointing 2 12 TORCH=0 TRAIN_SET="per_device_train_batch_size=1 gradient_checkpointing=true"
CAP=200 train_run batch8 2 12
CAP=90 train_run batch8-checkpointing 2 12 TORCH=0 TRAIN_SET="gradient_checkpointing=true"
for m in $out/*/ours-stage2.metrics.jsonl; do echo "$m: $(tail -1 $m | python3 -c 'import json,sys; print(json.load(sys.stdin).get("device_mb"))')"; done
TEST_TIMEOUT=$(( $(left) - 10 )) train_tests gradient_checkpointing_gives_the_same_run_on_cuda
finish

#!/usr/bin/env bash
# Call 2: the weights (and so gradients and AdamW moments) in cubecl's persistent memory
# (exact-size allocations instead of the sliced pools' pages), the device memory now in the
# metrics (`device_mb`); the CUDA checkpointing test with the tokenizer found; stage 2 at
# 1 x 1024 with checkpointing (ours), at 8 x 1024 beside PyTorch, and 8 x 1024 with
# checkpointing (ours). Carry .dev with llava-jp.xz, train-test.xz and tokenizer/tokenizer.json.
CALL=call2 BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt} LLAVA_JP_TOKENIZER=$PWD/.dev/tokenizer/tokenizer.json
train_tests gradient_checkpointing_gives_the_same_run_on_cuda
CAP=100 train_run batch1-checkpointing 2 12 TORCH=0 TRAIN_SET="per_device_train_batch_size=1 gradient_checkpointing=true"
CAP=220 train_run batch8 2 12
train_run batch8-checkpointing 2 12 TORCH=0 TRAIN_SET="gradient_checkpointing=true"
for m in $out/*/ours-stage2.metrics.jsonl; do echo "$m: $(tail -1 $m | python3 -c 'import json,sys; print(json.load(sys.stdin).get("device_mb"))')"; done
finish

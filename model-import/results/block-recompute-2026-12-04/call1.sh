#!/usr/bin/env bash
# Call 1: gradient checkpointing as per-block recomputation (src/train/micro_batch.rs) and
# CLIP's q/k/v as one product and one attention operation, on the H200 at full size:
# the CUDA tests (checkpointed run = plain run in bf16 with dropout; the qkv attention with and
# without a mask), stage 2 at 1 x 1024 tokens with checkpointing, ours beside PyTorch
# (transformers' gradient_checkpointing_enable), then stage 1 at 32 x 608 (ours only).
# Carry .dev with llava-jp.xz, train-test.xz and tokenizer/tokenizer.json.
CALL=call1 BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
train_tests gradient_checkpointing_gives_the_same_run_on_cuda qkv_attention_matches_the_split_route_on_cuda
CAP=300 train_run batch1-checkpointing 2 12 TRAIN_SET="per_device_train_batch_size=1 gradient_checkpointing=true"
train_run stage1 1 8 TORCH=0
finish

#!/usr/bin/env bash
# Call 5: data parallelism through burn's collective on CUDA, two replicas on the one GPU
# (threads, f32), against one device accumulating the same micro-batches.
# Carry .dev with train-test.xz and tokenizer/tokenizer.json.
CALL=call5 BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_TOKENIZER=$PWD/.dev/tokenizer/tokenizer.json
TEST_TIMEOUT=400 train_tests data_parallel_replicas_equal_accumulation_on_one_device_on_cuda
grep -E "step|largest" "$out/data_parallel_replicas_equal_accumulation_on_one_device_on_cuda.log" | head -30
finish

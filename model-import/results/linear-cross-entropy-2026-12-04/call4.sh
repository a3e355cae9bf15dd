#!/usr/bin/env bash
# Call 4, after a read-only review: call 3's checkpointing test, which could not find the
# tokenizer there (the call did not point LLAVA_JP_TOKENIZER at .dev), now also counting the
# blocks it reruns; the chunked loss's test against the fused autocast route at tighter
# tolerances; the qkv attention test with the backward's checked knobs (one block per SM asked);
# stage 2 at 8 x 1024 with gradient checkpointing (memory with the chunked loss; 36.0 GiB before).
# Carry .dev with llava-jp.xz, train-test.xz and tokenizer/tokenizer.json.
CALL=call4 BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt} LLAVA_JP_TOKENIZER=$PWD/.dev/tokenizer/tokenizer.json
rm -f /tmp/llava-jp
TEST_TIMEOUT=200 train_tests gradient_checkpointing_gives_the_same_run_on_cuda linear_cross_entropy_matches_burn_on_cuda qkv_attention_matches_the_split_route_on_cuda
grep -E "^stage|recomputed" "$out/gradient_checkpointing_gives_the_same_run_on_cuda.log" | head -6
CAP=150 train_run batch8-checkpointing 2 12 TORCH=0 TRAIN_SET="gradient_checkpointing=true"
finish

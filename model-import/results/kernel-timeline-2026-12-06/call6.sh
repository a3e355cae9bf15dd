#!/usr/bin/env bash
# Call 6: the replicas test of call 5 with the flag-ordered products (LLAVA_JP_GEMM=cublaslt-flags),
# to see whether its failure is the new route's; the checkpointing test with the time it needs
# (138 s in upload-ahead-2026-12-05). Carry .dev (train-test.xz, tokenizer/).
CALL=${CALL:-call6} BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-330}
ref=/work/main/../shared/reference/llm-jp-tokenizer-v2.1
[ -e $ref/tokenizer.json ] || { mkdir -p $ref && cp .dev/tokenizer/* $ref/; }
LLAVA_JP_GEMM=cublaslt-flags TEST_TIMEOUT=100 train_tests data_parallel_replicas_equal_accumulation_on_one_device_on_cuda
TEST_TIMEOUT=190 train_tests gradient_checkpointing_gives_the_same_run_on_cuda
finish

#!/usr/bin/env bash
# Call 5: call 4's replicas test again, with the reference tokenizer where the tests look for it
# (../shared/reference/, from .dev/tokenizer), and the trainer's checkpointing test: the
# trainer on CUDA with the products on cubecl's stream (two replica threads: two cubecl
# streams, each found through CUPTI). Carry .dev (train-test.xz, tokenizer/).
CALL=${CALL:-call5} BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-300}
ref=/work/main/../shared/reference/llm-jp-tokenizer-v2.1
[ -e $ref/tokenizer.json ] || { mkdir -p $ref && cp .dev/tokenizer/* $ref/; }
TEST_TIMEOUT=130 train_tests data_parallel_replicas_equal_accumulation_on_one_device_on_cuda gradient_checkpointing_gives_the_same_run_on_cuda
grep -h "cuBLASLt products" $out/*.log | head -3
finish

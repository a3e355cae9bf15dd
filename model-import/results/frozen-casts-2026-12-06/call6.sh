#!/usr/bin/env bash
# Call 6: the review's mends (the frozen casts made before the first step in persistent
# allocations; the precast test with 1100 rows and the fused route asserted): that test, then
# stage 1 and stage 2 beside PyTorch. Carry .dev (llava-jp.xz, train-test.xz, tokenizer/).
CALL=${CALL:-call6} BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-230}
nvidia-smi --query-gpu=name --format=csv,noheader
TEST_TIMEOUT=40 train_tests precast_frozen_weights_match_on_cuda
rm -f /tmp/llava-jp
CAP=95 train_run stage1 1 8
CAP=120 train_run stage2 2 10
losses
finish

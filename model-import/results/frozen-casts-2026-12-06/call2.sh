#!/usr/bin/env bash
# Call 2: call 1's tree plus AdamW and the gradients' sum of squares by four elements a thread
# (16-byte loads and stores where the buffers allow). The optimizer's CUDA test, then stage 2
# and stage 1 beside PyTorch. Carry .dev (llava-jp.xz, train-test.xz, tokenizer/).
CALL=${CALL:-call2} BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-570}
nvidia-smi --query-gpu=name --format=csv,noheader
TEST_TIMEOUT=60 train_tests fused_optimizer_matches_burn_on_cuda precast_frozen_weights_match_on_cuda
rm -f /tmp/llava-jp
CAP=170 train_run stage2 2 10
CAP=150 train_run stage1 1 8
losses
finish

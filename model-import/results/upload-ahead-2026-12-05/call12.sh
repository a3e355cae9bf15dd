#!/usr/bin/env bash
# The pixels sent a step ahead on a thread of their own (train::device_batches), the batch's
# splice differentiated as a pick (model::rows), the GELU kernels on 16-byte vectors.
# TESTS (names; default the GELU kernels against burn's formula in f32 and bf16, and a whole
# tiny training run twice, with images, through the upload thread) are the CUDA tests run
# first, then STAGE (1, default, or 2) at full size beside PyTorch in the same call.
# Carry .dev (llava-jp.xz, train-test.xz, tokenizer/).
CALL=${CALL:-upload1} BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_TOKENIZER=$PWD/.dev/tokenizer/tokenizer.json
limit=${LIMIT:-570}
nvidia-smi --query-gpu=name --format=csv,noheader
rm -f /tmp/llava-jp
TEST_TIMEOUT=150 train_tests ${TESTS:-fused_gelu_matches_burn_on_cuda gradient_checkpointing_gives_the_same_run_on_cuda}
stage=${STAGE:-1}
if [ $stage = 1 ]; then CAP=200 train_run stage1 1 8; else CAP=220 train_run stage2 2 10; fi
finish

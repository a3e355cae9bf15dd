#!/usr/bin/env bash
# Call 1: the pixels sent a step ahead on a thread of their own (train::device_batches), the
# batch's splice differentiated as a pick (model::rows), the GELU kernels on 16-byte vectors.
# The CUDA tests that cover them (GELU kernels against burn's formula, f32 and bf16; a whole
# tiny training run twice, with images, through the upload thread), then stage 1 beside
# PyTorch in the same call; STAGE2=1 runs stage 2 instead.
# Carry .dev (llava-jp.xz, train-test.xz, tokenizer/).
CALL=${CALL:-upload1} BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-570}
nvidia-smi --query-gpu=name --format=csv,noheader
rm -f /tmp/llava-jp
if [ -z "${STAGE2:-}" ]; then
  TEST_TIMEOUT=120 train_tests fused_gelu_matches_burn_on_cuda gradient_checkpointing_gives_the_same_run_on_cuda
  CAP=200 train_run stage1 1 8
else
  CAP=200 train_run stage2 2 10
  TEST_TIMEOUT=$(( $(left) - 20 )) train_tests data_parallel_replicas_equal_accumulation_on_one_device_on_cuda
fi
finish

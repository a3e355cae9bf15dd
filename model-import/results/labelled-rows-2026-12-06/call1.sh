#!/usr/bin/env bash
# Call 1 (binaries of branch issue8-embed: main at a8f41e8 + the embedding backward): the
# embedding backward's test with its f32 reference, then stage 2 and stage 1 beside PyTorch:
# the flash mends, ln_f + head over the labelled rows only, the embedding backward. Losses to compare with
# upload-ahead-2026-12-05/call3 (same data, same seeds).
# Carry .dev (llava-jp.xz, train-test.xz, tokenizer/).
CALL=${CALL:-call1} BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-575}
nvidia-smi --query-gpu=name --format=csv,noheader
TEST_TIMEOUT=80 train_tests fused_embedding_matches_burn_on_cuda
rm -f /tmp/llava-jp
CAP=230 train_run stage2 2 10
CAP=230 train_run stage1 1 8
losses
finish

#!/usr/bin/env bash
# Call 1: frozen linear layers cast to bf16 once a run (`train::frozen`; stage 1's whole LLM
# and tower, stage 2's tower) and the bias gradients' column sums by two columns a thread and
# a parallel total. The CUDA tests of the affine (precast weights bit for bit, bias gradients
# against the host; the autocast affine against burn's path), then stage 2 and stage 1 beside
# PyTorch; losses to compare with labelled-rows-2026-12-06's.
# Carry .dev (llava-jp.xz, train-test.xz, tokenizer/).
CALL=${CALL:-call1} BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-570}
nvidia-smi --query-gpu=name --format=csv,noheader
TEST_TIMEOUT=60 train_tests precast_frozen_weights_match_on_cuda autocast_affine_matches_burn_on_cuda
rm -f /tmp/llava-jp
CAP=170 train_run stage2 2 10
CAP=150 train_run stage1 1 8
losses
finish

#!/usr/bin/env bash
# Call 5: the flash kernels' byte-by-byte mask staging (tiles at the bounds: at stage 1's 608
# tokens the last block of queries stages every tile so) with eight loads in flight instead of
# one; call 4's profile had ~16% of the forward's stall samples on that loop. Run from this
# tree's src/flash_attention.cu by LLAVA_JP_FLASH_SOURCE on call 3's binaries: the flash CUDA
# tests, then stage 1 and stage 2 beside PyTorch.
# Carry .dev (llava-jp.xz, train-test.xz, tokenizer/).
CALL=${CALL:-call5} BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-570}
export LLAVA_JP_FLASH_SOURCE=$PWD/src/flash_attention.cu
nvidia-smi --query-gpu=name --format=csv,noheader
TEST_TIMEOUT=120 train_tests fused_flash_backward_matches_the_split_pair_on_cuda qkv_attention_matches_the_split_route_on_cuda
rm -f /tmp/llava-jp
CAP=150 train_run stage1 1 8
CAP=170 train_run stage2 2 10
losses
finish

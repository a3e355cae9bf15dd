#!/usr/bin/env bash
# Call 4 (call 3 never got a machine: this one has its change too): LayerNorm's input gradient
# with the residual branch's added in by its kernel, and the flash backward's
# delta = rowsum(dO * O) by a kernel of its own (`flash_attention_delta`) instead of burn's
# multiply and sum. Their CUDA tests, then stage 2 and stage 1 beside PyTorch; losses to
# compare with call 1's. Carry .dev (llava-jp.xz, train-test.xz, tokenizer/).
CALL=${CALL:-call4} BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-560}
nvidia-smi --query-gpu=name --format=csv,noheader
TEST_TIMEOUT=60 train_tests fused_layer_norm_matches_burn_on_cuda fused_flash_backward_matches_the_split_pair_on_cuda qkv_attention_matches_the_split_route_on_cuda
rm -f /tmp/llava-jp
CAP=170 train_run stage2 2 10
CAP=140 train_run stage1 1 8
losses
finish

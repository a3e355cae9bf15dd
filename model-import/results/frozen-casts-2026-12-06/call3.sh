#!/usr/bin/env bash
# Call 3: call 1's tree plus LayerNorm's parameter gradients summed over chunks by a block of
# 32 columns x 8 warps (as column_sum_total), AdamW back to its scalar loop (call 2's vector
# one changed nothing). The LayerNorm and affine CUDA tests; every kernel of step 3 at both
# stages (Nsight Compute); stage 2 and stage 1 beside PyTorch.
# Carry .dev (llava-jp.xz, train-test.xz, tokenizer/).
CALL=${CALL:-call3} BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-585}
export LLAVA_JP_TOKENIZER=$PWD/.dev/tokenizer/tokenizer.json
nvidia-smi --query-gpu=name --format=csv,noheader
TEST_TIMEOUT=60 train_tests fused_layer_norm_matches_burn_on_cuda precast_frozen_weights_match_on_cuda
rm -f /tmp/llava-jp
CAP=130 RESERVE=300 stage_kernels 2 1
CAP=150 train_run stage2 2 10
CAP=130 train_run stage1 1 8
losses
finish

#!/usr/bin/env bash
# Call 3: the linear layers' bias added by cuBLASLt's epilogue and its gradient summed by a
# kernel of our own (src/fused_ops.rs `column_sum`). The kernel tests again, then full-size
# stage 2 (8 x 1024, 40 steps) and stage 1 (32 x 608), each with PyTorch after it, in one call;
# cuBLASLt products. Carry .dev with train-test.xz and llava-jp.xz.
CALL=call3 BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
train_tests ${TESTS:-autocast_affine_matches_burn_on_cuda qkv_attention_matches_the_split_route_on_cuda fused_gelu_matches_burn_on_cuda fused_residual_dropout_follows_its_mask_on_cuda}
train_run stage2 2 ${STEPS:-40} TORCH=${TORCH:-1}
train_run stage1 1 ${STEPS1:-10} TORCH=${TORCH:-1}
finish

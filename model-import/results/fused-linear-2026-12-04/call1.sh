#!/usr/bin/env bash
# Call 1: the linear layers as one autodiff operation under autocast (src/cublaslt.rs
# `try_autocast_affine`), GELU and the residual add with dropout as kernels (src/fused_ops.rs).
# Their tests (tests/train.rs) and LayerNorm's again, then full-size stage 2 (8 x 1024) with
# everything on, then PyTorch in the same call; cuBLASLt products.
# Carry .dev with train-test.xz and llava-jp.xz.
CALL=call1 BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
train_tests ${TESTS:-autocast_affine_matches_burn_on_cuda fused_gelu_matches_burn_on_cuda fused_residual_dropout_follows_its_mask_on_cuda fused_layer_norm_matches_burn_on_cuda}
train_run fused 2 ${STEPS:-12} TORCH=${TORCH:-1}
finish

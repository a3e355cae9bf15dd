#!/usr/bin/env bash
# Call 1: AdamW writes each updated parameter's bf16 copy too, and the next forward takes it
# instead of casting (src/fused_optim.rs `cast_parameter`). The kernel's test (copies against
# burn's cast, to the bit; none kept for an updated parameter) and the end-to-end one (three
# steps of two Conv1D layers, the same bits with and without copies), then stage 2 beside
# PyTorch, then ours again with the copies off (LLAVA_JP_OPTIM_COPIES=0), same machine.
# Carry .dev/llava-jp.xz, .dev/train-test.xz, .dev/tokenizer.
CALL=${CALL:-call1} BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-560}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
TEST_TIMEOUT=90 train_tests fused_optimizer_matches_burn_on_cuda optimizer_copies_change_no_number_on_cuda
CAP=170 train_run stage2 2 8
CAP=75 train_run stage2-no-copies 2 8 TORCH=0 LLAVA_JP_OPTIM_COPIES=0
losses
finish

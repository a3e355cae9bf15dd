#!/usr/bin/env bash
# Call 2: the end-to-end test as rewritten after call 1 (each forward's output compared, not
# the loss), and the kernel's test again. Carry .dev/train-test.xz.
CALL=${CALL:-call2} BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-200}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
TEST_TIMEOUT=90 train_tests optimizer_copies_change_no_number_on_cuda fused_optimizer_matches_burn_on_cuda
finish

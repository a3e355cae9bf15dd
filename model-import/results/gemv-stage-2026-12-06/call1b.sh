#!/usr/bin/env bash
# Call 1, trimmed to the device time left: the bf16 tests against flex (the 1024-wide case
# stages), the bench with staging (one wave) and without, then optim-copies' end-to-end test.
# Carry .dev/next, .dev/train-test.xz.
CALL=${CALL:-call1b} BINARIES="next/bench-generate next/graph-decode-test train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-230}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
run_test graph_decode_matches_flex_bf16 flex-bf16 90
bench stage-wave bench-generate 1
bench stage-off bench-generate 1 LLAVA_JP_GRAPH_GEMV_STAGE=off
TEST_TIMEOUT=50 train_tests optimizer_copies_change_no_number_on_cuda
finish

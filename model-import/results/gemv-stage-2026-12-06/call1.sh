#!/usr/bin/env bash
# Call 1: the decode GEMVs stage their weight rows past the registers' first group in shared
# memory (cp.async) before the wait. The graph decoder's tests against flex (all cases, the new
# 1024-wide one staging in mlp.c_proj; both paths), then the full-size greedy decode bench:
# staging sized for one wave (the default), shared with the next kernel's blocks
# (LLAVA_JP_GRAPH_GEMV_STAGE=share), off (as before), and one wave with the driver choosing each
# kernel's shared-memory carveout (LLAVA_JP_GRAPH_CARVEOUT=-1; the default is 100% for all). Each bench's profile times the kernels one
# by one and the graph. Carry .dev/next (bench-generate.xz, graph-decode-test.xz).
CALL=${CALL:-call1} BINARIES="next/bench-generate next/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-380}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
run_test graph_decode_matches_flex_bf16 flex-bf16 150
run_test graph_decode_matches_flex_f32 flex-f32 150
bench stage-wave bench-generate 2
bench stage-off bench-generate 1 LLAVA_JP_GRAPH_GEMV_STAGE=off
bench stage-share bench-generate 1 LLAVA_JP_GRAPH_GEMV_STAGE=share
bench stage-wave-driver-carveout bench-generate 1 LLAVA_JP_GRAPH_CARVEOUT=-1
finish

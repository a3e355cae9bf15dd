#!/usr/bin/env bash
# Call 1: the fused MLP (c_fc + mlp.c_proj in one kernel, clusters of 8) against the two GEMVs,
# on the flex tests and the full-size bench. Carry .dev/mlp (binaries packed with
# NAMES="bench-generate graph-decode-test" PACK_DIR=.dev/mlp).
CALL=${CALL:-call1} BINARIES="mlp/bench-generate mlp/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
run_test graph_decode_matches_flex_bf16 flex-bf16 150
grep -E "^case|fused|panicked" "$out/flex-bf16.log" | head -5
run_test graph_decode_matches_flex_f32 flex-f32 150
for r in 1 2; do
  bench fused$r bench-generate 1 > /dev/null
  bench split$r bench-generate 1 LLAVA_JP_GRAPH_MLP=split > /dev/null
done
bench slice16 bench-generate 1 LLAVA_JP_GRAPH_MLP_SLICE=16 > /dev/null
bench slice64 bench-generate 1 LLAVA_JP_GRAPH_MLP_SLICE=64 > /dev/null
bench unroll16 bench-generate 1 LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DMLP_UNROLL=16 > /dev/null
bench unroll4 bench-generate 1 LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DMLP_UNROLL=4 > /dev/null
decode_summary
finish

#!/usr/bin/env bash
# Call 2: the attention with attn.c_proj as one kernel (clusters of 8 a head), beside the fused
# MLP; each fusion on and off; the flex tests; and, timing only (wrong numbers: the binary
# uploads c_fc by columns), the fused MLP reading c_fc by rows. Carry .dev/ap (binaries, and
# graph_decode.cu: the source with MLP_FC_BY_ROWS).
CALL=${CALL:-call2} BINARIES="ap/bench-generate ap/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
run_test graph_decode_matches_flex_bf16 flex-bf16 150
grep -E "panicked|differ" -A3 "$out/flex-bf16.log" | head -8
run_test graph_decode_matches_flex_f32 flex-f32 150
grep -E "panicked|differ" -A3 "$out/flex-f32.log" | head -8
for r in 1 2; do
  bench both$r bench-generate 1 > /dev/null
  bench none$r bench-generate 1 LLAVA_JP_GRAPH_MLP=split LLAVA_JP_GRAPH_ATTENTION=split > /dev/null
done
bench attn bench-generate 1 LLAVA_JP_GRAPH_MLP=split > /dev/null
bench attn-noprefetch bench-generate 1 LLAVA_JP_GRAPH_MLP=split LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DAP_PREFETCH=0 > /dev/null
export LLAVA_JP_GRAPH_SOURCE=.dev/ap/graph_decode.cu
bench rows-timing bench-generate 1 LLAVA_JP_GRAPH_ATTENTION=split LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DMLP_FC_BY_ROWS=1 > /dev/null
bench rows16-timing bench-generate 1 LLAVA_JP_GRAPH_ATTENTION=split "LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DMLP_FC_BY_ROWS=1 -DMLP_UNROLL=16" > /dev/null
bench rows-both-timing bench-generate 1 LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DMLP_FC_BY_ROWS=1 > /dev/null
unset LLAVA_JP_GRAPH_SOURCE
decode_summary
finish

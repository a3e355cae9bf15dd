#!/usr/bin/env bash
# Call 9: the graph decoder prefilling the prompt itself (cuBLASLt products, flash attention,
# src/graph_prefill.cu), with its own vision tower and projector or with burn's image
# features, beside burn's prefill (LLAVA_JP_GRAPH_PREFILL=0), same binary. CPU-referenced tests
# first, the bench three ways and transformers, then the CUDA-referenced cases the prefill
# takes (bf16 cases 4 and 5) and one it does not (0), in parallel.
CALL=call9 BINARIES="graph-decode-test bench-generate"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
run_test graph_decode_matches_flex_bf16 test-flex-bf16 120
run_test graph_decode_matches_flex_f32 test-flex-f32 90
bench ours bench-generate 3
extra="--graph-vision off" bench ours-burn-vision bench-generate 3
bench ours-burn-prefill bench-generate 3 LLAVA_JP_GRAPH_PREFILL=0
transformers 120
t=$(( $(left) - 10 ))
if [ $t -gt 60 ]; then
  for case in 4 5 0; do
    mkdir -p /tmp/t-$case
    (cd /tmp/t-$case && run_test graph_decode_matches_eager_bf16 test-cuda-bf16-$case $t GRAPH_DECODE_CASES=$case) &
  done
  wait
fi
finish

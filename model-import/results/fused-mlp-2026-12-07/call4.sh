#!/usr/bin/env bash
# Call 4: the split-K GEMV with interleaved splits (split s takes rows s, s + splits, ...:
# at any time every split's blocks read rows close together), from a source file on the
# call-2 binaries (.dev/ap/interleaved.cu), fusions off, against the same without it.
CALL=${CALL:-call4} BINARIES="ap/bench-generate ap/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
export LLAVA_JP_GRAPH_MLP=split LLAVA_JP_GRAPH_ATTENTION=split
run_test graph_decode_matches_flex_bf16 flex-bf16-il 150 LLAVA_JP_GRAPH_SOURCE=.dev/ap/interleaved.cu
grep -E "panicked|differ" -A3 "$out/flex-bf16-il.log" | head -8
for r in 1 2; do
  bench base$r bench-generate 1 > /dev/null
  bench interleaved$r bench-generate 1 LLAVA_JP_GRAPH_SOURCE=.dev/ap/interleaved.cu > /dev/null
done
decode_summary
finish

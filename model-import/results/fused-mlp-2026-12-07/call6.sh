#!/usr/bin/env bash
# Call 6: tails that keep their L2 loads in flight (.dev/ap/tails.cu: the split-K tails add
# their partial sums TAIL_BATCH loads at a time, same order; the logits' last block picks the
# arg max with all its threads), on the call-2 binaries, against the binary's own source.
CALL=${CALL:-call6} BINARIES="ap/bench-generate ap/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
run_test graph_decode_matches_flex_bf16 flex-bf16-tails 150 LLAVA_JP_GRAPH_SOURCE=.dev/ap/tails.cu
grep -E "panicked|differ" -A3 "$out/flex-bf16-tails.log" | head -8
export LLAVA_JP_GRAPH_MLP=split LLAVA_JP_GRAPH_ATTENTION=split
for r in 1 2; do
  bench base$r bench-generate 1 > /dev/null
  bench tails$r bench-generate 1 LLAVA_JP_GRAPH_SOURCE=.dev/ap/tails.cu > /dev/null
done
bench tails-batch8 bench-generate 1 LLAVA_JP_GRAPH_SOURCE=.dev/ap/tails.cu LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DTAIL_BATCH=8 > /dev/null
bench tails-batch32 bench-generate 1 LLAVA_JP_GRAPH_SOURCE=.dev/ap/tails.cu LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DTAIL_BATCH=32 > /dev/null
unset LLAVA_JP_GRAPH_MLP LLAVA_JP_GRAPH_ATTENTION
bench tails-fused-mlp bench-generate 1 LLAVA_JP_GRAPH_SOURCE=.dev/ap/tails.cu LLAVA_JP_GRAPH_ATTENTION=split > /dev/null
bench tails-fused-both bench-generate 1 LLAVA_JP_GRAPH_SOURCE=.dev/ap/tails.cu > /dev/null
decode_summary
finish

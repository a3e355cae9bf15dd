#!/usr/bin/env bash
# Call 4: the last session's cheaper split-K tails, on main's waits (LLAVA_JP_GRAPH_SYNC=exit of
# f5026e0's binaries, which is main's decode step). tail1.cu: f5026e0's src/graph_decode.cu with
# decode-anatomy-2026-12-06/tail1.patch (one thread arrives for the block with an acquire-release
# add, no fence in every thread); tail2fix.cu: with tail2.patch (also slot_stats by warp
# shuffles and one barrier), slot_stats keeping its 64 floats in a shared array of its own (call
# 2's crash: the prefill passes 32). Then the graph decoder against flex with tail2fix.
CALL=${CALL:-call4} BINARIES="pieces/bench-generate pieces/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-300}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
v=.dev/pieces
export LLAVA_JP_GRAPH_SYNC=exit
for round in 1 2; do
  bench base$round bench-generate 1
  bench tail1-$round bench-generate 1 LLAVA_JP_GRAPH_SOURCE=$v/tail1.cu
  bench tail2fix-$round bench-generate 1 LLAVA_JP_GRAPH_SOURCE=$v/tail2fix.cu
done
t=$(( $(left) - 15 )); [ $t -gt 60 ] && t=60; [ $t -gt 30 ] && run_test graph_decode_matches_flex_bf16 flex-bf16-tail2fix $t LLAVA_JP_GRAPH_SOURCE=$v/tail2fix.cu
t=$(( $(left) - 10 )); [ $t -gt 60 ] && t=60; [ $t -gt 30 ] && run_test graph_decode_matches_flex_f32 flex-f32-tail2fix $t LLAVA_JP_GRAPH_SOURCE=$v/tail2fix.cu
decode_summary
finish

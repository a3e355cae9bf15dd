#!/usr/bin/env bash
# Call 4 (not run: the session's device time ran out): cheaper split-K tails, through
# LLAVA_JP_GRAPH_SOURCE. tail1.cu (src/graph_decode.cu with tail1.patch): `last_to_arrive`
# arrives by one thread's acquire-release add after the barrier, instead of a fence in every
# thread; tail2.cu (tail2.patch): that, and `slot_stats` by warp shuffles with one barrier
# instead of two block-wide sums. Each beside the built-in source, twice, then the graph
# decoder against flex with tail2.
# Carry .dev/rows: bench-generate.xz and graph-decode-test.xz packed from the tree the patches
# apply to (NAMES="bench-generate graph-decode-test" PACK_DIR=.dev/rows), tail1.cu, tail2.cu.
CALL=${CALL:-call4} BINARIES="rows/bench-generate rows/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-260}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
export LLAVA_JP_GRAPH_WEIGHTS=columns
for round in 1 2; do
  bench base$round bench-generate 1
  bench tail1-$round bench-generate 1 LLAVA_JP_GRAPH_SOURCE=.dev/rows/tail1.cu
  bench tail2-$round bench-generate 1 LLAVA_JP_GRAPH_SOURCE=.dev/rows/tail2.cu
done
t=$(( $(left) - 15 )); [ $t -gt 90 ] && t=90; [ $t -gt 30 ] && run_test graph_decode_matches_flex_bf16 flex-bf16-tail2 $t LLAVA_JP_GRAPH_SOURCE=.dev/rows/tail2.cu
[ $(left) -gt 40 ] && run_test graph_decode_matches_flex_f32 flex-f32-tail2 $(( $(left) - 10 )) LLAVA_JP_GRAPH_SOURCE=.dev/rows/tail2.cu
decode_summary
finish

#!/usr/bin/env bash
# Call 2: how each decode kernel waits for the one before (LLAVA_JP_GRAPH_SYNC): `exit`
# (griddepcontrol.wait), `kernel` (every piece of it done, on counters), `pieces` (the build's
# default: only the pieces it reads); and pieces with variants of the source
# (LLAVA_JP_GRAPH_SOURCE): early.cu (kernels after the first product let the next start before
# their wait), tail2.cu (decode-anatomy-2026-12-06/tail2.patch: cheaper split-K tails),
# early-tail2.cu (both). Then the graph decoder against flex.
# Carry .dev/pieces: bench-generate.xz and graph-decode-test.xz packed from f5026e0 (main with
# pieces.patch applied gives the same sync code, plus call 3's acquire loads), and the .cu variants.
CALL=${CALL:-call2} BINARIES="pieces/bench-generate pieces/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-560}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
v=.dev/pieces
for round in 1 2; do
  bench exit$round bench-generate 1 LLAVA_JP_GRAPH_SYNC=exit
  bench kernel$round bench-generate 1 LLAVA_JP_GRAPH_SYNC=kernel
  bench pieces$round bench-generate 1
  bench early$round bench-generate 1 LLAVA_JP_GRAPH_SOURCE=$v/early.cu
  bench tail2-$round bench-generate 1 LLAVA_JP_GRAPH_SOURCE=$v/tail2.cu
  bench early-tail2-$round bench-generate 1 LLAVA_JP_GRAPH_SOURCE=$v/early-tail2.cu
done
t=$(( $(left) - 15 )); [ $t -gt 100 ] && t=100; [ $t -gt 40 ] && run_test graph_decode_matches_flex_bf16 flex-bf16-pieces $t
t=$(( $(left) - 15 )); [ $t -gt 100 ] && t=100; [ $t -gt 40 ] && run_test graph_decode_matches_flex_bf16 flex-bf16-early-tail2 $t LLAVA_JP_GRAPH_SOURCE=$v/early-tail2.cu
[ $(left) -gt 40 ] && run_test graph_decode_matches_flex_f32 flex-f32-pieces $(( $(left) - 10 ))
decode_summary
finish

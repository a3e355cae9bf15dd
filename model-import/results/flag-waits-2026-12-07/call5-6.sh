#!/usr/bin/env bash
# Calls 5 and 6 (H200, warm after call 4), as run, each a one-line command: call 5 set main's waits
# against pieces.patch's (acquire-early.cu) on the H200; call 6 swept the decode GEMV's grid
# and unroll on main's waits. Carry .dev/pieces (binaries of f5026e0 and the .cu variants).
CALL=${CALL:-call5} BINARIES="pieces/bench-generate"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
if [ "$CALL" = call5 ]; then
  limit=150
  for r in 1 2; do
    bench exit$r bench-generate 1 LLAVA_JP_GRAPH_SYNC=exit > /dev/null
    bench acq-early$r bench-generate 1 LLAVA_JP_GRAPH_SOURCE=.dev/pieces/acquire-early.cu > /dev/null
  done
else
  limit=170
  export LLAVA_JP_GRAPH_SYNC=exit
  bench base bench-generate 1 > /dev/null
  bench bps3 bench-generate 1 LLAVA_JP_GRAPH_GEMV_BLOCKS_PER_SM=3 > /dev/null
  bench bps2 bench-generate 1 LLAVA_JP_GRAPH_GEMV_BLOCKS_PER_SM=2 > /dev/null
  bench unroll4 bench-generate 1 LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DGEMV_UNROLL=4 > /dev/null
  bench unroll16 bench-generate 1 LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DGEMV_UNROLL=16 > /dev/null
  bench base2 bench-generate 1 > /dev/null
fi
decode_summary
finish

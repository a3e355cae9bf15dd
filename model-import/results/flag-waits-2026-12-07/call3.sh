#!/usr/bin/env bash
# Call 3: call 2's counters cost each kernel ~2 us even when launched alone: the poll's
# fence.acq_rel.gpu (MEMBAR.ALL.GPU) waits for the warp's preloaded weights to land before
# the prologue may start. acquire.cu polls with ld.acquire.gpu instead (LDG.STRONG.GPU +
# CCTL.IVALL, no MEMBAR); acquire-early.cu also lets the next kernel start before the wait.
# Carry .dev/pieces (call 2's binaries, f5026e0) with the two variants.
CALL=${CALL:-call3} BINARIES="pieces/bench-generate pieces/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-400}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
v=.dev/pieces
for round in 1 2; do
  bench exit$round bench-generate 1 LLAVA_JP_GRAPH_SYNC=exit
  bench acquire$round bench-generate 1 LLAVA_JP_GRAPH_SOURCE=$v/acquire.cu
  bench acquire-early$round bench-generate 1 LLAVA_JP_GRAPH_SOURCE=$v/acquire-early.cu
  bench acquire-kernel$round bench-generate 1 LLAVA_JP_GRAPH_SOURCE=$v/acquire.cu LLAVA_JP_GRAPH_SYNC=kernel
done
t=$(( $(left) - 15 )); [ $t -gt 60 ] && t=60; [ $t -gt 30 ] && run_test graph_decode_matches_flex_bf16 flex-bf16-acquire-early $t LLAVA_JP_GRAPH_SOURCE=$v/acquire-early.cu
decode_summary
finish

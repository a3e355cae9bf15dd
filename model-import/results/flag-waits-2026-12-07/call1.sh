#!/usr/bin/env bash
# Call 1: each decode kernel waits on the kernel before's counter (GRAPH_DECODE_FLAGS, the
# build's default) against `griddepcontrol.wait` (LLAVA_JP_GRAPH_SYNC=exit), and two variants
# through LLAVA_JP_GRAPH_SOURCE: early.cu (kernels after the first product let the next start
# before their wait), tail2.cu (decode-anatomy-2026-12-06/tail2.patch: cheaper split-K tails),
# early-tail2.cu (both); then the graph decoder against flex with the built-in source.
# Carry .dev/flags: bench-generate.xz and graph-decode-test.xz of this tree, and the .cu variants.
CALL=${CALL:-call1} BINARIES="flags/bench-generate flags/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-560}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
v=.dev/flags
for round in 1 2; do
  bench exit$round bench-generate 1 LLAVA_JP_GRAPH_SYNC=exit
  bench flags$round bench-generate 1
  bench early$round bench-generate 1 LLAVA_JP_GRAPH_SOURCE=$v/early.cu
  bench tail2-$round bench-generate 1 LLAVA_JP_GRAPH_SOURCE=$v/tail2.cu
  bench early-tail2-$round bench-generate 1 LLAVA_JP_GRAPH_SOURCE=$v/early-tail2.cu
  [ $round = 1 ] && bench sleep64-$round bench-generate 1 LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DFLAG_SLEEP_NS=64
done
t=$(( $(left) - 15 )); [ $t -gt 100 ] && t=100; [ $t -gt 40 ] && run_test graph_decode_matches_flex_bf16 flex-bf16-flags $t
t=$(( $(left) - 15 )); [ $t -gt 100 ] && t=100; [ $t -gt 40 ] && run_test graph_decode_matches_flex_bf16 flex-bf16-early $t LLAVA_JP_GRAPH_SOURCE=$v/early.cu
[ $(left) -gt 40 ] && run_test graph_decode_matches_flex_f32 flex-f32-flags $(( $(left) - 10 ))
decode_summary
for f in $out/*.jsonl; do echo "$(basename $f .jsonl) $(grep -o '"answers_fnv":"[0-9a-f]*"' $f) $(grep -o '"runs_same_answers":[a-z]*' $f)"; done
finish

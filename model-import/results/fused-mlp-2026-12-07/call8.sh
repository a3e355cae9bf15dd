#!/usr/bin/env bash
# Call 8 (not run): the LayerNorm prologue asking for its first row's h, gamma and beta with
# the slot statistics, one L2 round trip instead of two (prologue-main.patch), on binaries of
# main as it is (3dbfc37 or later): pack them with
#   NAMES="bench-generate graph-decode-test" PACK_DIR=.dev/next bash model-import/scripts/pack_gpu_binaries.sh
# and put main's src/graph_decode.cu with prologue-main.patch applied at .dev/next/prologue.cu.
CALL=${CALL:-call8} BINARIES="next/bench-generate next/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
run_test graph_decode_matches_flex_bf16 flex-bf16-prologue 150 LLAVA_JP_GRAPH_SOURCE=.dev/next/prologue.cu
grep -E "panicked|differ" -A3 "$out/flex-bf16-prologue.log" | head -8
for r in 1 2; do
  bench main$r bench-generate 1 > /dev/null
  bench prologue$r bench-generate 1 LLAVA_JP_GRAPH_SOURCE=.dev/next/prologue.cu > /dev/null
done
decode_summary
finish

#!/usr/bin/env bash
# The step kernel as the default (src/graph_decode.cu: STEP_LL=2, STEP_INFLIGHT=1), binaries
# of the merged tree in .dev/final: every graph-decoder test with the defaults, each in a
# process of its own; the generation bench twice with the default (the step kernel; the
# profile times the step's kernels in the same run) and once with LLAVA_JP_GRAPH_STEP=kernels;
# transformers' generate on the same prompt.
CALL=${CALL:-call1} BINARIES="final/bench-generate final/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
for t in graph_decode_matches_flex_bf16 graph_decode_matches_flex_f32 graph_decode_matches_eager_f32 graph_decode_matches_eager_bf16 graph_decode_rejects_a_model_of_another_shape; do
  run_test $t $t 150
  grep -E "panicked|differ" -A3 "$out/$t.log" | head -6
done
bench default-a bench-generate 1 > /dev/null; stepms default-a
bench kernels bench-generate 1 LLAVA_JP_GRAPH_STEP=kernels > /dev/null; stepms kernels
bench default-b bench-generate 1 > /dev/null; stepms default-b
transformers 90
decode_summary | cut -c1-200
finish

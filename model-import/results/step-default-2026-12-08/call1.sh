#!/usr/bin/env bash
# The step kernel as the default (src/graph_decode.cu: STEP_LL=2, STEP_INFLIGHT=1), binaries
# of the merged tree in .dev/final. First the generation bench with the default (the step
# kernel; the profile times the step's kernels in the same run) and with
# LLAVA_JP_GRAPH_STEP=kernels, since the H200's numbers are what the call is for (the kernel's
# source with these options passed the flex tests in ../pairs-2026-12-07/ call 3); then, in
# what time is left, the graph-decoder tests, each in a process of its own, and transformers.
CALL=${CALL:-default1} BINARIES="final/bench-generate final/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
bench default-a bench-generate 1 > /dev/null; stepms default-a
bench kernels bench-generate 1 LLAVA_JP_GRAPH_STEP=kernels > /dev/null; stepms kernels
bench default-b bench-generate 1 > /dev/null; stepms default-b
graph_tests graph_decode_matches_flex_bf16 graph_decode_matches_flex_f32 graph_decode_matches_eager_bf16 \
  graph_decode_rejects_a_model_of_another_shape graph_decode_matches_eager_f32
transformers 90
decode_summary | cut -c1-200
finish

#!/usr/bin/env bash
# Call 4: the step kernel on its own copy of the weights by column blocks (a stage is one
# contiguous stretch), binaries of that tree (.dev/mk): the flex tests, then the bench with one
# bulk copy a stage (the default) and with cp.async (STEP_BULK=0), the stream alone and a trace
# (.dev/mk/diag.cu, made from the tree's source by mkdiag.py).
CALL=${CALL:-call4} BINARIES="mk/bench-generate mk/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
diag=LLAVA_JP_GRAPH_SOURCE=.dev/mk/diag.cu
stepms() { grep -o '"step_kernel_graph_ms":[^,]*,"kernels_graph_ms":[^,]*' "$out/$1.jsonl"; tail -2 "$out/$1.err"; }
run_test graph_decode_matches_flex_bf16 flex-bf16 120
grep -E "panicked|differ" -A2 "$out/flex-bf16.log" | head -12
bench bulk bench-generate 1 LLAVA_JP_GRAPH_STEP=kernel > /dev/null; stepms bulk
bench async bench-generate 1 LLAVA_JP_GRAPH_STEP=kernel LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DSTEP_BULK=0 > /dev/null; stepms async
bench stream bench-generate 1 LLAVA_JP_GRAPH_STEP=kernel $diag LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DDIAG_STREAM_ONLY > /dev/null; stepms stream
bench trace bench-generate 1 LLAVA_JP_GRAPH_STEP=kernel $diag LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DSTEP_TRACE_POS=650 > /dev/null; stepms trace
for v in ${VARIANTS:-}; do
  bench $v bench-generate 1 LLAVA_JP_GRAPH_STEP=kernel LLAVA_JP_GRAPH_SOURCE=.dev/mk/$v.cu > /dev/null; stepms $v
done
run_test graph_decode_matches_flex_f32 flex-f32 120
grep -E "panicked|differ" -A2 "$out/flex-f32.log" | head -12
bench bulk2 bench-generate 1 LLAVA_JP_GRAPH_STEP=kernel > /dev/null; stepms bulk2
decode_summary
finish

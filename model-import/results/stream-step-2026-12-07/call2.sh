#!/usr/bin/env bash
# Call 2: the flex tests with the test's lock mended; then the step kernel part by part, on the
# same binaries (.dev/mk) with .dev/mk/diag.cu (src/graph_decode.cu with diagnostics,
# made by mkdiag.py): the ring's stream alone (DIAG_STREAM_ONLY: the computing warps only free
# the stages), no counter waits (DIAG_NO_WAIT, wrong numbers), and a trace of four blocks'
# tasks at position 650 (STEP_TRACE_POS: start, end of the wait, end of each task, in ns).
CALL=${CALL:-call2} BINARIES="mk/bench-generate mk/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
diag=LLAVA_JP_GRAPH_SOURCE=.dev/mk/diag.cu
stepms() { grep -o '"step_kernel_graph_ms":[^,]*,"kernels_graph_ms":[^,]*' "$out/$1.jsonl"; tail -2 "$out/$1.err"; }
run_test graph_decode_matches_flex_bf16 flex-bf16 120
grep -E "no step kernel|panicked|differ" -A2 "$out/flex-bf16.log" | head -12
bench step bench-generate 1 LLAVA_JP_GRAPH_STEP=kernel > /dev/null; stepms step
bench stream bench-generate 1 LLAVA_JP_GRAPH_STEP=kernel $diag LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DDIAG_STREAM_ONLY > /dev/null; stepms stream
bench nowait bench-generate 1 LLAVA_JP_GRAPH_STEP=kernel $diag LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DDIAG_NO_WAIT > /dev/null; stepms nowait
bench trace bench-generate 1 LLAVA_JP_GRAPH_STEP=kernel $diag LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DSTEP_TRACE_POS=650 > /dev/null; stepms trace
grep -c TRACE "$out/trace.jsonl"
run_test graph_decode_matches_flex_f32 flex-f32 120
grep -E "no step kernel|panicked|differ" -A2 "$out/flex-f32.log" | head -12
decode_summary
finish

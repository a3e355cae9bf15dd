#!/usr/bin/env bash
# Call 6: with cp.async as the default (.dev/mk/step.cu, this tree's source; same binaries as
# call 5): the bench again, the trace (its waits on several counters now timed too) and the
# stream alone, both by cp.async (.dev/mk/diag.cu from mkdiag.py).
CALL=${CALL:-call6} BINARIES="mk/bench-generate"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
src=LLAVA_JP_GRAPH_SOURCE=.dev/mk/step.cu diag=LLAVA_JP_GRAPH_SOURCE=.dev/mk/diag.cu
stepms() { grep -o '"step_kernel_graph_ms":[^,]*,"kernels_graph_ms":[^,]*' "$out/$1.jsonl"; tail -2 "$out/$1.err"; }
bench step bench-generate 1 LLAVA_JP_GRAPH_STEP=kernel $src > /dev/null; stepms step
bench trace bench-generate 1 LLAVA_JP_GRAPH_STEP=kernel $diag LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DSTEP_TRACE_POS=650 > /dev/null; stepms trace
bench stream bench-generate 1 LLAVA_JP_GRAPH_STEP=kernel $diag LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DDIAG_STREAM_ONLY > /dev/null; stepms stream
decode_summary
finish

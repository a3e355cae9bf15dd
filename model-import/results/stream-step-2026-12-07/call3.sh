#!/usr/bin/env bash
# Call 3: the ring filled by 16-byte cp.async from every lane of the streaming warp instead of
# bulk copies (.dev/mk/step.cu: src/graph_decode.cu as of this call; STEP_BULK=1 is call 1's
# bulk copies), its stream alone and its trace (diag.cu made from it by mkdiag.py), and the
# flex bf16 test on it. Same binaries as calls 1-2 (.dev/mk).
CALL=${CALL:-call3} BINARIES="mk/bench-generate mk/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
src=LLAVA_JP_GRAPH_SOURCE=.dev/mk/step.cu diag=LLAVA_JP_GRAPH_SOURCE=.dev/mk/diag.cu
stepms() { grep -o '"step_kernel_graph_ms":[^,]*,"kernels_graph_ms":[^,]*' "$out/$1.jsonl"; tail -2 "$out/$1.err"; }
bench async bench-generate 1 LLAVA_JP_GRAPH_STEP=kernel $src > /dev/null; stepms async
bench bulk bench-generate 1 LLAVA_JP_GRAPH_STEP=kernel $src LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DSTEP_BULK=1 > /dev/null; stepms bulk
bench stream bench-generate 1 LLAVA_JP_GRAPH_STEP=kernel $diag LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DDIAG_STREAM_ONLY > /dev/null; stepms stream
bench trace bench-generate 1 LLAVA_JP_GRAPH_STEP=kernel $diag LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DSTEP_TRACE_POS=650 > /dev/null; stepms trace
run_test graph_decode_matches_flex_bf16 flex-bf16 120 $src
grep -E "panicked|differ" -A2 "$out/flex-bf16.log" | head -12
bench async2 bench-generate 1 LLAVA_JP_GRAPH_STEP=kernel $src > /dev/null; stepms async2
decode_summary
finish

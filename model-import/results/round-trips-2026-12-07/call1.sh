#!/usr/bin/env bash
# Call 1: the step kernel with fewer dependent round trips to memory (rtt.cu: the layers'
# pointers in shared memory, every load of a task's prologue and residual tail issued
# together) against the tree's source before (main.cu), both carried in .dev/mk and compiled
# by 99f58aa's binaries (LLAVA_JP_GRAPH_SOURCE). The flex tests on rtt.cu (both paths: the
# step's kernels share combined_stats and the LayerNorm rows), an ablation (the table of one
# layer: only the batched loads), a trace of rtt.cu (diag-rtt.cu: mkdiag.py, TRACE_MAX 136).
CALL=${CALL:-call1} BINARIES="mk/bench-generate mk/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
k=LLAVA_JP_GRAPH_STEP=kernel
stepms() { grep -o '"step_kernel_graph_ms":[^,]*,"kernels_graph_ms":[^,]*' "$out/$1.jsonl"; tail -1 "$out/$1.err"; }
src() { echo LLAVA_JP_GRAPH_SOURCE=.dev/mk/$1.cu; }
bench main bench-generate 1 $k $(src main) > /dev/null; stepms main
bench rtt bench-generate 1 $k $(src rtt) > /dev/null; stepms rtt
run_test graph_decode_matches_flex_bf16 flex-bf16-rtt 100 $(src rtt)
grep -E "panicked|differ" -A2 "$out/flex-bf16-rtt.log" | head -8
bench main2 bench-generate 1 $k $(src main) > /dev/null; stepms main2
bench rtt2 bench-generate 1 $k $(src rtt) > /dev/null; stepms rtt2
bench rtt-table1 bench-generate 1 $k $(src rtt) LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DSTEP_LAYER_TABLE=1 > /dev/null; stepms rtt-table1
bench trace bench-generate 1 $k $(src diag-rtt) LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DSTEP_TRACE_POS=650 > /dev/null; stepms trace
run_test graph_decode_matches_flex_f32 flex-f32-rtt 100 $(src rtt)
grep -E "panicked|differ" -A2 "$out/flex-f32-rtt.log" | head -8
bench rtt256 bench-generate 1 $k $(src rtt) LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DSTEP_CHUNK_KEYS=256 > /dev/null; stepms rtt256
decode_summary
finish

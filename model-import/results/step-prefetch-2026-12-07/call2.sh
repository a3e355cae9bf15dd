#!/usr/bin/env bash
# Call 2 (call 1 showed the L2 prefetch slowing the step): the variants again without it
# (-DSTEP_PREFETCH=0), beside the tree's source without it: attention chunks that fill the grid
# (chunks.cu), the attention read 16 bytes a lane (attn.cu), the MLP in twice as many tiles, and
# a trace of chunks.cu (diag-chunks.cu: mkdiag.py on it). Same binaries as call 1.
CALL=${CALL:-call2} BINARIES="mk/bench-generate"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
k=LLAVA_JP_GRAPH_STEP=kernel p0=-DSTEP_PREFETCH=0
stepms() { grep -o '"step_kernel_graph_ms":[^,]*,"kernels_graph_ms":[^,]*' "$out/$1.jsonl"; }
bench p0 bench-generate 1 $k LLAVA_JP_GRAPH_NVRTC_OPTIONS=$p0 > /dev/null; stepms p0
bench chunks bench-generate 1 $k LLAVA_JP_GRAPH_SOURCE=.dev/mk/chunks.cu LLAVA_JP_GRAPH_NVRTC_OPTIONS=$p0 > /dev/null; stepms chunks
bench attn bench-generate 1 $k LLAVA_JP_GRAPH_SOURCE=.dev/mk/attn.cu LLAVA_JP_GRAPH_NVRTC_OPTIONS=$p0 > /dev/null; stepms attn
bench halves bench-generate 1 $k LLAVA_JP_GRAPH_STEP_SPLITS=5,16,8,32 LLAVA_JP_GRAPH_NVRTC_OPTIONS=$p0 > /dev/null; stepms halves
bench trace bench-generate 1 $k LLAVA_JP_GRAPH_SOURCE=.dev/mk/diag-chunks.cu "LLAVA_JP_GRAPH_NVRTC_OPTIONS=$p0 -DSTEP_TRACE_POS=650" > /dev/null; stepms trace
bench chunks2 bench-generate 1 $k LLAVA_JP_GRAPH_SOURCE=.dev/mk/chunks.cu LLAVA_JP_GRAPH_NVRTC_OPTIONS=$p0 > /dev/null; stepms chunks2
bench p0b bench-generate 1 $k LLAVA_JP_GRAPH_NVRTC_OPTIONS=$p0 > /dev/null; stepms p0b
decode_summary
finish

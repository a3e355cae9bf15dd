#!/usr/bin/env bash
# Call 1: the step kernel's stream walking STEP_PREFETCH stages ahead of its fills, asking L2
# for each (cp.async.bulk.prefetch.L2), against the same source without (=0); the tree's
# binaries in .dev/mk (their embedded source has the prefetch, 8 ahead). The flex bf16 test on
# the embedded source and on attn.cu (../stream-step-2026-12-07/attention.patch on it); the
# bench at several distances, with the attention patch, with the MLP in twice as many tiles
# (LLAVA_JP_GRAPH_STEP_SPLITS), with attention chunks of as many keys as fill the grid (chunks.cu:
# keys' stages, then values'; with 256 keys, two stages each, to check those), and a trace (.dev/mk/diag.cu, mkdiag.py on the tree's source).
CALL=${CALL:-call1} BINARIES="mk/bench-generate mk/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
k=LLAVA_JP_GRAPH_STEP=kernel
stepms() { grep -o '"step_kernel_graph_ms":[^,]*,"kernels_graph_ms":[^,]*' "$out/$1.jsonl"; tail -2 "$out/$1.err"; }
pf() { echo LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DSTEP_PREFETCH=$1; }
bench p0 bench-generate 1 $k $(pf 0) > /dev/null; stepms p0
bench p8 bench-generate 1 $k $(pf 8) > /dev/null; stepms p8
bench p8-chunks bench-generate 1 $k LLAVA_JP_GRAPH_SOURCE=.dev/mk/chunks.cu > /dev/null; stepms p8-chunks
bench p16 bench-generate 1 $k $(pf 16) > /dev/null; stepms p16
run_test graph_decode_matches_flex_bf16 flex-bf16 100 $(pf 8)
grep -E "panicked|differ" -A2 "$out/flex-bf16.log" | head -8
bench p8-attn bench-generate 1 $k LLAVA_JP_GRAPH_SOURCE=.dev/mk/attn.cu > /dev/null; stepms p8-attn
bench trace bench-generate 1 $k LLAVA_JP_GRAPH_SOURCE=.dev/mk/diag.cu LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DSTEP_TRACE_POS=650 > /dev/null; stepms trace
bench p8-mlp-halves bench-generate 1 $k $(pf 8) LLAVA_JP_GRAPH_STEP_SPLITS=5,16,8,32 > /dev/null; stepms p8-mlp-halves
run_test graph_decode_matches_flex_bf16 flex-bf16-chunks 100 LLAVA_JP_GRAPH_SOURCE=.dev/mk/chunks.cu
grep -E "panicked|differ" -A2 "$out/flex-bf16-chunks.log" | head -8
bench chunks256 bench-generate 1 $k LLAVA_JP_GRAPH_SOURCE=.dev/mk/chunks.cu LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DSTEP_CHUNK_KEYS=256 > /dev/null; stepms chunks256
bench p4 bench-generate 1 $k $(pf 4) > /dev/null; stepms p4
decode_summary
finish

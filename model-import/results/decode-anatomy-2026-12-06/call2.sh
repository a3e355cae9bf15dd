#!/usr/bin/env bash
# Call 2: decode products on weights by output row (gemv_rows_*: no split-K, no last-block
# tail). `rows`: c_attn, c_fc and mlp.c_proj; `all-rows`: attn.c_proj too (gemv_rows_merge_*,
# each block merging every head's attention chunks). The full-size greedy decode bench with
# each layout (columns, the split-K products, beside them in the same call), the graph
# decoder's tests against flex with rows and all-rows, then variants of the rows kernels
# (without the wait, threads per block of mlp.c_proj's, blocks an SM).
# Carry .dev/rows (bench-generate.xz, graph-decode-test.xz packed from this tree; diag.cu, this
# tree's src/graph_decode.cu with diag-rows.patch applied: a DIAG_NO_WAIT switch).
CALL=${CALL:-call2} BINARIES="rows/bench-generate rows/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-560}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
export LLAVA_JP_GRAPH_WEIGHTS=rows
bench rows bench-generate 1
bench columns bench-generate 1 LLAVA_JP_GRAPH_WEIGHTS=columns
bench all-rows bench-generate 1 LLAVA_JP_GRAPH_WEIGHTS=all-rows
t=$(( $(left) - 15 )); [ $t -gt 90 ] && t=90; [ $t -gt 30 ] && run_test graph_decode_matches_flex_bf16 flex-bf16-rows $t
t=$(( $(left) - 15 )); [ $t -gt 90 ] && t=90; [ $t -gt 30 ] && run_test graph_decode_matches_flex_bf16 flex-bf16-all-rows $t LLAVA_JP_GRAPH_WEIGHTS=all-rows
# The same kernels without waiting for the kernel before (wrong numbers; the time of the
# step's weights streamed with no dependency between kernels).
bench rows-nowait bench-generate 1 LLAVA_JP_GRAPH_SOURCE=.dev/rows/diag.cu LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DDIAG_NO_WAIT
bench rows-inner512 bench-generate 1 LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DROWS_THREADS_INNER=512
bench rows-2sm bench-generate 1 LLAVA_JP_GRAPH_ROWS_BLOCKS_PER_SM=2
[ $(left) -gt 100 ] && run_test graph_decode_matches_flex_f32 flex-f32-all-rows 80 LLAVA_JP_GRAPH_WEIGHTS=all-rows
decode_summary
finish

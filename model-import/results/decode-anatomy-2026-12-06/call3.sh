#!/usr/bin/env bash
# Call 3: attn.c_proj's merge of the attention's chunks with the block's loads in flight at once
# (`merge_rows_into`: .dev/rows/merge.cu, diagc.cu with it) beside the built-in source, its
# test against flex in bf16; then the step's skeleton of latencies (no weights read by the
# GEMVs, DIAG_NO_WEIGHTS), with its split-K tails and its prologues dropped in turn, so that
# what is left is the kernels' launches and waits, and the skeleton on grids for 1 and 2 GEMV
# blocks an SM. Same binaries as call 1 (carry .dev/rows: bench-generate.xz and
# graph-decode-test.xz packed at 3ece8d3, diagc.cu, merge.cu).
CALL=${CALL:-call3} BINARIES="rows/bench-generate rows/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-400}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
export LLAVA_JP_GRAPH_WEIGHTS=columns
m=LLAVA_JP_GRAPH_SOURCE=.dev/rows/merge.cu
bench base bench-generate 1
bench merge bench-generate 1 $m
bench base2 bench-generate 1
bench merge2 bench-generate 1 $m
t=$(( $(left) - 15 )); [ $t -gt 90 ] && t=90; [ $t -gt 30 ] && run_test graph_decode_matches_flex_bf16 flex-bf16-merge $t $m
export LLAVA_JP_GRAPH_SOURCE=.dev/rows/diagc.cu
o=LLAVA_JP_GRAPH_NVRTC_OPTIONS
bench no-weights bench-generate 1 "$o=-DDIAG_NO_WEIGHTS"
bench no-weights-tail-prologue bench-generate 1 "$o=-DDIAG_NO_WEIGHTS -DDIAG_NO_TAIL -DDIAG_NO_PROLOGUE"
bench no-weights-tail-prologue-wait bench-generate 1 "$o=-DDIAG_NO_WEIGHTS -DDIAG_NO_TAIL -DDIAG_NO_PROLOGUE -DDIAG_NO_WAIT"
bench no-weights-tail bench-generate 1 "$o=-DDIAG_NO_WEIGHTS -DDIAG_NO_TAIL"
bench no-weights-prologue bench-generate 1 "$o=-DDIAG_NO_WEIGHTS -DDIAG_NO_PROLOGUE"
bench no-weights-2sm bench-generate 1 "$o=-DDIAG_NO_WEIGHTS" LLAVA_JP_GRAPH_GEMV_BLOCKS_PER_SM=2
bench no-weights-1sm bench-generate 1 "$o=-DDIAG_NO_WEIGHTS" LLAVA_JP_GRAPH_GEMV_BLOCKS_PER_SM=1
[ $(left) -gt 100 ] && run_test graph_decode_matches_flex_f32 flex-f32-merge 80 LLAVA_JP_GRAPH_SOURCE=.dev/rows/merge.cu
decode_summary
finish

#!/usr/bin/env bash
# Call 1 (branch ln-fold): the step kernel with its LayerNorms applied after c_attn and c_fc
# (STEP_FOLD=1, the branch's default) against normalising first (STEP_FOLD=0), same binaries
# (.dev/fold: NAMES="bench-generate graph-decode-test" PACK_DIR=.dev/fold bash
# model-import/scripts/pack_gpu_binaries.sh on the branch). The flex tests first (both paths
# against burn's CPU backend: a wrong fold fails them), then the bench twice each, a trace
# (mkdiag2.py), the streaming warp's in-flight knob and the ring's stages on top, and the pair
# once more. If a flex test fails, the rest of the call measures the knobs without the fold.
CALL=${CALL:-call1} BINARIES="fold/bench-generate fold/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
k=LLAVA_JP_GRAPH_STEP=kernel
stepms() { echo "$1 $(grep -o '"step_kernel_graph_ms":[^,}]*' $out/$1.jsonl) $(grep -o '"kernels_graph_ms":[^,}]*' $out/$1.jsonl) $(grep -o '"answers_fnv":[^,}]*' $out/$1.jsonl)"; }
opt() { echo "LLAVA_JP_GRAPH_NVRTC_OPTIONS=$*"; }
run_test graph_decode_matches_flex_bf16 flex-bf16 100
grep -E "panicked|differ" -A3 "$out/flex-bf16.log" | head -8
run_test graph_decode_matches_flex_f32 flex-f32 100
grep -E "panicked|differ" -A3 "$out/flex-f32.log" | head -8
# A wrong fold: spend the call on the in-flight question instead, normalising first.
if ! grep -q "test result: ok" "$out/flex-bf16.log" || ! grep -q "test result: ok" "$out/flex-f32.log"; then
  f0=$(opt -DSTEP_FOLD=0)
  bench base bench-generate 1 $k $f0 > /dev/null; stepms base
  bench in2 bench-generate 1 $k "$(opt -DSTEP_FOLD=0 -DSTEP_INFLIGHT=2)" > /dev/null; stepms in2
  bench in3 bench-generate 1 $k "$(opt -DSTEP_FOLD=0 -DSTEP_INFLIGHT=3)" > /dev/null; stepms in3
  bench st4 bench-generate 1 $k "$(opt -DSTEP_FOLD=0 -DSTEP_STAGES=4)" > /dev/null; stepms st4
  bench base2 bench-generate 1 $k $f0 > /dev/null; stepms base2
  decode_summary; finish; exit 0
fi
bench fold0 bench-generate 1 $k $(opt -DSTEP_FOLD=0) > /dev/null; stepms fold0
bench fold bench-generate 1 $k > /dev/null; stepms fold
bench fold0b bench-generate 1 $k $(opt -DSTEP_FOLD=0) > /dev/null; stepms fold0b
bench foldb bench-generate 1 $k > /dev/null; stepms foldb
python3 model-import/results/round-trips-2026-12-07/mkdiag2.py /tmp/diag-fold.cu src/graph_decode.cu
bench trace bench-generate 1 $k LLAVA_JP_GRAPH_SOURCE=/tmp/diag-fold.cu $(opt -DSTEP_TRACE_POS=650) > /dev/null; stepms trace
python3 model-import/results/round-trips-2026-12-07/trace2.py $out/trace.jsonl
bench fold-in2 bench-generate 1 $k $(opt -DSTEP_INFLIGHT=2) > /dev/null; stepms fold-in2
bench fold-in3 bench-generate 1 $k $(opt -DSTEP_INFLIGHT=3) > /dev/null; stepms fold-in3
bench fold-st4 bench-generate 1 $k $(opt -DSTEP_STAGES=4) > /dev/null; stepms fold-st4
bench fold0c bench-generate 1 $k $(opt -DSTEP_FOLD=0) > /dev/null; stepms fold0c
bench foldc bench-generate 1 $k > /dev/null; stepms foldc
# transformers' generate on the same prompt, in what time is left (the issue's table: beside PyTorch).
transformers 90
decode_summary
finish

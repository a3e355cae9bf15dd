#!/usr/bin/env bash
# The step kernel's ring of weight stages by size (ring.patch: LLAVA_JP_GRAPH_STEP_RING=
# stages x bytes), binaries in .dev/ring. With one 32 KiB stage in flight the step was fastest
# (../pairs-2026-12-07/); smaller stages queue less ahead of the computing warps' own loads,
# but keep fewer bytes in flight. First the default (the step kernel against the step's
# kernels, in the same runs: the H200's numbers, if the call lands on one), then the flex tests
# of the smallest stages (their attention chunks are smaller, so its sums split otherwise), then
# each ring twice, rounds interleaved, and the graph-decoder tests with the default.
CALL=${CALL:-ring1} BINARIES="ring/bench-generate ring/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
declare -A ring=([R6x32]="6x32768" [R12x16]="12x16384" [R24x8]="24x8192" [R8x24]="8x24576")
declare -A opts=([I1]="-DSTEP_INFLIGHT=1" [I2]="-DSTEP_INFLIGHT=2" [I4]="-DSTEP_INFLIGHT=4")
# name = ring + in-flight count, e.g. R12x16I2.
envs() { local r=${1%I*} i=I${1##*I}; echo "LLAVA_JP_GRAPH_STEP_RING=${ring[$r]} LLAVA_JP_GRAPH_NVRTC_OPTIONS=${opts[$i]}"; }
for v in R24x8I2 R12x16I1; do
  for dtype in bf16 f32; do
    run_test graph_decode_matches_flex_$dtype flex-$dtype-$v 100 $(envs $v)
    grep -E "panicked|differ" -A3 "$out/flex-$dtype-$v.log" | head -6
  done
done
for round in a b; do
  for v in R6x32I1 R12x16I1 R12x16I2 R24x8I2 R24x8I4 R8x24I1; do
    bench $v$round bench-generate 1 $(envs $v) > /dev/null; stepms $v$round
  done
done
graph_tests graph_decode_matches_eager_bf16 graph_decode_matches_eager_f32 graph_decode_rejects_a_model_of_another_shape
transformers 90
decode_summary | cut -c1-200
finish

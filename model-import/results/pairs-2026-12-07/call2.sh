#!/usr/bin/env bash
# Call 2: after call 1 (all variants passed, same digest), is the step kernel's STEP_INFLIGHT=2
# on the pairs (L2) a real gain? Flex tests of L2 with it, then F0, L2 and L2 with
# STEP_INFLIGHT 1, 2, 4 in three interleaved rounds (the step's kernels timed in the same runs).
CALL=${CALL:-call2} BINARIES="next/bench-generate next/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
k=LLAVA_JP_GRAPH_STEP=kernel
declare -A flags=([F0]="-DSTEP_FOLD=0" [L2]="-DSTEP_LL=2" [L2I1]="-DSTEP_LL=2 -DSTEP_INFLIGHT=1" [L2I2]="-DSTEP_LL=2 -DSTEP_INFLIGHT=2" [L2I4]="-DSTEP_LL=2 -DSTEP_INFLIGHT=4")
nv() { echo "LLAVA_JP_GRAPH_NVRTC_OPTIONS=${flags[$1]}"; }
for dtype in bf16 f32; do
  run_test graph_decode_matches_flex_$dtype flex-$dtype-L2I2 100 "$(nv L2I2)"
  grep -E "panicked|differ" -A3 "$out/flex-$dtype-L2I2.log" | head -6
done
for round in a b c; do
  for v in F0 L2 L2I2 L2I1 L2I4; do
    [ $round = c ] && [ $v = L2I1 -o $v = L2I4 ] && continue
    bench $v$round bench-generate 1 $k "$(nv $v)" > /dev/null; stepms $v$round
  done
done
decode_summary | cut -c1-140
finish

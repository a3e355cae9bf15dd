#!/usr/bin/env bash
# Call 3: call 2 found STEP_INFLIGHT=1 fastest (1.275 ms against 1.396 at 6 on an H100). Flex
# tests of L2 with it; then, two rounds, with one stage in flight: each variant (F0, F1, L1, L2),
# fewer stages (2, 3), the bulk copy, and the step's kernels timed in the same runs.
CALL=${CALL:-call3} BINARIES="next/bench-generate next/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
k=LLAVA_JP_GRAPH_STEP=kernel
i1=-DSTEP_INFLIGHT=1
declare -A flags=([F0I1]="-DSTEP_FOLD=0 $i1" [F1I1]="$i1" [L1I1]="-DSTEP_LL=1 $i1" [L2I1]="-DSTEP_LL=2 $i1"
  [L2I1S2]="-DSTEP_LL=2 $i1 -DSTEP_STAGES=2" [L2I1S3]="-DSTEP_LL=2 $i1 -DSTEP_STAGES=3" [L2I1B]="-DSTEP_LL=2 $i1 -DSTEP_BULK=1" [L2]="-DSTEP_LL=2")
nv() { echo "LLAVA_JP_GRAPH_NVRTC_OPTIONS=${flags[$1]}"; }
for dtype in bf16 f32; do
  run_test graph_decode_matches_flex_$dtype flex-$dtype-L2I1 100 "$(nv L2I1)"
  grep -E "panicked|differ" -A3 "$out/flex-$dtype-L2I1.log" | head -6
done
for round in a b; do
  for v in L2I1 F0I1 F1I1 L1I1 L2I1S2 L2I1S3 L2I1B L2; do
    bench $v$round bench-generate 1 $k "$(nv $v)" > /dev/null; stepms $v$round
  done
done
decode_summary | cut -c1-110
finish

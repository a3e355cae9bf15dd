#!/usr/bin/env bash
# Call 2: does what the streaming warp keeps in flight slow the computing warps' own loads?
# The tree's source (b1b8a17: d33270b's with two knobs, read through LLAVA_JP_GRAPH_SOURCE by
# 99f58aa's binaries in .dev/mk): STEP_INFLIGHT, the stages whose
# cp.asyncs may be in flight at once (the warp waits on its own copies, cp.async.wait_group),
# and STEP_STAGES, the ring's stages. Traces (mkdiag2.py: with each task's wait for its
# stages' data) as it is and at 3 in flight.
CALL=${CALL:-call2} BINARIES="mk/bench-generate"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
k=LLAVA_JP_GRAPH_STEP=kernel s=LLAVA_JP_GRAPH_SOURCE=src/graph_decode.cu
python3 model-import/results/round-trips-2026-12-07/mkdiag2.py /tmp/diag-inflight.cu src/graph_decode.cu
opt() { echo "LLAVA_JP_GRAPH_NVRTC_OPTIONS=$*"; }
bench base bench-generate 1 $k $s > /dev/null; stepms base
bench in2 bench-generate 1 $k $s $(opt -DSTEP_INFLIGHT=2) > /dev/null; stepms in2
bench in3 bench-generate 1 $k $s $(opt -DSTEP_INFLIGHT=3) > /dev/null; stepms in3
t=LLAVA_JP_GRAPH_SOURCE=/tmp/diag-inflight.cu
bench trace bench-generate 1 $k $t $(opt -DSTEP_TRACE_POS=650) > /dev/null; stepms trace
python3 model-import/results/round-trips-2026-12-07/trace2.py $out/trace.jsonl
bench in1 bench-generate 1 $k $s $(opt -DSTEP_INFLIGHT=1) > /dev/null; stepms in1
bench st4 bench-generate 1 $k $s $(opt -DSTEP_STAGES=4) > /dev/null; stepms st4
bench base2 bench-generate 1 $k $s > /dev/null; stepms base2
bench in4 bench-generate 1 $k $s $(opt -DSTEP_INFLIGHT=4) > /dev/null; stepms in4
bench trace3 bench-generate 1 $k $t "$(opt -DSTEP_TRACE_POS=650 -DSTEP_INFLIGHT=3)" > /dev/null; stepms trace3
python3 model-import/results/round-trips-2026-12-07/trace2.py $out/trace3.jsonl
decode_summary
finish

#!/usr/bin/env bash
# Call 4: the step kernel's barrier split around the preload (barrier_arrive, the next phase's
# first loads, barrier_wait spinning on acquire loads, no fence). The graph decoder's tests
# against flex (both paths), then the full-size greedy decode bench with the step kernel
# (its profile times the kernels' graph too, in the same process), then variants compiled
# from the same source: one level (-DBARRIER_GROUP=1024), 3 blocks an SM; then Nsight
# Compute on one step-kernel launch (warp states, memory, occupancy).
# Carry .dev/next (bench-generate.xz, graph-decode-test.xz, packed from this tree).
CALL=${CALL:-call4} BINARIES="next/bench-generate next/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-400}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
run_test graph_decode_matches_flex_bf16 flex-bf16 120
run_test graph_decode_matches_flex_f32 flex-f32 120
bench ours-step bench-generate 3 LLAVA_JP_GRAPH_STEP=kernel
bench one-level bench-generate 1 LLAVA_JP_GRAPH_STEP=kernel LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DBARRIER_GROUP=1024
bench step-3 bench-generate 1 LLAVA_JP_GRAPH_STEP=kernel LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DSTEP_MIN_BLOCKS=3
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
t=$(( $(left) - 20 )); [ $t -gt 120 ] && t=120
if [ -n "$ncu" ] && [ $t -gt 40 ]; then
  NEW=8 timeout $t "$ncu" --kernel-name regex:decode_step --launch-skip 2 --launch-count 1 --graph-profiling node \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats \
    -o "$out/ncu-step" -f env LLAVA_JP_GRAPH_STEP=kernel /tmp/bench-generate $bench_args --runs 1 > "$out/ncu-step.log" 2>&1
  "$ncu" -i "$out/ncu-step.ncu-rep" --page details --print-details all > "$out/ncu-step.txt" 2>&1
  echo "== ncu step kernel ($((SECONDS - start)) s)"
  grep -E "Duration|Warp Cycles Per Issued|Registers Per|Achieved Occupancy|Issue Slots Busy|Stall|DRAM Throughput|Memory Throughput" "$out/ncu-step.txt" | head -30
fi
finish

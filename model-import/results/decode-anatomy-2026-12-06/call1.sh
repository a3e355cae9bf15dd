#!/usr/bin/env bash
# Call 1: where a decode step's time goes. The same greedy decode bench (full size, batch 1,
# graph decoder, split-K products on Conv1D's layout) with variants of the decode source
# (.dev/rows/diagc.cu: src/graph_decode.cu at 3ece8d3 with diag-columns.patch applied) that
# each drop one part of the step: the waits for the kernel before (DIAG_NO_WAIT), the weights
# (DIAG_NO_WEIGHTS: the step's skeleton of latencies), the split-K tails (DIAG_NO_TAIL), the
# GEMV prologues (DIAG_NO_PROLOGUE). Their numbers are wrong; only their times count. Then
# Nsight Compute on one layer's five kernels inside the graph (warp states and per-SASS stall
# samples).
# Carry .dev/rows (bench-generate.xz packed at 3ece8d3, whose decoder loads the rows kernels'
# entry points too, and diagc.cu).
CALL=${CALL:-call1} BINARIES="rows/bench-generate"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-420}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
export LLAVA_JP_GRAPH_WEIGHTS=columns
src=LLAVA_JP_GRAPH_SOURCE=.dev/rows/diagc.cu
bench base bench-generate 2
bench diag-base bench-generate 1 $src
bench no-wait bench-generate 1 $src LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DDIAG_NO_WAIT
bench no-weights bench-generate 1 $src LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DDIAG_NO_WEIGHTS
bench no-tail bench-generate 1 $src LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DDIAG_NO_TAIL
bench no-prologue bench-generate 1 $src LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DDIAG_NO_PROLOGUE
bench no-tail-prologue bench-generate 1 $src "LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DDIAG_NO_TAIL -DDIAG_NO_PROLOGUE"
bench no-weights-wait bench-generate 1 $src "LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DDIAG_NO_WEIGHTS -DDIAG_NO_WAIT"
decode_summary
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
t=$(( $(left) - 25 )); [ $t -gt 150 ] && t=150
if [ -n "$ncu" ] && [ $t -gt 40 ]; then
  # Layer 12 of the 3rd graph replay: 5 kernels a layer (gemv, attention, gemv, gemv, gemv).
  timeout $t "$ncu" --kernel-name regex:'^(gemv|attention)_bf16' --launch-skip $((5 * 24 * 2 + 5 * 12)) --launch-count 5 \
    --graph-profiling node --clock-control none \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SourceCounters \
    --section MemoryWorkloadAnalysis --import-source no \
    -o "$out/ncu-layer" -f /tmp/bench-generate ${bench_args/--new-tokens 128/--new-tokens 8} --runs 1 > "$out/ncu-layer.log" 2>&1
  ncu_export "$ncu" ncu-layer "^  [a-z_]+bf16"
fi
finish

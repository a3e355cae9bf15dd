#!/usr/bin/env bash
# Call 2 (call 1 mended: plain loads of activations again, a one-counter barrier as cooperative groups have): the decode step as one kernel with grid barriers (src/graph_decode.cu decode_step_*)
# against the step's kernels one after another. The graph decoder's tests against flex (both
# ways of running the step, bit-identical logits between them), then the full-size greedy
# decode bench: step kernel (default), the kernels (LLAVA_JP_GRAPH_STEP=kernels), the step
# kernel at 3 blocks per SM. Carry .dev/graph-decode-test.xz, .dev/bench-generate.xz.
CALL=${CALL:-call2} BINARIES="graph-decode-test bench-generate"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-560}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
run_test graph_decode_matches_flex_f32 flex-f32 120
grep -E "panicked|differ|step kernel" -m5 "$out/flex-f32.log"
run_test graph_decode_matches_flex_bf16 flex-bf16 120
grep -E "panicked|differ" -m5 "$out/flex-bf16.log"
bench ours-step bench-generate 3
bench ours-kernels bench-generate 3 LLAVA_JP_GRAPH_STEP=kernels
bench ours-step-3 bench-generate 2 LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DSTEP_MIN_BLOCKS=3
finish

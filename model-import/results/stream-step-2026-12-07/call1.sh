#!/usr/bin/env bash
# Call 1: the persistent step kernel (one block an SM, a warp streaming weights into a ring of
# shared-memory stages, tasks waiting on counters): the flex tests (both paths), then the
# full-size bench with the step kernel replayed and with the kernels. Carry .dev/mk (binaries
# packed with NAMES="bench-generate graph-decode-test" PACK_DIR=.dev/mk); STEP_SOURCE=file.cu
# runs a variant of src/graph_decode.cu (same entry points and arguments) instead.
CALL=${CALL:-call1} BINARIES="mk/bench-generate mk/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
src=()
[ -n "${STEP_SOURCE:-}" ] && src=(LLAVA_JP_GRAPH_SOURCE=$STEP_SOURCE)
nvidia-smi --query-gpu=name --format=csv,noheader
run_test graph_decode_matches_flex_bf16 flex-bf16 150 "${src[@]}"
grep -E "^case|step kernel|panicked|differ|trap|error" "$out/flex-bf16.log" | head -30
for r in 1 2; do
  bench step$r bench-generate 1 LLAVA_JP_GRAPH_STEP=kernel "${src[@]}" > /dev/null
  grep -o '"step_kernel_graph_ms":[^,]*,"kernels_graph_ms":[^,]*' "$out/step$r.jsonl"; tail -3 "$out/step$r.err"
done
bench kernels bench-generate 1 > /dev/null
run_test graph_decode_matches_flex_f32 flex-f32 150 "${src[@]}"
grep -E "step kernel|panicked|differ" "$out/flex-f32.log" | head -10
decode_summary
finish

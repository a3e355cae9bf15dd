#!/usr/bin/env bash
# Call 3: LayerNorm's CUDA kernels (src/fused_ops.rs). Both kernel tests (tests/train.rs), then
# full-size stage 2 (8 x 1024) with the LayerNorm and optimizer kernels, again with burn's
# LayerNorm (LLAVA_JP_FUSED_OPS=0), then PyTorch; cuBLASLt products in all of ours.
# Carry .dev with train-test.xz and llava-jp.xz.
CALL=call3 BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
for t in fused_layer_norm_matches_burn_on_cuda fused_optimizer_matches_burn_on_cuda; do
  timeout 150 /tmp/train-test --ignored --exact $t --nocapture > "$out/$t.log" 2>&1
  echo "== $t: $(grep -E 'test result|panicked' "$out/$t.log" | head -3) ($((SECONDS - start)) s)"
  grep -A3 panicked "$out/$t.log" | head -6
done
run() {  # name, stages, steps, extra env...
  local name=$1 stages=$2 steps=$3; shift 3
  local t=$(( $(left) - 20 )); [ $t -lt 60 ] && { echo "== $name: skipped, $(left) s left"; return; }
  echo "== $name ($((SECONDS - start)) s, $t s allowed)"
  env "$@" OURS_TIMEOUT=$(( t - 10 )) timeout $t bash model-import/scripts/gpu_bench_train.sh "$out/$name" "$stages" $steps
}
run fused-ops 2 ${STEPS:-12} TORCH=0
run burn-layer-norm 2 ${STEPS:-12} TORCH=${TORCH:-1} LLAVA_JP_FUSED_OPS=0
finish

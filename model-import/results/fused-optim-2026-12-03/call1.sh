#!/usr/bin/env bash
# Call 1: the optimizer's CUDA kernels (src/fused_optim.rs). The kernels against burn's
# operations (tests/train.rs, fused_optimizer_matches_burn_on_cuda), then full-size stage 2
# (8 x 1024) with the kernels (cold: compiles and tunes), again without them
# (LLAVA_JP_FUSED_OPTIM=0, warm kernel cache), then PyTorch; each of ours with the host's
# time per part of the step (`times` in the metrics).
# Products through cuBLASLt (LLAVA_JP_GEMM=cublaslt, as the 0.397 s of 2026-12-02's call 19; call
# 10 of graph-prefill-2026-12-03 ran without it, on burn's GEMM).
# Carry .dev with train-test.xz (the `train` test binary) and llava-jp.xz.
CALL=call1 BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
timeout 150 /tmp/train-test --ignored --exact fused_optimizer_matches_burn_on_cuda --nocapture > "$out/test.log" 2>&1
echo "== test: $(grep -E 'test result|panicked' "$out/test.log" | head -3) ($((SECONDS - start)) s)"
tail -5 "$out/test.log"
run() {  # name, stages, steps, extra env...
  local name=$1 stages=$2 steps=$3; shift 3
  local t=$(( $(left) - 20 )); [ $t -lt 60 ] && { echo "== $name: skipped, $(left) s left"; return; }
  echo "== $name ($((SECONDS - start)) s, $t s allowed)"
  env "$@" OURS_TIMEOUT=$(( t - 10 )) timeout $t bash model-import/scripts/gpu_bench_train.sh "$out/$name" "$stages" $steps
}
run fused 2 ${STEPS:-12} TORCH=0
run unfused 2 ${STEPS:-12} TORCH=1 LLAVA_JP_FUSED_OPTIM=0
finish

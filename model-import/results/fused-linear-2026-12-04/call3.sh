#!/usr/bin/env bash
# Call 3: the linear layers' bias added by cuBLASLt's epilogue and its gradient summed by a
# kernel of our own (src/fused_ops.rs `column_sum`). The kernel tests again, then full-size
# stage 2 (8 x 1024, 40 steps) and stage 1 (32 x 608), each with PyTorch after it, in one call;
# cuBLASLt products. Carry .dev with train-test.xz and llava-jp.xz.
CALL=call3 BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
for t in ${TESTS:-autocast_affine_matches_burn_on_cuda qkv_attention_matches_the_split_route_on_cuda fused_gelu_matches_burn_on_cuda fused_residual_dropout_follows_its_mask_on_cuda}; do
  timeout 150 /tmp/train-test --ignored --exact $t --nocapture > "$out/$t.log" 2>&1
  echo "== $t: $(grep -E 'test result|panicked' "$out/$t.log" | head -3) ($((SECONDS - start)) s)"
  grep -A3 panicked "$out/$t.log" | head -6
done
run() {  # name, stages, steps, extra env...
  local name=$1 stages=$2 steps=$3; shift 3
  local t=$(( $(left) - 20 )); [ $t -lt 60 ] && { echo "== $name: skipped, $(left) s left"; return; }
  echo "== $name ($((SECONDS - start)) s, $t s allowed)"
  env "$@" OURS_TIMEOUT=$(( t - 100 )) timeout $t bash model-import/scripts/gpu_bench_train.sh "$out/$name" "$stages" $steps
}
run stage2 2 ${STEPS:-40} TORCH=${TORCH:-1}
run stage1 1 ${STEPS1:-10} TORCH=${TORCH:-1}
finish

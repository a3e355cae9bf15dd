#!/usr/bin/env bash
# Call 3: call 1's tree plus LayerNorm's parameter gradients summed over chunks by a block of
# 32 columns x 8 warps (as column_sum_total), AdamW back to its scalar loop (call 2's vector
# one changed nothing). The LayerNorm and affine CUDA tests; every kernel of step 3 at both
# stages (Nsight Compute); stage 2 and stage 1 beside PyTorch.
# Carry .dev (llava-jp.xz, train-test.xz, tokenizer/).
CALL=${CALL:-call3} BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-585}
export LLAVA_JP_TOKENIZER=$PWD/.dev/tokenizer/tokenizer.json
nvidia-smi --query-gpu=name --format=csv,noheader
TEST_TIMEOUT=60 train_tests fused_layer_norm_matches_burn_on_cuda precast_frozen_weights_match_on_cuda
rm -f /tmp/llava-jp
for stage in 2 1; do
  t=$(( $(left) - 300 )); [ $t -gt 130 ] && t=130
  [ $t -lt 60 ] && { echo "== profile stage $stage: skipped, $(left) s left"; continue; }
  echo "== stage $stage kernels ($((SECONDS - start)) s, $t s allowed)"
  timeout $t bash model-import/scripts/gpu_kernel_profile.sh "$out/profile" $stage 3-3 2>&1 | grep -v "^==PROF==" | head -45
  xz -9 "$out/profile/ncu-stage$stage.csv" 2>/dev/null
  rm -f /tmp/llava-jp
done
CAP=150 train_run stage2 2 10
CAP=130 train_run stage1 1 8
losses
finish

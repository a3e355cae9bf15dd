#!/usr/bin/env bash
# Call 3: the element-wise kernels taking eight elements a thread (GELU, the residual add with
# dropout): their tests again; the checkpointed run against the plain one (bf16, both stages);
# stage 1 at 32 x 608 (ours; PyTorch's 0.299 s from the calls before); then cubecl's
# per-kernel profile of a stage-2 step, now with our kernels' entry points named.
# Carry .dev with llava-jp.xz, train-test.xz and tokenizer/tokenizer.json.
CALL=call3 BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
export LLAVA_JP_TOKENIZER=$PWD/.dev/tokenizer/tokenizer.json
rm -f /tmp/llava-jp
TEST_TIMEOUT=120 train_tests fused_gelu_matches_burn_on_cuda fused_residual_dropout_follows_its_mask_on_cuda gradient_checkpointing_gives_the_same_run_on_cuda
CAP=150 train_run stage1 1 8 TORCH=0
t=$(( $(left) - 30 )); [ $t -gt 200 ] && t=200
if [ $t -gt 60 ]; then
  CAP=$t PROFILE=1 train_run stage2-profile 2 6 TORCH=0
  python3 model-import/scripts/cubecl_profile_summary.py "$out/stage2-profile/cubecl-stage2.log" --top 45
  xz -T4 "$out/stage2-profile/cubecl-stage2.log"
fi
finish

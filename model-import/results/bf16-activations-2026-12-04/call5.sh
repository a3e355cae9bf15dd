#!/usr/bin/env bash
# Call 5: the fuzzer's CUDA autocast leg on attention alone (in call 4 its process ran out of
# time compiling kernels for new shapes, with no failure), then cubecl's per-kernel profile of
# a stage-2 step with call 4's binary (AdamW, the norm and the column sums with more loads in
# flight).
# Carry .dev with llava-jp.xz, backend-fuzz.xz and tokenizer/tokenizer.json.
CALL=call5 BINARIES=""
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
rm -f /tmp/llava-jp
echo "== fuzz, cuda_autocast_bf16_vs_flex, attention ($((SECONDS - start)) s)"
LEGS=cuda_autocast_bf16_vs_flex ONLY=attention FUZZ_SECONDS=120 LEG_TIMEOUT=200 timeout 230 \
  bash model-import/scripts/gpu_backend_fuzz.sh "$out/fuzz" 2>&1 | tail -8
t=$(( $(left) - 30 )); [ $t -gt 170 ] && t=170
if [ $t -gt 60 ]; then
  CAP=$t PROFILE=1 train_run stage2-profile 2 6 TORCH=0
  python3 model-import/scripts/cubecl_profile_summary.py "$out/stage2-profile/cubecl-stage2.log" --top 30
  xz -T4 "$out/stage2-profile/cubecl-stage2.log"
fi
finish

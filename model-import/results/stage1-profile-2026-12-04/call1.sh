#!/usr/bin/env bash
# Call 1: where a stage-1 step's time goes, ours (cubecl's per-kernel profile; cuBLASLt is not
# in it) and PyTorch's (torch.profiler), at 32 x 608, with the last session's binary (HEAD 96ba8b3).
# Carry .dev with llava-jp.xz and tokenizer/tokenizer.json.
CALL=call1 BINARIES=""
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
rm -f /tmp/llava-jp
CAP=200 PROFILE=1 train_run stage1-profile 1 5 TORCH=0
python3 model-import/scripts/cubecl_profile_summary.py "$out/stage1-profile/cubecl-stage1.log" --top 40
xz -T4 "$out/stage1-profile/cubecl-stage1.log"
echo "== pytorch stage 1 with profile ($((SECONDS - start)) s)"
timeout $(( $(left) - 10 )) python3 model-import/scripts/bench_train.py torch --stage 1 --batch 32 --seq 608 --steps 5 \
  --profile "$out/pytorch-stage1-profile.txt" 2>&1 | grep -v Warning | tail -2
head -45 "$out/pytorch-stage1-profile.txt"
finish

#!/usr/bin/env bash
# Call 3: the pixels' upload from pinned memory (stage 1's host times, upload_s split out of
# data_s), then where a steady step's device time goes, every kernel timed by Nsight Compute
# (gpu_kernel_profile.sh, step 3) beside PyTorch's kernels under torch.profiler
# (bench_train.py --profile): stage 1, then stage 2 as time allows. Kernels of main after the
# merge of fwdbwd.cu.
# Carry .dev (llava-jp.xz, tokenizer/).
CALL=call3 BINARIES=""
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-560}
nvidia-smi --query-gpu=name --format=csv,noheader
rm -f /tmp/llava-jp
CAP=60 train_run stage1 1 8 TORCH=0
for stage in 1 2; do
  t=$(( $(left) - 20 )); [ $t -gt 200 ] && t=200
  [ $t -lt 60 ] && { echo "== stage $stage: skipped, $(left) s left"; continue; }
  echo "== stage $stage kernels ($((SECONDS - start)) s, $t s allowed)"
  timeout $t bash model-import/scripts/gpu_kernel_profile.sh "$out/profile" $stage 3-3 2>&1 | grep -v "^==PROF==" | tail -45
  xz -9 "$out/profile/ncu-stage$stage.csv" 2>/dev/null
  rm -f /tmp/llava-jp
  t=$(( $(left) - 10 )); [ $t -gt 80 ] && t=80
  [ $t -lt 40 ] && continue
  if [ $stage = 2 ]; then args="--stage 2 --batch 8 --seq 1024"; else args="--stage 1 --batch 32 --seq 608"; fi
  timeout $t python3 model-import/scripts/bench_train.py torch $args --steps 4 --profile "$out/pytorch-stage$stage.txt" 2>&1 | grep -v Warning | tail -1
  echo "== PyTorch stage $stage kernels ($((SECONDS - start)) s)"; head -25 "$out/pytorch-stage$stage.txt"
done
finish

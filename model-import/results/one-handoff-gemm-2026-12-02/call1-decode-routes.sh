#!/usr/bin/env bash
# Decode at batch 1: which route lost the 3x? GEMM x attention routes, then transformers.
set -u
export CUBECL_AUTOTUNE_LEVEL=minimal LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
echo "profilers: $(which nsys ncu nvprof perf 2>/dev/null | tr '\n' ' ') $(ls /usr/local/cuda-13.0/bin 2>/dev/null | tr '\n' ' ')"
ls /usr/local/cuda-13.0/extras/CUPTI/lib64 2>/dev/null | head -3
gen=/tmp/bench-generate; xz -dc .dev/bench-generate.xz > $gen; chmod +x $gen
common="--config configs/llava-jp-1.3b-v1.0.json --batches 1 --text-tokens 48 --new-tokens 64 --runs 2 --backends cuda --dtype bf16"
for combo in ${COMBOS:-cublaslt,burn cublaslt,flash burn,flash burn,burn}; do
  gemm=${combo%,*}; att=${combo#*,}
  s=$(date +%s)
  echo "== generate, gemm $gemm attention $att"; LLAVA_JP_GEMM=$gemm LLAVA_JP_ATTENTION=$att timeout ${T:-200} $gen $common 2>&1 | grep "^{" | tee $OUT/generate-$gemm-$att.jsonl
  echo "   ($(( $(date +%s) - s )) s)"
done
echo "== generate, transformers"
timeout 120 python3 model-import/scripts/bench_generate.py --batches 1 --text-tokens 48 --new-tokens 64 --runs 2 2>&1 | grep "^{" | tee $OUT/generate-pytorch.jsonl

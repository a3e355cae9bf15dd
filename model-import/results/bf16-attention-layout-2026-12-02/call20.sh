#!/usr/bin/env bash
# burn's attention route on CUDA with packed (strided) q/k/v: fuzz attention, attention_grad, gpt2.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib
xz -dc .dev/backend-fuzz.xz > /tmp/backend-fuzz && chmod +x /tmp/backend-fuzz
( ATTENTION=burn FUZZ_SECONDS=${FS:-110} LEG_TIMEOUT=170 LEGS="cuda_bf16_vs_flex cuda_f32_vs_flex cuda_autocast_bf16_vs_flex" ONLY="attention attention_grad gpt2" bash model-import/scripts/gpu_backend_fuzz.sh $OUT/burn > $OUT/burn.txt 2>&1 ) &
( FUZZ_SECONDS=${FS:-110} LEG_TIMEOUT=170 LEGS="cuda_bf16_vs_flex" ONLY="attention attention_grad" bash model-import/scripts/gpu_backend_fuzz.sh $OUT/flash > $OUT/flash.txt 2>&1 ) &
wait
cat $OUT/burn.txt | cut -c1-700; echo; cat $OUT/flash.txt | cut -c1-700

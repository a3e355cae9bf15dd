#!/usr/bin/env bash
# The gpt2 miss of call 19 (heads 2, head_dim 2, 3 layers): replayed per GEMM route.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib CUBECL_AUTOTUNE_LEVEL=minimal RAYON_NUM_THREADS=2 LLAVA_JP_ATTENTION_LAYOUT=canonical
bin=/tmp/backend-fuzz; xz -dc .dev/backend-fuzz.xz > $bin && chmod +x $bin
R='{"case":{"act":"gelu","head_dim":2,"heads":2,"layers":3,"lengths":[1],"pad_left":false,"seed":15927125081143360234,"steps":2,"tied":false,"vocab":233},"computation":"gpt2"}'
r() { LLAVA_JP_GEMM=$2 LLAVA_JP_FUZZ_REPLAY="$R" timeout 200 $bin $3 --exact --include-ignored --nocapture > $OUT/$1.log 2>&1; echo "== $1 ($2, $3): rc $? $(grep -E "^passes|^gpt2:|^fails" $OUT/$1.log | head -1 | cut -c1-330)" >> $OUT/summary.txt; }
r lt cublaslt cuda_bf16_vs_flex & r lt2 cublaslt cuda_bf16_vs_flex & r burn burn cuda_bf16_vs_flex & r burn2 burn cuda_bf16_vs_flex & r ac cublaslt cuda_autocast_bf16_vs_flex &
wait; cat $OUT/summary.txt

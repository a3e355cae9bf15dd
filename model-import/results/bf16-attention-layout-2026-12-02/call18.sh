#!/usr/bin/env bash
# Queue branch (cublaslt-queue) on the GPU + bf16 gpt2 failure narrowing.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib CUBECL_AUTOTUNE_LEVEL=minimal RAYON_NUM_THREADS=2
bin=/tmp/backend-fuzz; xz -dc .dev/backend-fuzz.xz > $bin && chmod +x $bin
mkdir -p $OUT/n
run() { # name leg head_dim vocab lengths heads act
  R="{\"case\":{\"act\":\"${7:-gelu}\",\"head_dim\":$3,\"heads\":$6,\"layers\":1,\"lengths\":$5,\"pad_left\":false,\"seed\":0,\"steps\":2,\"tied\":false,\"vocab\":$4},\"computation\":\"gpt2\"}"
  LLAVA_JP_FUZZ_REPLAY="$R" timeout ${RT:-170} $bin $2 --exact --include-ignored --nocapture > $OUT/n/$1.log 2>&1
  echo "== $1 $2 hd $3 v $4 len $5 heads $6 ${7:-gelu}: rc $? $(grep -E "^passes|max \||fails|worst" $OUT/n/$1.log | head -2 | cut -c1-200 | tr '\n' ' ')" >> $OUT/n/summary.txt
}
s=$(date +%s)
run base cuda_bf16_vs_flex 13 2 [1,9] 1 &
run f32 cuda_f32_vs_flex 13 2 [1,9] 1 &
run autocast cuda_autocast_bf16_vs_flex 13 2 [1,9] 1 &
run v3 cuda_bf16_vs_flex 13 3 [1,9] 1 &
run v8 cuda_bf16_vs_flex 13 8 [1,9] 1 &
run hd16 cuda_bf16_vs_flex 16 2 [1,9] 1 &
run len9 cuda_bf16_vs_flex 13 2 [9] 1 &
run len1 cuda_bf16_vs_flex 13 2 [1] 1 &
run relu cuda_bf16_vs_flex 13 2 [1,9] 1 relu &
( LLAVA_JP_FUZZ_ONLY=pieces LLAVA_JP_FUZZ_SECONDS=120 LLAVA_JP_FUZZ_CASES=1000 LLAVA_JP_FUZZ_SEED=random timeout 170 $bin cuda_bf16_vs_flex --exact --include-ignored --nocapture --test-threads 1 > $OUT/n/pieces.log 2>&1; echo "pieces rc $?" >> $OUT/n/summary.txt ) &
wait
echo "narrowing took $(( $(date +%s) - s )) s"; cat $OUT/n/summary.txt; grep -E "cases in|fails|panicked" $OUT/n/pieces.log | head
GEMMS="${GEMMS:-cublaslt burn}" GT=170 TT=150 FUZZ=0 bash model-import/results/one-handoff-gemm-2026-12-02/call2-one-handoff.sh

#!/usr/bin/env bash
# Staged bf16 gpt2 replay + queue-route fuzz (parallel), then decode and stage 2 beside PyTorch.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib CUBECL_AUTOTUNE_LEVEL=minimal RAYON_NUM_THREADS=2
bin=/tmp/backend-fuzz; xz -dc .dev/backend-fuzz.xz > $bin && chmod +x $bin
mkdir -p $OUT/n
run() { # name leg head_dim vocab lengths heads pad_left
  R="{\"case\":{\"act\":\"gelu\",\"head_dim\":$3,\"heads\":$6,\"layers\":1,\"lengths\":$5,\"pad_left\":${7:-false},\"seed\":0,\"steps\":2,\"tied\":false,\"vocab\":$4},\"computation\":\"gpt2\"}"
  LLAVA_JP_FUZZ_DUMP=1 LLAVA_JP_FUZZ_REPLAY="$R" timeout 170 $bin $2 --exact --include-ignored --nocapture > $OUT/n/$1.log 2>&1
  echo "== $1: rc $? $(grep -E "^passes|panicked|fails" -A1 $OUT/n/$1.log | grep -v panicked | head -2 | cut -c1-300 | tr '\n' ' ')" >> $OUT/n/summary.txt
}
s=$(date +%s)
run base cuda_bf16_vs_flex 13 2 [1,9] 1 &
run left cuda_bf16_vs_flex 13 2 [1,9] 1 true &
run l28 cuda_bf16_vs_flex 13 2 [2,8] 1 &
LLAVA_JP_ATTENTION=burn run burnatt cuda_bf16_vs_flex 13 2 [1,9] 1 &
( LLAVA_JP_GEMM=cublaslt FUZZ_SECONDS=90 LEG_TIMEOUT=170 LEGS="cuda_bf16_vs_flex cuda_autocast_bf16_vs_flex" ONLY="matmul projector gpt2 decode llava gradients" bash model-import/scripts/gpu_backend_fuzz.sh $OUT/fuzz > $OUT/fuzz.txt 2>&1 ) &
wait
echo "parallel part took $(( $(date +%s) - s )) s"; cat $OUT/n/summary.txt; tail -20 $OUT/fuzz.txt
export LLAVA_JP_GEMM=cublaslt
gen=/tmp/bench-generate; xz -dc .dev/bench-generate.xz > $gen; chmod +x $gen
$gen --config configs/llava-jp-1.3b-v1.0.json --batches 1 --text-tokens 48 --new-tokens 64 --runs 2 --backends cuda --dtype bf16 2>&1 | grep "^{" | tee $OUT/generate-ours.jsonl
timeout 120 python3 model-import/scripts/bench_generate.py --batches 1 --text-tokens 48 --new-tokens 64 --runs 2 2>&1 | grep "^{" | tee $OUT/generate-pytorch.jsonl
OURS_TIMEOUT=100 bash model-import/scripts/gpu_bench_train.sh $OUT/train 2 20 2>&1 | grep -v "^checkpoint\|^plot\|^metrics"

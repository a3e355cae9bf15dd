#!/usr/bin/env bash
# One hand-off per cuBLASLt product (no cubecl flush): decode, stage 2, fuzz on bf16 legs.
set -u
export CUBECL_AUTOTUNE_LEVEL=minimal LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
gen=/tmp/bench-generate; xz -dc .dev/bench-generate.xz > $gen; chmod +x $gen
common="--config configs/llava-jp-1.3b-v1.0.json --batches 1 --text-tokens 48 --new-tokens 64 --runs 2 --backends cuda --dtype bf16"
for gemm in ${GEMMS:-cublaslt}; do
  s=$(date +%s); echo "== generate, $gemm"
  LLAVA_JP_GEMM=$gemm timeout ${GT:-220} $gen $common 2>&1 | grep "^{\|panic\|rror" | tee $OUT/generate-$gemm.jsonl; echo "   ($(( $(date +%s) - s )) s)"
done
bin=/tmp/llava-jp; xz -dc .dev/llava-jp.xz > $bin; chmod +x $bin
b=/tmp/bench-train
python3 model-import/scripts/bench_train.py data $b --tokenizer "$PWD/.dev/tokenizer/tokenizer.json" --steps 20 > /dev/null
TIMEFORMAT="real %R s, user %U s, sys %S s"
for gemm in ${TGEMMS:-cublaslt}; do
  rm -rf $b/run-stage2; s=$(date +%s)
  { time LLAVA_JP_GEMM=$gemm timeout ${TT:-150} $bin train --config $b/stage2.toml --backend cuda > $OUT/train-$gemm.log 2>&1 ; } 2> $OUT/time-$gemm.txt
  cp $b/run-stage2/metrics.jsonl $OUT/metrics-$gemm.jsonl
  echo "== stage 2, $gemm: $(cat $OUT/time-$gemm.txt)"; tail -3 $OUT/train-$gemm.log | cut -c1-300
  python3 - $OUT/metrics-$gemm.jsonl <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steady = [r["tokens"] / r["tokens_per_s"] for r in rows[3:]]
print("steps 4-20: mean", round(sum(steady) / len(steady), 3), "s, min", round(min(steady), 3), "first", round(rows[0]["tokens"] / rows[0]["tokens_per_s"], 1), "s, losses", [round(r["loss"], 4) for r in rows[-3:]])
PY
done
[ "${FUZZ:-1}" = 1 ] && LLAVA_JP_GEMM=cublaslt FUZZ_SECONDS=${FS:-80} LEG_TIMEOUT=${LT:-150} LEGS="cuda_bf16_vs_flex cuda_autocast_bf16_vs_flex" ONLY="matmul projector gpt2 decode llava gradients" bash model-import/scripts/gpu_backend_fuzz.sh $OUT/fuzz 2>&1 | tail -25

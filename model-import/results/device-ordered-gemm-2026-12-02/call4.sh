#!/usr/bin/env bash
# Fourth call (fresh machine): (a) profilers on the machine; (b) stage 2, device-ordered route,
# with glibc's malloc told to keep freed memory (does the 22 s of system time in a 36 s run come
# from mmap/munmap churn?); (c) greedy decode at batch 1, device-ordered vs host-ordered
# products, beside transformers' generate.
set -u
export CUBECL_AUTOTUNE_LEVEL=minimal LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
echo "profilers: $(which perf gdb py-spy valgrind 2>/dev/null | tr '\n' ' ')"
bin=/tmp/llava-jp; xz -dc .dev/llava-jp.xz > $bin; chmod +x $bin
b=/tmp/bench-train
python3 model-import/scripts/bench_train.py data $b --tokenizer "$PWD/.dev/tokenizer/tokenizer.json" --steps 20 > /dev/null
TIMEFORMAT="real %R s, user %U s, sys %S s"
for malloc in ${MALLOCS:-default keep}; do
  rm -rf $b/run-stage2
  env=(); [ $malloc = keep ] && env=(MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 MALLOC_TOP_PAD_=1073741824)
  { time env "${env[@]}" LLAVA_JP_GEMM=cublaslt timeout 200 $bin train --config $b/stage2.toml --backend cuda > $OUT/train-$malloc.log 2>&1 ; } 2> $OUT/time-$malloc.txt
  cp $b/run-stage2/metrics.jsonl $OUT/metrics-$malloc.jsonl
  echo "== stage 2, malloc $malloc: $(cat $OUT/time-$malloc.txt)"
  python3 - $OUT/metrics-$malloc.jsonl <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steady = [r["tokens"] / r["tokens_per_s"] for r in rows[3:]]
print("steps 4-20: mean", round(sum(steady) / len(steady), 3), "s, min", round(min(steady), 3), "first", round(rows[0]["tokens"] / rows[0]["tokens_per_s"], 1), "s")
PY
done
gen=/tmp/bench-generate; xz -dc .dev/bench-generate.xz > $gen; chmod +x $gen
common="--config configs/llava-jp-1.3b-v1.0.json --batches 1 --text-tokens 48 --new-tokens 64 --runs 2 --backends cuda --dtype bf16"
for gemm in ${GEMMS:-cublaslt cublaslt-sync}; do
  echo "== generate, $gemm"; LLAVA_JP_GEMM=$gemm timeout 150 $gen $common 2>&1 | grep "^{" | tee $OUT/generate-$gemm.jsonl
done
echo "== generate, transformers"
timeout 120 python3 model-import/scripts/bench_generate.py --batches 1 --text-tokens 48 --new-tokens 64 --runs 2 2>&1 | grep "^{" | tee $OUT/generate-pytorch.jsonl

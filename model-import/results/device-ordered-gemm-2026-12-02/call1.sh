#!/usr/bin/env bash
# cuBLASLt ordered on the device (flag kernels, no host waits; LLAVA_JP_GEMM=cublaslt) against
# the host-ordered route (LLAVA_JP_GEMM=cublaslt-sync): full-size stage-2 steps with GPU
# utilisation sampled every 0.2 s, then the backend fuzzer's product-bearing properties on the
# CUDA legs with the device-ordered route.
set -u
export CUBECL_AUTOTUNE_LEVEL=minimal LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
bin=/tmp/llava-jp; xz -dc .dev/llava-jp.xz > $bin; chmod +x $bin
b=/tmp/bench-train
python3 model-import/scripts/bench_train.py data $b --tokenizer "$PWD/.dev/tokenizer/tokenizer.json" --steps 20 > /dev/null
for gemm in ${GEMMS:-cublaslt cublaslt-sync}; do
  (while true; do echo "$(date +%s.%N) $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits)"; sleep 0.2; done) > $OUT/util-$gemm.txt &
  s=$!
  rm -rf $b/run-stage2
  TIMEFORMAT="real %R s, user %U s, sys %S s"
  { time LLAVA_JP_GEMM=$gemm timeout ${TRAIN_TIMEOUT:-240} $bin train --config $b/stage2.toml --backend cuda > $OUT/train-$gemm.log 2>&1 ; } 2> $OUT/time-$gemm.txt
  kill $s
  cp $b/run-stage2/metrics.jsonl $OUT/metrics-$gemm.jsonl 2>/dev/null
  echo "== $gemm"; cat $OUT/time-$gemm.txt; tail -c 600 $OUT/train-$gemm.log
  python3 - $OUT/metrics-$gemm.jsonl $OUT/util-$gemm.txt <<'PY'
import json, sys
try:
    rows = [json.loads(l) for l in open(sys.argv[1])]
except FileNotFoundError:
    rows = []
for r in rows:
    print(r["step"], round(r["tokens"] / r["tokens_per_s"], 3), "s", r["loss"])
util = [float(l.split()[1].rstrip(",")) for l in open(sys.argv[2]) if l.split()[1].rstrip(",").isdigit()]
busy = [u for u in util if u > 0]
print("GPU busy, samples > 0%:", len(busy), "mean", round(sum(busy) / max(1, len(busy)), 1))
PY
done
[ "${FUZZ:-1}" = 1 ] && LLAVA_JP_GEMM=cublaslt FUZZ_SECONDS=${FUZZ_SECONDS:-120} LEG_TIMEOUT=${LEG_TIMEOUT:-220} \
  ONLY="${ONLY:-matmul projector gpt2 decode llava gradients}" bash model-import/scripts/gpu_backend_fuzz.sh $OUT/fuzz

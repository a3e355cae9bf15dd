#!/usr/bin/env bash
# Is the stage-2 step bound by the GPU or by the host? GPU utilisation (nvidia-smi, every 0.2 s)
# and host CPU time during full-size stage-2 steps, flash attention on; cuBLASLt route (two host
# waits per product) first, then burn's own GEMM (no host waits). (This binary predates the
# route renaming: flash-train is today's default `flash`.)
set -u
export LLAVA_JP_ATTENTION=flash-train CUBECL_AUTOTUNE_LEVEL=minimal LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
bin=/tmp/llava-jp; xz -dc .dev/llava-jp.xz > $bin; chmod +x $bin
b=/tmp/bench-train
python3 model-import/scripts/bench_train.py data $b --tokenizer "$PWD/.dev/tokenizer/tokenizer.json" --steps 20 > /dev/null
for gemm in cublaslt burn; do
  (while true; do echo "$(date +%s.%N) $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits)"; sleep 0.2; done) > $OUT/util-$gemm.txt &
  s=$!
  rm -rf $b/run-stage2
  t=$([ $gemm = cublaslt ] && echo 300 || echo 170)
  TIMEFORMAT="real %R s, user %U s, sys %S s"
  { time LLAVA_JP_GEMM=$gemm timeout $t $bin train --config $b/stage2.toml --backend cuda > $OUT/train-$gemm.log 2>&1 ; } 2> $OUT/time-$gemm.txt
  kill $s
  cp $b/run-stage2/metrics.jsonl $OUT/metrics-$gemm.jsonl
  echo "== $gemm"; cat $OUT/time-$gemm.txt
  python3 - $OUT/metrics-$gemm.jsonl <<'PY'
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l); print(r["step"], round(r["tokens"] / r["tokens_per_s"], 3), "s", r["loss"])
PY
done

#!/usr/bin/env bash
# Third call (same warm machine): stage 2 with the device-ordered route (no trace) and the
# host-ordered one back to back, and which host threads are busy in steady steps (top -H).
set -u
export CUBECL_AUTOTUNE_LEVEL=minimal LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
bin=/tmp/llava-jp; [ -x $bin ] || { xz -dc .dev/llava-jp.xz > $bin; chmod +x $bin; }
b=/tmp/bench-train
[ -f $b/stage2.toml ] || python3 model-import/scripts/bench_train.py data $b --tokenizer "$PWD/.dev/tokenizer/tokenizer.json" --steps 20 > /dev/null
for gemm in ${GEMMS:-cublaslt cublaslt-sync}; do
  rm -rf $b/run-stage2
  TIMEFORMAT="real %R s, user %U s, sys %S s"
  ( time LLAVA_JP_GEMM=$gemm timeout 150 $bin train --config $b/stage2.toml --backend cuda > $OUT/train-$gemm.log 2>&1 ) 2> $OUT/time-$gemm.txt &
  sleep ${SETTLE:-22}; pid=$(pgrep -f "^/tmp/llava-jp train" | head -1)
  top -H -b -n 4 -d 2 -p $pid > $OUT/threads-$gemm.txt 2>&1
  wait
  cp $b/run-stage2/metrics.jsonl $OUT/metrics-$gemm.jsonl
  echo "== $gemm"; cat $OUT/time-$gemm.txt; grep -A8 "PID USER" $OUT/threads-$gemm.txt | tail -27
  python3 - $OUT/metrics-$gemm.jsonl <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steady = [r["tokens"] / r["tokens_per_s"] for r in rows[3:]]
print("steps 4-20: mean", round(sum(steady) / len(steady), 3), "s, min", round(min(steady), 3), "losses", [round(r["loss"], 4) for r in rows[-3:]])
PY
done

#!/usr/bin/env bash
# Second call: the device-ordered route hung in call 1 (GPU 100% busy, no step finished).
# Now the flag kernels self-test on their first product and trap after a timeout, and
# LLAVA_JP_GEMM_TRACE=1 prints each product's steps: stage 2 with the trace, then (if it trained)
# the fuzzer's product-bearing properties on the bf16 legs.
set -u
export CUBECL_AUTOTUNE_LEVEL=minimal LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
bin=/tmp/llava-jp; xz -dc .dev/llava-jp.xz > $bin; chmod +x $bin
b=/tmp/bench-train
python3 model-import/scripts/bench_train.py data $b --tokenizer "$PWD/.dev/tokenizer/tokenizer.json" --steps 20 > /dev/null
(while true; do echo "$(date +%s.%N) $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits)"; sleep 0.2; done) > $OUT/util.txt &
s=$!
rm -rf $b/run-stage2
TIMEFORMAT="real %R s, user %U s, sys %S s"
{ time LLAVA_JP_GEMM=cublaslt LLAVA_JP_GEMM_TRACE=1 timeout ${TRAIN_TIMEOUT:-150} $bin train --config $b/stage2.toml --backend cuda > $OUT/train.log 2> $OUT/trace.log ; } 2> $OUT/time.txt
kill $s
xz -T4 $OUT/trace.log
cat $OUT/time.txt; tr '\r' '\n' < $OUT/train.log | tail -4; xz -dc $OUT/trace.log.xz | grep -v "^cuBLASLt product" | tail -20; xz -dc $OUT/trace.log.xz | tail -4
cp $b/run-stage2/metrics.jsonl $OUT/metrics.jsonl 2>/dev/null && python3 - $OUT/metrics.jsonl $OUT/util.txt <<'PY'
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l); print(r["step"], round(r["tokens"] / r["tokens_per_s"], 3), "s", r["loss"])
util = [float(l.split()[1].rstrip(",")) for l in open(sys.argv[2]) if l.split()[1].rstrip(",").isdigit()]
busy = [u for u in util if u > 0]
print("GPU busy, samples > 0%:", len(busy), "mean", round(sum(busy) / max(1, len(busy)), 1))
PY
[ -s $OUT/metrics.jsonl ] && LLAVA_JP_GEMM=cublaslt FUZZ_SECONDS=${FUZZ_SECONDS:-90} LEG_TIMEOUT=${LEG_TIMEOUT:-170} LEGS="cuda_bf16_vs_flex cuda_autocast_bf16_vs_flex" \
  ONLY="${ONLY:-matmul projector gpt2 decode llava gradients}" bash model-import/scripts/gpu_backend_fuzz.sh /tmp/fuzz > $OUT/fuzz.txt 2>&1; tail -30 $OUT/fuzz.txt

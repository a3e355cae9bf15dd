#!/usr/bin/env bash
# The cuBLASLt route (src/cublaslt.rs) on the GPU machine: the backend fuzzer with
# LLAVA_JP_GEMM=cublaslt on the CUDA legs (one process per leg and computation, in parallel),
# then, with TRAIN=1, the full-size stage-2 training step with the route beside PyTorch.
#   on the development machine: the fuzz binary at .dev/backend-fuzz.xz (see
#   gpu_backend_fuzz.sh), and for TRAIN=1 .dev/llava-jp.xz and .dev/tokenizer/ (see
#   gpu_bench_train.sh)
#   on the GPU machine (repository root, carry .dev):
#     bash model-import/scripts/gpu_cublaslt_route.sh OUT_DIR
#   LEGS and ONLY pick legs and computations, FUZZ_SECONDS each process's budget (default 200),
#   CHECK=1 compares every routed product with an f64 product on the host (slow; it also
#   drains the queue before each product, which changes what burn's fusion sees),
#   REPLAY='<json>' replays one case instead of fuzzing.
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out/logs"
# cuBLASLt ships with the CUDA toolkit; the loader must find it.
export LD_LIBRARY_PATH=$(dirname "$(ls /usr/local/cuda*/targets/x86_64-linux/lib/libcublasLt.so* | head -1)"):${LD_LIBRARY_PATH:-}
export LLAVA_JP_GEMM=cublaslt CUBECL_AUTOTUNE_LEVEL=minimal RAYON_NUM_THREADS=2
[ "${CHECK:-0}" = 1 ] && export LLAVA_JP_GEMM_CHECK=1
bin=/tmp/backend-fuzz
[ -x $bin ] || { xz -dc .dev/backend-fuzz.xz > $bin && chmod +x $bin; }
legs=${LEGS:-cuda_f32_vs_flex cuda_bf16_vs_flex cuda_autocast_bf16_vs_flex}
if [ -n "${REPLAY:-}" ]; then
  for leg in $legs; do
    LLAVA_JP_FUZZ_REPLAY="$REPLAY" $bin $leg --exact --include-ignored --nocapture > "$out/logs/replay-$leg.log" 2>&1 &
  done
else
  for leg in $legs; do
    for c in ${ONLY:-matmul projector gpt2 decode llava gradients}; do
      LLAVA_JP_FUZZ_ONLY=$c LLAVA_JP_FUZZ_SECONDS=${FUZZ_SECONDS:-200} LLAVA_JP_FUZZ_CASES=1000 LLAVA_JP_FUZZ_SEED=${SEED:-random} \
        timeout $(( ${FUZZ_SECONDS:-200} + 130 )) $bin $leg --exact --include-ignored --nocapture --test-threads 1 > "$out/logs/$leg.$c.log" 2>&1 &
    done
  done
fi
wait
grep -h "cases in\|passes:" "$out"/logs/*.log
for f in "$out"/logs/*.log; do
  grep -q "cases in\|passes:" "$f" || { echo "== $(basename "$f" .log):"; grep -v "^stack\|^   " "$f" | grep -A4 panicked | head -8; }
done
tar czf "$out/logs.tgz" -C "$out" logs && rm -rf "$out/logs"
if [ "${TRAIN:-0}" = 1 ]; then
  bash model-import/scripts/gpu_bench_train.sh "$out/train" "2" 6 2>&1 | tee "$out/train.txt"
fi

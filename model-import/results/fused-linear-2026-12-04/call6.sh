#!/usr/bin/env bash
# Call 6: the flash forward at three blocks per SM (`__launch_bounds__(128, 3)`): the attention
# bench at the LLM's training shape (call 4 had 0.93 ms forward, 3.02 ms forward + backward),
# the attention-from-qkv test, then full-size stage 2 (40 steps) with PyTorch after it.
# Carry .dev with attention-bench.xz, train-test.xz and llava-jp.xz.
CALL=call6 BINARIES="attention-bench train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
timeout 150 /tmp/attention-bench --shapes train,clip --flash-train-only --iters 20 > "$out/bench.jsonl" 2> "$out/bench.err"
echo "== bench ($((SECONDS - start)) s)"; cat "$out/bench.jsonl"; tail -3 "$out/bench.err"
train_tests qkv_attention_matches_the_split_route_on_cuda
t=$(( $(left) - 20 ))
[ $t -gt 100 ] && OURS_TIMEOUT=$(( t - 100 )) timeout $t bash model-import/scripts/gpu_bench_train.sh "$out/stage2" 2 ${STEPS:-40}
finish

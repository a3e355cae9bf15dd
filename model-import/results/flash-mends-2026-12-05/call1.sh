#!/usr/bin/env bash
# First GPU run of branch issue8-attention (binaries packed from it: .dev/packed.txt): the
# 128-query flash forward, the shared-address and 32-bit-word kernel mends, the embedding
# backward (merged from issue8-embedding-unverified), data::ReadAhead.
#   1. Correctness: the flash, embedding and GELU CUDA tests; the graph decoder (its prefill
#      and vision tower launch the new forward) against flex in bf16.
#   2. Attention alone: main's binary (attention-bench-old: the 64-query forward), main's
#      binary with kernels/vec.cu (the mends alone), and the branch's binary.
# Carry .dev (train-test.xz, attention-bench.xz, attention-bench-old.xz, graph-decode-test.xz,
# kernels/, tokenizer/).
CALL=${CALL:-call1} BINARIES="train-test attention-bench attention-bench-old graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_TOKENIZER=$PWD/.dev/tokenizer/tokenizer.json
limit=${LIMIT:-480}
nvidia-smi --query-gpu=name --format=csv,noheader
# Each step only while time is left (a cold machine spends most of a first test compiling).
guarded_test() {  # name, timeout
  local t=$2; [ $(left) -lt $((t + 10)) ] && t=$(( $(left) - 10 ))
  [ $t -lt 30 ] && { echo "== $1: skipped, $(left) s left"; return; }
  TEST_TIMEOUT=$t train_tests $1
}
bench_one() {  # name, binary, [env...]
  local name=$1 bin=$2; shift 2
  [ $(left) -lt 50 ] && { echo "== bench $name: skipped, $(left) s left"; return; }
  env "$@" timeout 70 /tmp/$bin --shapes train --flash-train-only --iters 20 > "$out/bench-$name.jsonl" 2> "$out/bench-$name.err"
  echo "== attention bench, $name ($((SECONDS - start)) s)"; cat "$out/bench-$name.jsonl"; tail -2 "$out/bench-$name.err"
}
guarded_test fused_flash_backward_matches_the_split_pair_on_cuda 150
bench_one branch attention-bench
bench_one main attention-bench-old
guarded_test qkv_attention_matches_the_split_route_on_cuda 120
guarded_test fused_embedding_matches_burn_on_cuda 90
bench_one main-vec attention-bench-old LLAVA_JP_FLASH_SOURCE=$PWD/.dev/kernels/vec.cu
bench_one branch-mended attention-bench LLAVA_JP_FLASH_SOURCE=$PWD/.dev/kernels/fwd128.cu
[ $(left) -gt 80 ] && run_test graph_decode_matches_flex_bf16 graph-flex-bf16 $(( $(left) - 15 ))
guarded_test fused_gelu_matches_burn_on_cuda 60
finish

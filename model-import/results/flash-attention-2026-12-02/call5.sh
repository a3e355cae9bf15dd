#!/usr/bin/env bash
# flash attention after mask staging (causal tiles skipped) and ldmatrix: speed, then the fuzzer
set -u
export CUBECL_AUTOTUNE_LEVEL=minimal
xz -dc .dev/bench-attention.xz > /tmp/bench-attention; chmod +x /tmp/bench-attention
timeout 150 /tmp/bench-attention --dtype bf16 --iters 20 --flash-train-only > $OUT/bench-ours.jsonl 2> $OUT/bench-ours.err; echo "bench exit $?"
cat $OUT/bench-ours.jsonl; grep -v "^\s*$" $OUT/bench-ours.err | tail -12
LEGS="cuda_bf16_vs_flex cuda_autocast_bf16_vs_flex" FUZZ_SECONDS=100 LEG_TIMEOUT=150 ONLY="attention attention_grad" bash model-import/scripts/gpu_backend_fuzz.sh $OUT/fuzz 2>&1 | tail -30

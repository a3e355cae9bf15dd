#!/usr/bin/env bash
# flash attention with dropout: fuzz (dropout, plain), training timing with dropout 0.1 beside SDPA, forward at the other shapes
set -u
export CUBECL_AUTOTUNE_LEVEL=minimal
xz -dc .dev/bench-attention.xz > /tmp/bench-attention; chmod +x /tmp/bench-attention
LEGS="cuda_bf16_vs_flex cuda_autocast_bf16_vs_flex" FUZZ_SECONDS=100 LEG_TIMEOUT=150 ONLY="attention_dropout attention attention_grad" bash model-import/scripts/gpu_backend_fuzz.sh $OUT/fuzz > $OUT/fuzz.txt 2>&1 &
fuzz=$!
timeout 60 python3 model-import/scripts/bench_attention.py --iters 20 --dropout 0.1 > $OUT/bench-torch.jsonl 2>&1; tail -4 $OUT/bench-torch.jsonl
timeout 100 /tmp/bench-attention --dtype bf16 --iters 20 --flash-train-only --shapes train --dropout 0.1 > $OUT/bench-train-dropout.jsonl 2> $OUT/bench1.err; echo "bench exit $?"; cat $OUT/bench-train-dropout.jsonl
wait $fuzz; tail -12 $OUT/fuzz.txt
timeout 170 /tmp/bench-attention --dtype bf16 --iters 20 --forward-only --shapes prefill,clip,decode > $OUT/bench-forward.jsonl 2> $OUT/bench2.err; echo "bench exit $?"; cat $OUT/bench-forward.jsonl

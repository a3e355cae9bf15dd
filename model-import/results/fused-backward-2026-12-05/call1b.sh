#!/usr/bin/env bash
# Call 1b (run 2026-12-05 on a warm H100 right after call1.sh, whose fused-backward test ran out
# of its 90 s): the same test with 150 s and the GPU's busy share sampled (compiling or hung?),
# the attention bench at stage 1's shape, and the qkv route with the split pair.
# Carry .dev with train-test.xz and attention-bench.xz.
CALL=diag BINARIES="train-test attention-bench"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=cublaslt
(timeout 150 /tmp/train-test --ignored --exact fused_flash_backward_matches_the_split_pair_on_cuda --nocapture > $out/fused.log 2>&1; echo "rc $?" >> $out/fused.log) &
for i in $(seq 1 14); do sleep 10; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader | tr '\n' ' '; echo " t=$((SECONDS-start))"; done
wait; tail -30 $out/fused.log
timeout 60 /tmp/attention-bench --shapes stage1 --flash-train-only --iters 2 > $out/bench.jsonl 2> $out/bench.err; echo "bench rc $?"; cat $out/bench.jsonl; tail -5 $out/bench.err
LLAVA_JP_FLASH_BACKWARD=split timeout 60 /tmp/train-test --ignored --exact qkv_attention_matches_the_split_route_on_cuda > $out/split.log 2>&1; echo "split qkv rc $?"
finish

#!/usr/bin/env bash
# Call 4 (as run 2026-12-05 on an H100; its logs are call4-logs.tgz): the cost of queuing a
# full-depth step on tiny tensors (`benches/train.rs --layers 24`), then 30 stage-1 steps. (A
# first try also ran stage 1 with the split backward, 0.442 s a step; its bench line failed
# because gpu_bench_train.sh leaves a folder at /tmp/bench-train, so the binary is /tmp/bt.)
# Carry .dev with bench-train.xz, llava-jp.xz and tokenizer/tokenizer.json.
CALL=call5 BINARIES=""
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=240
export LLAVA_JP_GEMM=cublaslt LLAVA_JP_TOKENIZER=$PWD/.dev/tokenizer/tokenizer.json
xz -dc .dev/bench-train.xz > /tmp/bt && chmod +x /tmp/bt
timeout 80 /tmp/bt --bench --backend cuda --layers 24 --steps 12 > "$out/bench-layers24.log" 2>&1
echo "== bench --layers 24 ($((SECONDS - start)) s)"; grep -v "^\s*$" "$out/bench-layers24.log" | tail -8
CAP=120 train_run stage1-util 1 30 TORCH=0
finish

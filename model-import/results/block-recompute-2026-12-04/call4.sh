#!/usr/bin/env bash
# Call 4: call 3's two runs of ours that did not start (their time limit came out negative):
# stage 2 at 1 x 1024 and at 8 x 1024, both with gradient checkpointing, the weights in
# persistent memory. Carry .dev with llava-jp.xz and tokenizer/tokenizer.json.
CALL=call4 BINARIES=""
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
rm -f /tmp/llava-jp  # a warm machine may hold an older unpacked binary
CAP=120 train_run batch1-checkpointing 2 12 TORCH=0 TRAIN_SET="per_device_train_batch_size=1 gradient_checkpointing=true"
CAP=120 train_run batch8-checkpointing 2 12 TORCH=0 TRAIN_SET="gradient_checkpointing=true"
for m in $out/*/ours-stage2.metrics.jsonl; do echo "$m: $(tail -1 $m | python3 -c 'import json,sys; print(json.load(sys.stdin).get("device_mb"))')"; done
finish

#!/usr/bin/env bash
# Call 10: full-size training steps, stage 1 (batch 32 x 608, never finished before) then
# stage 2 (8 x 1024), ours (CUDA, bf16 mixed precision, .dev/llava-jp.xz) beside PyTorch
# (bench_train.py), through model-import/scripts/gpu_bench_train.sh.
CALL=call10 BINARIES=""
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
OURS_TIMEOUT=${OURS_TIMEOUT:-240} timeout $(( $(left) - 15 )) bash model-import/scripts/gpu_bench_train.sh "$out" "${STAGES:-1 2}" ${STEPS:-6}
finish

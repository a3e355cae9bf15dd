#!/usr/bin/env bash
# Call 1 (needs an H200, the card issue #8 names): where main stands on it, each beside PyTorch
# in the same call. Greedy decode at batch 1 (ours, graph decoder, 3 runs; transformers'
# generate), then stage 2 (8 x 1024) and stage 1 (32 x 608) training steps. With TRAIN=0,
# decode only (for little device time: LIMIT=280).
# Carry .dev/next (bench-generate.xz), and for training .dev/llava-jp.xz, .dev/tokenizer.
CALL=${CALL:-call1} BINARIES="next/bench-generate"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-565}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
bench decode bench-generate 3
transformers 100
if [ "${TRAIN:-1}" != 0 ]; then
  CAP=175 train_run stage2 2 8
  CAP=200 train_run stage1 1 6
  losses
fi
finish

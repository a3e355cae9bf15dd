#!/usr/bin/env bash
# Call 4: the pixels uploaded as one flat buffer (backend::upload_pixels), stage 1 and stage 2
# beside PyTorch in the same call (upload_s in our host times).
# Carry .dev (llava-jp.xz, tokenizer/).
CALL=call4 BINARIES=""
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-560}
nvidia-smi --query-gpu=name --format=csv,noheader
rm -f /tmp/llava-jp
CAP=170 train_run stage1 1 8
CAP=170 train_run stage2 2 10
finish

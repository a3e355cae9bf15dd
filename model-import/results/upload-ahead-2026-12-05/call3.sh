#!/usr/bin/env bash
# Call 3: after call 2's stage 2 parted from the earlier runs' losses at step 5 (stage 1 kept
# them), the trainer holds each step's uploaded pixel buffers until its loss read. Stage 2,
# then stage 1, each beside PyTorch in the same call; the losses to compare with
# kernel-variants-2026-12-05/call2 (same data, same seeds).
# Carry .dev (llava-jp.xz, tokenizer/).
CALL=${CALL:-upload3} BINARIES=""
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-570}
nvidia-smi --query-gpu=name --format=csv,noheader
rm -f /tmp/llava-jp
CAP=220 train_run stage2 2 10
CAP=200 train_run stage1 1 8
for f in $out/stage*/ours-stage*.metrics.jsonl; do
  python3 -c "import json,sys; print(sys.argv[1].split('/')[-1], [round(json.loads(l)['loss'], 4) for l in open(sys.argv[1])])" $f
done
finish

#!/usr/bin/env bash
# Call 3: LayerNorm's input gradient with the residual branch's gradient added in by its kernel
# (no separate add over [tokens, 2048] f32, two a layer): the LayerNorm test with an input used
# beside it, then stage 2 and stage 1 beside PyTorch. Losses to compare with call 1's.
# Carry .dev (llava-jp.xz, train-test.xz, tokenizer/).
CALL=${CALL:-call3} BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-560}
nvidia-smi --query-gpu=name --format=csv,noheader
TEST_TIMEOUT=80 train_tests fused_layer_norm_matches_burn_on_cuda
rm -f /tmp/llava-jp
CAP=210 train_run stage2 2 10
CAP=210 train_run stage1 1 8
for f in $out/stage*/ours-stage*.metrics.jsonl; do
  python3 -c "import json,sys; print(sys.argv[1].split('/')[-1], [round(json.loads(l)['loss'], 4) for l in open(sys.argv[1])])" $f
done
finish

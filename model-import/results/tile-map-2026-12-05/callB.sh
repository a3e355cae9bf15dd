#!/usr/bin/env bash
# Call B (after call A passes): what the tile map buys. The attention bench at the training
# shapes with the map (the default) and without (TILE_MAP=0), SDPA beside them; stage 1 beside
# PyTorch, then stage 1 without the map and stage 2 with it.
# Carry .dev with attention-bench.xz, llava-jp.xz and tokenizer/tokenizer.json.
CALL=callB BINARIES="attention-bench"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
for map in 1 0; do
  LLAVA_JP_FLASH_DEFINES=TILE_MAP=$map timeout 90 /tmp/attention-bench --shapes train --flash-train-only --iters 20 > "$out/bench-map$map.jsonl" 2> "$out/bench-map$map.err"
  echo "== attention bench, TILE_MAP=$map ($((SECONDS - start)) s)"; cat "$out/bench-map$map.jsonl"; tail -3 "$out/bench-map$map.err"
done
timeout 60 python3 model-import/scripts/bench_attention.py 2>&1 | grep -v Warning | grep train > "$out/sdpa.jsonl"
echo "== sdpa ($((SECONDS - start)) s)"; cat "$out/sdpa.jsonl"
rm -f /tmp/llava-jp
CAP=170 train_run stage1 1 8
CAP=80 train_run stage1-nomap 1 8 TORCH=0 LLAVA_JP_FLASH_DEFINES=TILE_MAP=0
CAP=150 train_run stage2 2 10
finish

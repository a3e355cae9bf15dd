#!/usr/bin/env bash
# Call 3 (as run 2026-12-05 on the H200, right after call 2, typed into the device tool): the
# attention bench with the map (call 1's A/B was refused: LLAVA_JP_FLASH_DEFINES did not yet
# take TILE_MAP), and stage 1 with cubecl's per-kernel profile (PROFILE=1).
CALL=call3 BINARIES="attention-bench"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
timeout 80 /tmp/attention-bench --shapes train,clip --flash-train-only --iters 20 > $out/bench.jsonl 2> $out/bench.err
cat $out/bench.jsonl; tail -2 $out/bench.err
rm -f /tmp/llava-jp
CAP=150 PROFILE=1 train_run stage1-profile 1 6 TORCH=0
finish

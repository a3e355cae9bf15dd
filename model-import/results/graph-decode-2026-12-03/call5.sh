#!/usr/bin/env bash
# GPU machine, repository root: every graph-decoder test, each in a process and a directory of
# its own (flex picks its float type per process; burn's autotune cache is per directory), the
# CPU-referenced ones first (seconds), then the bench (profile, ours, transformers).
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
export CUBECL_AUTOTUNE_LEVEL=minimal PYTHONUNBUFFERED=1
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
xz -dc .dev/graph-decode-test.xz > /tmp/gdt && chmod +x /tmp/gdt
xz -dc .dev/bench-generate.xz > /tmp/bench-generate && chmod +x /tmp/bench-generate
for t in graph_decode_matches_flex_f32 graph_decode_matches_flex_bf16; do
  timeout 120 /tmp/gdt --ignored --exact $t > "$out/test-$t.log" 2>&1
done
for dtype in f32 bf16; do
  for case in 0 1 2 3 4 5; do
    mkdir -p /tmp/t-$dtype-$case
    (cd /tmp/t-$dtype-$case && GRAPH_DECODE_CASES=$case timeout ${TEST_TIMEOUT:-300} /tmp/gdt --ignored --exact graph_decode_matches_eager_$dtype \
      > "$out/test-cuda-$dtype-$case.log" 2>&1) &
  done
done
(cd /tmp && timeout ${TEST_TIMEOUT:-300} /tmp/gdt --ignored --exact graph_decode_rejects_a_model_of_another_shape > "$out/test-reject.log" 2>&1) &
wait
for f in "$out"/test-*.log; do echo "== $f"; grep -E "^case|test result|panicked|differ|tokens|error" "$f" | head -6; done
common="--config configs/llava-jp-1.3b-v1.0.json --batches 1 --text-tokens 48 --new-tokens ${NEW:-128} --runs 3 --backends cuda --dtype bf16"
timeout ${BENCH_TIMEOUT:-200} /tmp/bench-generate $common --decode graph > "$out/ours.jsonl" 2> "$out/ours.err"
tail -3 "$out/ours.err"; cat "$out/ours.jsonl"
timeout 120 python3 model-import/scripts/bench_generate.py --batches 1 --text-tokens 48 --new-tokens ${NEW:-128} --runs 3 2>&1 \
  | grep -v Warning | tee "$out/pytorch.jsonl"

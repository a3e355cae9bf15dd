#!/usr/bin/env bash
# GPU machine, repository root: the fused decoder (five kernels per layer). Each test case in a
# process of its own, all at once (burn's kernel compilation for each new shape dominates);
# then the bench (the decode step's per-kernel profile first), the previous decoder's bench
# binary when .dev has it (bench-generate-old.xz), and transformers.
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
export CUBECL_AUTOTUNE_LEVEL=minimal PYTHONUNBUFFERED=1
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
xz -dc .dev/graph-decode-test.xz > /tmp/gdt && chmod +x /tmp/gdt
xz -dc .dev/bench-generate.xz > /tmp/bench-generate && chmod +x /tmp/bench-generate
for dtype in f32 bf16; do
  for case in 0 1 2 3 4 5; do
    GRAPH_DECODE_CASES=$case timeout ${TEST_TIMEOUT:-240} /tmp/gdt --ignored --exact graph_decode_matches_eager_$dtype \
      > "$out/test-$dtype-$case.log" 2>&1 &
  done
done
timeout ${TEST_TIMEOUT:-240} /tmp/gdt --ignored --exact graph_decode_rejects_a_model_of_another_shape > "$out/test-reject.log" 2>&1 &
common="--config configs/llava-jp-1.3b-v1.0.json --batches 1 --text-tokens 48 --new-tokens ${NEW:-128} --runs 3 --backends cuda --dtype bf16"
wait
timeout ${BENCH_TIMEOUT:-200} /tmp/bench-generate $common --decode graph > "$out/ours.jsonl" 2> "$out/ours.err"
for f in "$out"/test-*.log; do echo "== $f"; grep -E "^case|test result|panicked|differ|tokens|error" "$f" | head -6; done
tail -3 "$out/ours.err"; cat "$out/ours.jsonl"
if [ -e .dev/bench-generate-old.xz ]; then
  xz -dc .dev/bench-generate-old.xz > /tmp/bench-old && chmod +x /tmp/bench-old
  timeout 150 /tmp/bench-old $common --decode graph 2>&1 | tail -3 | tee "$out/ours-old.jsonl"
fi
timeout 120 python3 model-import/scripts/bench_generate.py --batches 1 --text-tokens 48 --new-tokens ${NEW:-128} --runs 3 2>&1 \
  | grep -v Warning | tee "$out/pytorch.jsonl"

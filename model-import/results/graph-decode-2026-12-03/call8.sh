#!/usr/bin/env bash
# GPU machine, repository root, .dev carried: call 7's decoder with the logits kernel reading two
# rows per warp on a grid sized by occupancy (.dev/graph-decode-test.xz, bench-generate.xz),
# beside call 7's (.dev/old-bench-generate.xz). In order of what matters, each step only while
# time is left (LIMIT, for the session's last device minutes): CPU-referenced tests, bench,
# transformers, bench (call 7), a variant, then the CUDA-referenced test cases in parallel.
set -uo pipefail
# Everything goes to one archive at the end: a call brings back only a few files.
final=${OUT:-/tmp/out}; out=/tmp/call8; mkdir -p "$out" "$final"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
export CUBECL_AUTOTUNE_LEVEL=minimal PYTHONUNBUFFERED=1
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
start=$SECONDS; limit=${LIMIT:-570}
left() { echo $(( limit - (SECONDS - start) )); }
for b in graph-decode-test bench-generate old-bench-generate; do
  xz -T4 -dc .dev/$b.xz > /tmp/$b && chmod +x /tmp/$b &
done
wait
for t in graph_decode_matches_flex_f32 graph_decode_matches_flex_bf16; do
  timeout 90 /tmp/graph-decode-test --ignored --exact $t > "$out/test-$t.log" 2>&1
  echo "== $t: $(grep -E 'test result|panicked' "$out/test-$t.log" | head -3) ($((SECONDS - start)) s)"
done
common="--config configs/llava-jp-1.3b-v1.0.json --batches 1 --text-tokens 48 --new-tokens ${NEW:-128} --backends cuda --dtype bf16 --decode graph"
bench() {  # name binary runs [env...]
  local name=$1 bin=$2 runs=$3; shift 3
  local t=$(( $(left) - 60 )); [ $t -gt 200 ] && t=200
  [ $t -lt 30 ] && { echo "== $name: skipped, $(left) s left"; return; }
  env "$@" timeout $t /tmp/$bin $common --runs $runs > "$out/$name.jsonl" 2> "$out/$name.err"
  echo "== $name ($((SECONDS - start)) s)"; tail -2 "$out/$name.err"; cat "$out/$name.jsonl"
}
bench ours bench-generate 3
t=$(( $(left) - 60 )); [ $t -gt 120 ] && t=120
[ $t -gt 30 ] && timeout $t python3 model-import/scripts/bench_generate.py --batches 1 --text-tokens 48 --new-tokens ${NEW:-128} --runs 3 2>&1 \
  | grep -v Warning > "$out/pytorch.jsonl"; echo "== transformers ($((SECONDS - start)) s)"; cat "$out/pytorch.jsonl"
bench ours-call7 old-bench-generate 2
bench ours-ahead2 bench-generate 2 LLAVA_JP_GRAPH_NVRTC_OPTIONS=-DLOGITS_AHEAD=2
t=$(( $(left) - 10 ))
if [ $t -gt 60 ]; then
  for dtype in f32 bf16; do
    for case in 0 1 2 3 4 5; do
      mkdir -p /tmp/t-$dtype-$case
      (cd /tmp/t-$dtype-$case && GRAPH_DECODE_CASES=$case timeout $t /tmp/graph-decode-test --ignored --exact graph_decode_matches_eager_$dtype \
        > "$out/test-cuda-$dtype-$case.log" 2>&1) &
    done
  done
  (cd /tmp && timeout $t /tmp/graph-decode-test --ignored --exact graph_decode_rejects_a_model_of_another_shape > "$out/test-cuda-reject.log" 2>&1) &
  wait
  for f in "$out"/test-cuda-*.log; do echo "== $f: $(grep -E 'test result|panicked|differ' "$f" | head -2)"; done
fi
echo "total $((SECONDS - start)) s"
tar czf "$final/call8-logs.tgz" -C "$out" .

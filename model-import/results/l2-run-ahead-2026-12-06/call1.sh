#!/usr/bin/env bash
# Call 1: the L2 run-ahead (each decode kernel asks L2, by bulk prefetches, for the weights
# the step reads LLAVA_JP_GRAPH_L2_AHEAD_MB further on). The graph decoder's tests against
# flex with a run-ahead, then the full-size greedy decode bench over windows, piece sizes, and
# variant sources whose GEMV weight loads are L2 evict-first (.dev/next/evict-first.cu),
# and also whose run-ahead prefetches are evict-last (.dev/next/evict-both.cu).
# Carry .dev/next (bench-generate.xz, graph-decode-test.xz, evict-first.cu).
CALL=${CALL:-call1} BINARIES="next/bench-generate next/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-540}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
run_test graph_decode_matches_flex_bf16 flex-bf16-ahead 120 LLAVA_JP_GRAPH_L2_AHEAD_MB=1
run_test graph_decode_matches_flex_f32 flex-f32-ahead 120 LLAVA_JP_GRAPH_L2_AHEAD_MB=1
run_test graph_decode_matches_flex_bf16 flex-bf16 120
bench base bench-generate 2 LLAVA_JP_GRAPH_L2_AHEAD_MB=0
bench ahead16 bench-generate 2 LLAVA_JP_GRAPH_L2_AHEAD_MB=16
bench ahead32 bench-generate 2 LLAVA_JP_GRAPH_L2_AHEAD_MB=32
bench ahead16-own0 bench-generate 1 LLAVA_JP_GRAPH_L2_AHEAD_MB=16 LLAVA_JP_GRAPH_L2_OWN_MB=0
bench ahead8 bench-generate 1 LLAVA_JP_GRAPH_L2_AHEAD_MB=8
bench ahead24 bench-generate 1 LLAVA_JP_GRAPH_L2_AHEAD_MB=24
bench ahead48 bench-generate 1 LLAVA_JP_GRAPH_L2_AHEAD_MB=48
bench evict16 bench-generate 1 LLAVA_JP_GRAPH_L2_AHEAD_MB=16 LLAVA_JP_GRAPH_SOURCE=.dev/next/evict-first.cu
bench evict32 bench-generate 1 LLAVA_JP_GRAPH_L2_AHEAD_MB=32 LLAVA_JP_GRAPH_SOURCE=.dev/next/evict-first.cu
bench both16 bench-generate 1 LLAVA_JP_GRAPH_L2_AHEAD_MB=16 LLAVA_JP_GRAPH_SOURCE=.dev/next/evict-both.cu
bench both32 bench-generate 1 LLAVA_JP_GRAPH_L2_AHEAD_MB=32 LLAVA_JP_GRAPH_SOURCE=.dev/next/evict-both.cu
bench piece16k bench-generate 1 LLAVA_JP_GRAPH_L2_AHEAD_MB=16 LLAVA_JP_GRAPH_L2_PIECE_KB=16
bench piece256k bench-generate 1 LLAVA_JP_GRAPH_L2_AHEAD_MB=16 LLAVA_JP_GRAPH_L2_PIECE_KB=256
bench own-all16 bench-generate 1 LLAVA_JP_GRAPH_L2_AHEAD_MB=16 LLAVA_JP_GRAPH_L2_OWN_MB=4096
bench base-again bench-generate 1 LLAVA_JP_GRAPH_L2_AHEAD_MB=0
echo "== summary"
for f in $out/*.jsonl; do
  python3 - "$f" <<'PY'
import json, sys
name = sys.argv[1].split('/')[-1][:-6]
step, tps = None, []
for line in open(sys.argv[1]):
    try: r = json.loads(line)
    except Exception: continue
    if r.get('profile') == 'graph decode step': step = r.get('kernels_graph_ms')
    if 'decode_tokens_per_s' in r: tps.append(round(r['decode_tokens_per_s'], 1))
print(f"{name:12s} kernels_graph_ms={step} tokens/s={tps}")
PY
done
finish

#!/usr/bin/env bash
# Call 7: the attention chunk read 16 bytes a lane (attention.patch: keys and values by lane
# groups of eight dimensions, q in registers, the warps' sums through shared memory), as
# .dev/mk/attn.cu, against this tree's source (.dev/mk/step.cu); flex bf16 test on it first.
CALL=${CALL:-call7} BINARIES="mk/bench-generate mk/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
nvidia-smi --query-gpu=name --format=csv,noheader
stepms() { grep -o '"step_kernel_graph_ms":[^,]*,"kernels_graph_ms":[^,]*' "$out/$1.jsonl"; tail -2 "$out/$1.err"; }
run_test graph_decode_matches_flex_bf16 flex-bf16-attn 100 LLAVA_JP_GRAPH_SOURCE=.dev/mk/attn.cu
grep -E "panicked|differ" -A2 "$out/flex-bf16-attn.log" | head -8
bench attn bench-generate 1 LLAVA_JP_GRAPH_STEP=kernel LLAVA_JP_GRAPH_SOURCE=.dev/mk/attn.cu > /dev/null; stepms attn
bench step bench-generate 1 LLAVA_JP_GRAPH_STEP=kernel LLAVA_JP_GRAPH_SOURCE=.dev/mk/step.cu > /dev/null; stepms step
decode_summary
finish

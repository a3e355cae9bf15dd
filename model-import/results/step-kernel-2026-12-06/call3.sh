#!/usr/bin/env bash
# Call 3: (0) the GEMV tails add eight splits' partial sums per L2 round trip, the logits' arg max over blocks by the whole last block; (1) the step kernel with a two-level grid barrier (groups of 32 blocks, each counter
# in a 128-byte line of its own); (2) both paths' prologues with their loads issued at once
# (LayerNorm statistics a slot a lane, combined through shuffles; the attention chunks merged
# two at a time). The graph decoder's tests against flex (both paths), then full-size greedy
# decode at batch 1: the kernels (now the default), the step kernel
# (LLAVA_JP_GRAPH_STEP=kernel). (Trimmed to fit the device time left: no 3-blocks variant, no transformers.)
# Carry .dev/next (bench-generate.xz, graph-decode-test.xz).
CALL=${CALL:-call3} BINARIES="next/bench-generate next/graph-decode-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-560}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
run_test graph_decode_matches_flex_f32 flex-f32 120
run_test graph_decode_matches_flex_bf16 flex-bf16 120
bench ours-kernels bench-generate 3
bench ours-step bench-generate 3 LLAVA_JP_GRAPH_STEP=kernel
finish

#!/usr/bin/env bash
# Call 4: where the flash kernels stand against PyTorch's SDPA (the attention bench at the
# model's shapes beside bench_attention.py), and where they stall at stage 1's shape
# (32 x 16 heads x 608, D = 128, causal): Nsight Compute's warp states, occupancy, memory and
# per-SASS samples of one forward and one backward launch.
# Carry .dev (attention-bench.xz).
CALL=${CALL:-call4} BINARIES="attention-bench"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-560}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 /tmp/attention-bench --iters 20 --flash-train-only > "$out/ours.jsonl" 2> "$out/ours.err"; echo "== ours ($((SECONDS - start)) s)"; tail -3 "$out/ours.err"; cat "$out/ours.jsonl"
timeout 120 python3 model-import/scripts/bench_attention.py --iters 20 2>&1 | grep -v Warning > "$out/pytorch.jsonl"; echo "== sdpa ($((SECONDS - start)) s)"; cat "$out/pytorch.jsonl"
CAP=120 RESERVE=30 ncu_flash forward backward
finish

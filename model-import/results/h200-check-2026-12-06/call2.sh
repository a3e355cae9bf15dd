#!/usr/bin/env bash
# Call 2 (needs an H200; call 1 trimmed to the device time left): greedy decode at batch 1,
# ours (graph decoder, 3 runs) beside transformers' generate, same call.
# Carry .dev/next (bench-generate.xz).
CALL=${CALL:-call2} BINARIES="next/bench-generate"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-280}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
bench decode bench-generate 3
transformers 100
finish

#!/usr/bin/env bash
# GPU machine, repository root: the graph decoder's tests against burn's eager decoding, then
# decode speed at full size (graph decoder, batch 1) beside transformers' generate.
# Binaries: .dev/graph-decode-test.xz (tests/graph_decode.rs), .dev/bench-generate.xz
# (benches/generate.rs), both `cargo ... --release` on the development machine.
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
export CUBECL_AUTOTUNE_LEVEL=minimal PYTHONUNBUFFERED=1
# The test binary reads configs/ through the path it was built at.
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
xz -dc .dev/graph-decode-test.xz > /tmp/gdt && chmod +x /tmp/gdt
xz -dc .dev/bench-generate.xz > /tmp/bench-generate && chmod +x /tmp/bench-generate
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout ${TEST_TIMEOUT:-200} /tmp/gdt --ignored --test-threads 1 2>&1 | tail -40 | tee "$out/tests.log"
common="--config configs/llava-jp-1.3b-v1.0.json --batches 1 --text-tokens 48 --new-tokens ${NEW:-128} --runs 3 --backends cuda --dtype bf16"
timeout ${BENCH_TIMEOUT:-200} /tmp/bench-generate $common --decode graph 2>&1 | tail -5 | tee "$out/ours.jsonl"
timeout 120 python3 model-import/scripts/bench_generate.py --batches 1 --text-tokens 48 --new-tokens ${NEW:-128} --runs 3 2>&1 \
  | grep -v Warning | tee "$out/pytorch.jsonl"

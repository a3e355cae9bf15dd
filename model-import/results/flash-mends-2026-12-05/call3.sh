#!/usr/bin/env bash
# The mends alone (kernels/vec.cu: shared addresses by __cvta_generic_to_shared, A fragments
# and rows in 32-bit words, on the 64-query forward) through main's launch geometry: the
# train-test binary of issue8-embedding-unverified (train-test-old.xz, da77449, the 64-query
# forward's launches) with LLAVA_JP_FLASH_SOURCE, its flash tests.
# Carry .dev (train-test-old.xz, kernels/).
CALL=${CALL:-call3} BINARIES="train-test-old"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-200}
nvidia-smi --query-gpu=name --format=csv,noheader
export LLAVA_JP_FLASH_SOURCE=$PWD/.dev/kernels/vec.cu
for t in fused_flash_backward_matches_the_split_pair_on_cuda qkv_attention_matches_the_split_route_on_cuda; do
  timeout $(( $(left) - 5 )) /tmp/train-test-old --ignored --exact $t --nocapture > "$out/$t.log" 2>&1
  echo "== $t: $(grep -E 'test result|panicked' "$out/$t.log" | head -3) ($((SECONDS - start)) s)"
done
finish

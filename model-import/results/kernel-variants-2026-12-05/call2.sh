#!/usr/bin/env bash
# Call 2 (after call 1): full-size training beside PyTorch in the same call. Stage 1 with the
# built-in kernels (main: the batch as one select, the pixels uploaded as f32 and cast on the
# device), PyTorch's stage 1, stage 1 again on the variant call 1 passed (VARIANT=fwdbwd or fwd,
# a file in .dev/kernels; none when unset), then stage 2, ours and PyTorch's.
# Carry .dev (llava-jp.xz, kernels/, tokenizer/).
CALL=call2 BINARIES=""
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-560}
nvidia-smi --query-gpu=name --format=csv,noheader
# Call 1's bench of the built-in source ran out of its 60 s compiling burn's kernels: the
# built-in source and the variant again, on the warm machine.
xz -T4 -dc .dev/attention-bench.xz > /tmp/attention-bench && chmod +x /tmp/attention-bench
for v in main ${VARIANT:-}; do
  src=; [ $v != main ] && src=$PWD/.dev/kernels/$v.cu
  env ${src:+LLAVA_JP_FLASH_SOURCE=$src} timeout 70 /tmp/attention-bench --shapes train --flash-train-only --iters 20 > "$out/bench-$v.jsonl" 2> "$out/bench-$v.err"
  echo "== attention bench, $v ($((SECONDS - start)) s)"; cat "$out/bench-$v.jsonl"; tail -2 "$out/bench-$v.err"
done
rm -f /tmp/llava-jp
CAP=150 train_run stage1 1 8
[ -n "${VARIANT:-}" ] && CAP=60 train_run stage1-$VARIANT 1 8 TORCH=0 LLAVA_JP_FLASH_SOURCE=$PWD/.dev/kernels/$VARIANT.cu
CAP=160 train_run stage2 2 10
[ -n "${VARIANT:-}" ] && CAP=60 train_run stage2-$VARIANT 2 10 TORCH=0 LLAVA_JP_FLASH_SOURCE=$PWD/.dev/kernels/$VARIANT.cu
finish

#!/usr/bin/env bash
# Call 2 (after call 1 passes): the attention bench at the LLM's training shapes (8 x 1024 and
# stage 1's 32 x 608, causal; forward + backward with the fused backward and with the split
# pair) beside PyTorch's SDPA, then stage 1 (32 x 608) and stage 2 (8 x 1024) beside PyTorch.
# Carry .dev with attention-bench.xz, llava-jp.xz and tokenizer/tokenizer.json.
CALL=call2 BINARIES="attention-bench"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=${LLAVA_JP_GEMM:-cublaslt}
timeout 100 /tmp/attention-bench --shapes train --flash-train-only --iters 20 > "$out/bench.jsonl" 2> "$out/bench.err"
echo "== attention bench ($((SECONDS - start)) s)"; cat "$out/bench.jsonl"; tail -3 "$out/bench.err"
timeout 60 python3 model-import/scripts/bench_attention.py 2>&1 | grep -v Warning | grep train > "$out/sdpa.jsonl"
echo "== sdpa ($((SECONDS - start)) s)"; cat "$out/sdpa.jsonl"
rm -f /tmp/llava-jp
CAP=170 train_run stage1 1 8
CAP=190 train_run stage2 2 10
finish

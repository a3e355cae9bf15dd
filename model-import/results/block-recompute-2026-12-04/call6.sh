#!/usr/bin/env bash
# Call 6: training parity with PyTorch again, now that CUDA training runs on the fused
# operations (LayerNorm, GELU, residual dropout, qkv flash attention, cuBLASLt linear layers
# with LLAVA_JP_GEMM=cublaslt): CUDA bf16, both stages, against the reference recipe replayed
# on the same batches (model-import/scripts/gpu_train_parity.sh).
# Carry .dev with llava-jp.xz and tokenizer/tokenizer.json.
CALL=call6 BINARIES=""
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
export LLAVA_JP_GEMM=cublaslt
timeout $(( $(left) - 10 )) bash model-import/scripts/gpu_train_parity.sh "$out/parity" "2 1" "cuda:bf16"
finish

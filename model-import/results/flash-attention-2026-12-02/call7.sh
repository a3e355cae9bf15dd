#!/usr/bin/env bash
# full-size stage 2 (batch 8 x 1024, dropout 0.1) with the flash kernels in training, beside PyTorch
set -u
export LLAVA_JP_ATTENTION=flash-train LLAVA_JP_GEMM=cublaslt LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
OURS_TIMEOUT=360 bash model-import/scripts/gpu_bench_train.sh $OUT/train "2" 6 2>&1 | tail -20
tail -3 $OUT/train/ours-stage2.log

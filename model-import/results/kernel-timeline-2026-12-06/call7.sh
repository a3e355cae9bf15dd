#!/usr/bin/env bash
# Call 7: the review's mends to src/cupti.rs (the subscription held only during a capture; a
# CUPTI already in the process reused; the driver's CUDA major tried first; a default-stream
# capture refused) and cublaslt.rs (a workspace per CUDA stream). The route's test with the
# machine's own libcupti (LLAVA_JP_CUPTI unset), then again under the kernel-timeline injection
# (its libcupti.so.12 already loaded), then stage 2 and stage 1 beside PyTorch.
# Carry .dev (llava-jp.xz, train-test.xz, tokenizer/, cupti/).
CALL=${CALL:-call7} BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-400}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
unset LLAVA_JP_CUPTI
TEST_TIMEOUT=60 train_tests cublaslt_on_cubecl_stream_matches_the_flag_route_on_cuda precast_frozen_weights_match_on_cuda
mkdir -p /tmp/cupti && xz -dc .dev/cupti/libcupti.so.12.xz > /tmp/cupti/libcupti.so.12 && cp .dev/cupti/libkernel_timeline.so /tmp/cupti/
CUDA_INJECTION64_PATH=/tmp/cupti/libkernel_timeline.so KERNEL_TIMELINE_OUT=$out/test.tsv LD_LIBRARY_PATH=/tmp/cupti:$LD_LIBRARY_PATH \
  timeout 60 /tmp/train-test --ignored --exact cublaslt_on_cubecl_stream_matches_the_flag_route_on_cuda --nocapture > $out/injected-test.log 2>&1
echo "== under the injection: $(grep -E 'test result|panicked' $out/injected-test.log | head -2)"; grep -h "cuBLASLt products\|CUPTI" $out/*.log | head -3
ls $out/test.tsv.* >/dev/null 2>&1 && echo "timeline written: $(grep -c '^K' $out/test.tsv.* | head -1) lines" && rm -f $out/test.tsv.*
rm -f /tmp/llava-jp
CAP=150 train_run stage2 2 8
CAP=150 train_run stage1 1 6
losses
finish

#!/usr/bin/env bash
# Call 2: cuBLASLt on cubecl's own stream (src/cupti.rs finds it). The CUDA tests of the product
# route, then stage 2 and stage 1 beside PyTorch, ours under the kernel timeline (as call 1).
# Carry .dev (llava-jp.xz, train-test.xz, tokenizer/, cupti/).
CALL=${CALL:-call2} BINARIES="train-test"
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
limit=${LIMIT:-560}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
mkdir -p /tmp/cupti && xz -dc .dev/cupti/libcupti.so.12.xz > /tmp/cupti/libcupti.so.12
cp .dev/cupti/libkernel_timeline.so /tmp/cupti/
echo "libcupti on this machine:"; ls /usr/local/cuda*/extras/CUPTI/lib64/libcupti.so* /usr/local/cuda*/targets/*/lib/libcupti.so* 2>/dev/null | head
# The same library for the product's stream search and the timeline's injection.
export LLAVA_JP_CUPTI=/tmp/cupti/libcupti.so.12
TEST_TIMEOUT=90 train_tests cublaslt_on_cubecl_stream_matches_the_flag_route_on_cuda autocast_affine_matches_burn_on_cuda \
  precast_frozen_weights_match_on_cuda linear_cross_entropy_matches_burn_on_cuda
timeline() {  # name stage steps analysis-steps [env...]
  local name=$1 stage=$2 steps=$3 range=$4; shift 4
  CAP=${CAP:-100} train_run $name $stage $steps TORCH=${TORCH:-0} CUDA_INJECTION64_PATH=/tmp/cupti/libkernel_timeline.so \
    KERNEL_TIMELINE_OUT=$out/$name.tsv "$@"
  local f=$(ls -S $out/$name.tsv.* 2>/dev/null | head -1)
  [ -n "$f" ] || { echo "== $name: no timeline written"; return; }
  python3 model-import/scripts/kernel_timeline.py "$f" --steps $range --top 12 | tee "$out/$name-idle.txt" | head -30
  grep -h "cuBLASLt products" $out/$name/ours-stage$stage.log | head -2
  xz -T4 -6 "$f"
}
rm -f /tmp/llava-jp
TORCH=1 CAP=190 timeline stage2 2 8 3-7
TORCH=1 CAP=170 timeline stage1 1 6 3-5
losses
finish

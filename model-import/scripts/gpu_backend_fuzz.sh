#!/usr/bin/env bash
# Backend differential fuzzing on the GPU machine: the CUDA legs (f32, bf16, f32 weights with
# bf16 matrix work) and the wgpu leg on the real GPU (Vulkan), each against flex in f32, with a
# random case generator and many cases per computation. Failures print their minimal case and
# the command that replays it.
#   on the development machine:
#     cargo test --release --test backend_fuzz --no-run   # prints the test binary's path
#     strip -o /tmp/backend-fuzz <that path> && xz -c /tmp/backend-fuzz > .dev/backend-fuzz.xz
#   on the GPU machine (repository root, carry .dev and .gl):
#     bash model-import/scripts/gpu_backend_fuzz.sh OUT_DIR [CASES]
#   LEGS="cuda_f32_vs_flex ..." picks legs; SEED=N replays a generator seed (default random).
set -uo pipefail
out=${1:?output folder}; cases=${2:-64}
mkdir -p "$out"
bin=/tmp/backend-fuzz
[ -x $bin ] || { xz -dc .dev/backend-fuzz.xz > $bin && chmod +x $bin; }
# wgpu on the H200: Vulkan loader libraries from .gl/, NVIDIA's driver as the ICD.
if [ -d .gl ]; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
export LLAVA_JP_FUZZ_CASES=$cases LLAVA_JP_FUZZ_SEED=${SEED:-random} CUBECL_AUTOTUNE_LEVEL=minimal
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
status=0
for leg in ${LEGS:-cuda_f32_vs_flex cuda_bf16_vs_flex cuda_autocast_bf16_vs_flex wgpu_f32_vs_flex}; do
  echo "== $leg"
  timeout "${LEG_TIMEOUT:-540}" $bin "$leg" --exact --include-ignored --nocapture --test-threads 1 2>&1 | tee "$out/$leg.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
exit $status

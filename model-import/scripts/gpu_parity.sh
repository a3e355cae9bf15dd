#!/usr/bin/env bash
# Full-size parity on the GPU machine: transformers builds CLIP ViT-L/14-336, llm-jp-1.3b's GPT-2
# and a LLaVA-JP model of those sizes with random weights, computes the reference in f32 (and
# its own bf16 error for scale), and our binary compares on CUDA f32, CUDA bf16 and wgpu f32.
#   usage (repository root, binary at .dev/llava-jp.xz, Vulkan loader debs in .gl/):
#   bash model-import/scripts/gpu_parity.sh OUT_DIR
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out"
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
export PYTHONUNBUFFERED=1 CUBECL_AUTOTUNE_LEVEL=minimal
bin=/tmp/llava-jp
xz -dc .dev/llava-jp.xz > $bin && chmod +x $bin
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ -n "${TINY:-}" ]; then  # also remake the committed tiny fixtures
  python3 model-import/scripts/make_fixtures.py /tmp/tiny >/dev/null 2>&1 && tar czf "$out/tiny.tgz" -C /tmp tiny
fi
# ONLY=llava RUNS="cuda bf16,wgpu f32" narrows the run to fit a device call.
python3 model-import/scripts/make_fixtures.py /tmp/full --full --baseline bfloat16 ${ONLY:+--only $ONLY} 2>&1 | grep -v Warning | tee "$out/reference.log"
IFS=, read -ra runs <<< "${RUNS:-cuda f32,cuda bf16,wgpu f32}"
for run in "${runs[@]}"; do
  set -- $run
  echo "== $1 $2"
  $bin check --fixture /tmp/full${ONLY:+/$ONLY} --backend "$1" --dtype "$2" 2>&1 | tee "$out/check-$1-$2.log"
done

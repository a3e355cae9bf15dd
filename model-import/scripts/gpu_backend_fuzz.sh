#!/usr/bin/env bash
# Backend differential fuzzing on the GPU machine: the CUDA legs (f32, bf16, f32 weights with
# bf16 matrix work) and the wgpu leg on the real GPU (Vulkan), each against flex in f32, with a
# random case generator. Every (leg, computation) pair runs as its own process, all in
# parallel, each drawing cases until its time budget is spent (most of the time goes into
# compiling kernels for new shapes, which is CPU work). Failures print their minimal case and the
# command that replays it; the summary lists cases run and the worst error per pair.
#   on the development machine:
#     NAMES=backend-fuzz bash model-import/scripts/pack_gpu_binaries.sh   # .dev/backend-fuzz.xz
#     (for the wgpu leg: apt-get download libvulkan1 into .gl/)
#   on the GPU machine (repository root, carry .dev and .gl):
#     bash model-import/scripts/gpu_backend_fuzz.sh OUT_DIR
#   LEGS="cuda_f32_vs_flex ..." and ONLY="attention gpt2 ..." pick legs and computations;
#   Cases in fuzz_regressions.txt (beside this script) are replayed first on their legs.
#   FUZZ_SECONDS (default 400) is each process's budget, CASES (default 1000) its case cap,
#   SEED=N replays a generator seed (default random), ATTENTION picks LLAVA_JP_ATTENTION.
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out"
# One log per process, kept in a scratch folder and packed into $out/logs.tgz at the end (the
# device tool brings back only a few files).
logs=$(mktemp -d)
bin=/tmp/backend-fuzz
[ -x $bin ] || { xz -dc .dev/backend-fuzz.xz > $bin && chmod +x $bin; }
legs=${LEGS:-cuda_f32_vs_flex cuda_bf16_vs_flex cuda_autocast_bf16_vs_flex}
# wgpu on the H200: Vulkan loader library from .gl/, NVIDIA's driver as the ICD.
if [ -d .gl ] && ls .gl/*.deb >/dev/null 2>&1; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  [ -z "${LEGS:-}" ] && legs="$legs wgpu_f32_vs_flex"
fi
export LLAVA_JP_FUZZ_CASES=${CASES:-1000} LLAVA_JP_FUZZ_SECONDS=${FUZZ_SECONDS:-400}
export LLAVA_JP_FUZZ_SEED=${SEED:-random} CUBECL_AUTOTUNE_LEVEL=minimal RAYON_NUM_THREADS=2
# The flash attention kernels forward and backward (src/flash.rs, the default route);
# ATTENTION=burn or flash-inference to narrow.
export LLAVA_JP_ATTENTION=${ATTENTION:-flash}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# Earlier failures first (model-import/scripts/fuzz_regressions.txt), for the legs run here.
status=0
while read -r leg case; do
  case "$leg" in ''|'#'*) continue ;; esac
  [[ " $legs " == *" $leg "* ]] || continue
  if LLAVA_JP_FUZZ_REPLAY="$case" timeout "${LEG_TIMEOUT:-560}" $bin "$leg" --exact --include-ignored --nocapture > "$logs/regression.out" 2>&1 < /dev/null; then
    echo "regression case passes on $leg: $(grep -m1 '^passes' "$logs/regression.out")"
  else
    status=1; echo "== REGRESSION on $leg: $case"; grep -v "^stack\|^note:" "$logs/regression.out" | grep -A3 "panicked" | head -6
  fi
done < "$(dirname "$0")/fuzz_regressions.txt"
for leg in $legs; do
  for c in ${ONLY:-image matmul attention attention_grad attention_dropout projector clip pieces gpt2 decode llava gradients}; do echo "$leg $c"; done
done | xargs -P "${JOBS:-64}" -L1 bash -c '
  LLAVA_JP_FUZZ_ONLY=$1 timeout "${LEG_TIMEOUT:-560}" '"$bin"' "$0" --exact --include-ignored --nocapture --test-threads 1 > "'"$logs"'/$0.$1.log" 2>&1
  echo "$0 $1 exit $?" >> "'"$logs"'/status.txt"'
tar czf "$out/logs.tgz" -C "$logs" .
# Failures first (minimal case and replay command), the summary last.
for f in "$logs"/*.log; do
  grep -q "cases in" "$f" || { status=1; echo "== $(basename "$f" .log): no result:"; grep -v "^stack\|^note:" "$f" | grep -A4 "panicked at tests\|error" | head -12; }
done
echo "== cases run and worst errors"
for leg in $legs; do
  echo "-- $leg"
  grep -h "cases in" "$logs/$leg".*.log
done | tee "$out/summary.txt"
exit $status

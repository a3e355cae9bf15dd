#!/usr/bin/env bash
# Every kernel of steady training steps, timed by Nsight Compute (one metric, one pass a kernel)
# and summed by name: where a step's device time goes, cuBLASLt's and our own kernels included
# (cubecl's profile lists only its own). At the card's own clocks (`--clock-control none`): ncu
# locks them to base by default, which made one call's cuBLAS kernels ~20% slower than the same
# kernels of PyTorch's under torch.profiler. Our binary records only the steps
# LLAVA_JP_CUDA_PROFILE_STEPS names (ncu --profile-from-start off), so the first steps'
# compilation and autotuning are left out.
#   usage (GPU machine, repository root, .dev carried as for gpu_bench_train.sh):
#   bash model-import/scripts/gpu_kernel_profile.sh OUT_DIR STAGE [FIRST-LAST (default 3-3)]
# Writes OUT_DIR/ncu-stageN.csv (raw) and prints the table (also OUT_DIR/kernels-stageN.txt).
set -uo pipefail
out=${1:?output folder}; stage=${2:?stage 1 or 2}; steps=${3:-3-3}
mkdir -p "$out"
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
[ -n "$ncu" ] || { echo "no ncu on this machine" >&2; exit 1; }
last=${steps#*-}
xz -dc .dev/llava-jp.xz > /tmp/llava-jp-real && chmod +x /tmp/llava-jp-real
# gpu_bench_train.sh runs /tmp/llava-jp: this wrapper runs it under ncu.
printf '#!/bin/sh\nexec %s --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv --page raw --log-file %s /tmp/llava-jp-real "$@"\n' \
  "$ncu" "$out/ncu-stage$stage.csv" > /tmp/llava-jp
chmod +x /tmp/llava-jp
LLAVA_JP_CUDA_PROFILE_STEPS=$steps TORCH=0 bash model-import/scripts/gpu_bench_train.sh "$out" "$stage" $((last + 1))
rm -f /tmp/llava-jp
python3 - "$out/ncu-stage$stage.csv" "$steps" <<'PY' | tee "$out/kernels-stage$stage.txt"
import collections, csv, sys
path, steps = sys.argv[1], sys.argv[2]
first, last = (int(x) for x in steps.split("-"))
rows = list(csv.reader(l for l in open(path, errors="replace") if l.startswith('"')))
if len(rows) < 3:
    sys.exit(f"{path}: no kernels recorded (did the run reach step {first}?)")
header, units, data = rows[0], rows[1], rows[2:]
name, col = header.index("Kernel Name"), header.index("gpu__time_duration.sum")
scale = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0, "second": 1e3, "s": 1e3}[units[col]]
total, count = collections.Counter(), collections.Counter()
for r in data:
    # Templates and arguments cut off, so that launches of one kernel add up.
    k = r[name].split("(")[0].split("<")[0].strip()
    total[k] += float(r[col].replace(",", "")) * scale
    count[k] += 1
n = last - first + 1
print(f"{len(data)} kernels over {n} step(s), {sum(total.values()) / n:.1f} ms of kernel time a step")
print(f"{'ms a step':>10} {'launches':>9}  kernel")
for k, ms in total.most_common(60):
    print(f"{ms / n:10.2f} {count[k] / n:9.0f}  {k[:110]}")
PY

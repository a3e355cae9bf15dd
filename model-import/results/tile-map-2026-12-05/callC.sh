#!/usr/bin/env bash
# Call C: where a stage-1 step's GPU sits idle (~12% of it on 2026-12-05). Nsight Systems over
# a few steady stage-1 steps when the machine has it: the GPU's gaps between kernels, and what
# the host was doing then (CUDA API calls on cubecl's device thread, the training thread).
# Carry .dev with llava-jp.xz and tokenizer/tokenizer.json.
CALL=callC BINARIES=""
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
nsys=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
echo "nsys: ${nsys:-none}"
if [ -n "$nsys" ]; then
  rm -f /tmp/llava-jp
  # gpu_bench_train.sh runs `llava-jp train`; wrap the binary so that nsys records it, starting
  # after the first steps (compilation) and stopping after 3 s of steady steps.
  xz -dc .dev/llava-jp.xz > /tmp/llava-jp-real && chmod +x /tmp/llava-jp-real
  printf '#!/bin/sh\nexec %s profile -t cuda,osrt -s none --delay 12 --duration 3 -o %s/stage1 -f true /tmp/llava-jp-real "$@"\n' "$nsys" "$out" > /tmp/llava-jp
  chmod +x /tmp/llava-jp
  CAP=200 train_run stage1-nsys 1 40 TORCH=0
  timeout 120 "$nsys" stats -r cuda_gpu_sum,cuda_api_sum -f csv -o "$out/stage1" "$out/stage1.nsys-rep" > /dev/null 2>&1
  # The gaps: GPU kernel trace, sorted by start; gaps over 50 µs summed.
  timeout 120 "$nsys" stats -r cuda_gpu_trace -f csv -o "$out/stage1" "$out/stage1.nsys-rep" > /dev/null 2>&1
  python3 - "$out/stage1_cuda_gpu_trace.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
spans = sorted((int(r["Start (ns)"]), int(r["Start (ns)"]) + int(r["Duration (ns)"]), r["Name"][:60]) for r in rows)
end, gaps = spans[0][1], []
for s, e, name in spans[1:]:
    if s > end: gaps.append((s - end, name))
    end = max(end, e)
total = spans[-1][1] - spans[0][0]
print(f"kernels {len(spans)}, span {total/1e6:.1f} ms, idle {sum(g for g, _ in gaps)/1e6:.1f} ms in {len(gaps)} gaps")
big = sorted(gaps, reverse=True)[:15]
for g, name in big: print(f"  {g/1e3:8.1f} us before {name}")
PY
  rm -f "$out"/*.sqlite "$out"/*.nsys-rep
fi
finish

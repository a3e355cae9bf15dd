#!/usr/bin/env bash
# Call 2 (after call 1 passes): full-size training with the map beside PyTorch, stage 1 then
# stage 2, then Nsight Systems over a few steady stage-1 steps when the machine has it (where
# the GPU sits idle: ~12% of stage 1's step on 2026-12-05).
# Carry .dev with llava-jp.xz and tokenizer/tokenizer.json.
CALL=call2 BINARIES=""
source "$(dirname "$0")/../../scripts/gpu_call_lib.sh"
rm -f /tmp/llava-jp
CAP=170 train_run stage1 1 8
CAP=150 train_run stage2 2 10
nsys=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
echo "nsys: ${nsys:-none} ($(left) s left)"
if [ -n "$nsys" ] && [ $(left) -gt 150 ]; then
  xz -dc .dev/llava-jp.xz > /tmp/llava-jp-real && chmod +x /tmp/llava-jp-real
  # gpu_bench_train.sh runs /tmp/llava-jp; this wrapper has nsys record it from 12 s in (after
  # the first steps' compilation) for 3 s of steady steps.
  printf '#!/bin/sh\nexec %s profile -t cuda,osrt -s none --delay 12 --duration 3 -o %s/stage1 -f true /tmp/llava-jp-real "$@"\n' "$nsys" "$out" > /tmp/llava-jp
  chmod +x /tmp/llava-jp
  CAP=$(( $(left) - 60 )) train_run stage1-nsys 1 40 TORCH=0
  timeout 40 "$nsys" stats -r cuda_gpu_trace -f csv -o "$out/stage1" "$out/stage1.nsys-rep" > /dev/null 2>&1
  python3 - "$out/stage1_cuda_gpu_trace.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
spans = sorted((int(r["Start (ns)"]), int(r["Start (ns)"]) + int(r["Duration (ns)"]), r["Name"][:60]) for r in rows)
end, gaps = spans[0][1], []
for s, e, name in spans[1:]:
    if s > end: gaps.append((s - end, name))
    end = max(end, e)
total = spans[-1][1] - spans[0][0]
print(f"kernels and copies {len(spans)}, span {total/1e6:.1f} ms, idle {sum(g for g, _ in gaps)/1e6:.1f} ms in {len(gaps)} gaps")
for g, name in sorted(gaps, reverse=True)[:15]: print(f"  {g/1e3:8.1f} us before {name}")
PY
  rm -f "$out"/*.sqlite "$out"/*.nsys-rep
fi
finish

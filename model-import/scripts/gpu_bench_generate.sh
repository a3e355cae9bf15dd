#!/usr/bin/env bash
# Generation speed on the H200, LLaVA-JP v1.0's architecture (random weights): ours (CUDA bf16
# and f32, the bench binary of benches/generate.rs) and transformers' generate (bf16), one
# after the other in one command, then the ratios.
#   usage (repository root; bench binary at .dev/bench-generate.xz):
#   bash model-import/scripts/gpu_bench_generate.sh OUT_DIR [NEW_TOKENS]
set -uo pipefail
out=${1:?output folder}; new=${2:-128}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 CUBECL_AUTOTUNE_LEVEL=minimal
bin=/tmp/bench-generate
[ -x $bin ] || { xz -dc .dev/bench-generate.xz > $bin && chmod +x $bin; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
common="--config configs/llava-jp-1.3b-v1.0.json --batches 1,8 --text-tokens 48 --new-tokens $new --runs 3"
for dtype in ${DTYPES:-bf16}; do
  timeout ${OURS_TIMEOUT:-300} $bin $common --backends cuda --dtype $dtype 2>&1 | tee -a "$out/ours.jsonl"
done
python3 model-import/scripts/bench_generate.py --batches 1,8 --text-tokens 48 --new-tokens $new --runs 3 2>&1 \
  | grep -v Warning | tee "$out/pytorch.jsonl"
python3 - "$out" <<'PY'
import json, sys
rows = []
for f in ("ours.jsonl", "pytorch.jsonl"):
    for line in open(f"{sys.argv[1]}/{f}"):
        if line.startswith("{"):
            rows.append(json.loads(line))
ref = {r["batch"]: r for r in rows if r["side"] == "pytorch"}
print("| side | dtype | batch | prompt tokens | TTFT ms | decode tok/s | TTFT speed vs PyTorch | decode speed vs PyTorch |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    p = ref.get(r["batch"])
    ratio = lambda a, b: f"{a / b:.2f}x" if p else "-"
    print(f"| {r['side']} | {r['dtype']} | {r['batch']} | {r['prompt_tokens']} | {r['ttft_ms']:.1f} | {r['decode_tokens_per_s']:.1f} | "
          f"{ratio(p['ttft_ms'], r['ttft_ms']) if p else '-'} | {ratio(r['decode_tokens_per_s'], p['decode_tokens_per_s']) if p else '-'} |")
PY

#!/usr/bin/env bash
# Training parity on the GPU machine: a tiny LLaVA-JP (random weights, llm-jp vocabulary) and a
# coloured-shapes dataset made by train_reference.py; our binary trains it (CUDA with bf16
# autocast, and the CPU in f32), then PyTorch + transformers replay the same batches with the
# reference's recipe in the same precision, printing both losses step by step.
#   usage (repository root; binary at .dev/llava-jp.xz, tokenizer dir at .dev/tokenizer/):
#   bash model-import/scripts/gpu_train_parity.sh OUT_DIR [STAGES] [RUNS]
#   STAGES: "2 1" (default); RUNS: "cuda:bf16 flex:f32" (default)
set -uo pipefail
out=${1:?output folder}; stages=${2:-2 1}; runs=${3:-cuda:bf16 flex:f32}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 CUBECL_AUTOTUNE_LEVEL=minimal
bin=/tmp/llava-jp
[ -x $bin ] || { xz -dc .dev/llava-jp.xz > $bin && chmod +x $bin; }
tp=/tmp/train-parity
[ -f $tp/stage2.toml ] || python3 model-import/scripts/train_reference.py make $tp --tokenizer "$PWD/.dev/tokenizer/tokenizer.json" 2>&1 | grep -v Warning
for stage in $stages; do
  for run in $runs; do
    backend=${run%%:*}; precision=${run##*:}
    name=$backend-$precision-stage$stage
    echo "== $name"
    start=$(date +%s)
    $bin train --config $tp/stage$stage.toml --backend $backend --set precision=$precision --set output_dir=$tp/$name > "$out/$name.log" 2>&1 || { tail -20 "$out/$name.log"; continue; }
    echo "ours: $(( $(date +%s) - start )) s"; tail -3 "$out/$name.log"
    cp $tp/$name/metrics.jsonl "$out/$name.metrics.jsonl"
    python3 model-import/scripts/train_reference.py replay $tp --stage $stage --metrics $tp/$name/metrics.jsonl \
      --precision $precision --out "$out/$name.reference.json" 2>&1 | grep -v Warning | tee "$out/$name.compare.txt"
  done
done

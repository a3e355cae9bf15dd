#!/usr/bin/env bash
# Full-size training steps on the H200: our binary (CUDA, bf16 mixed precision) and PyTorch +
# transformers (bf16 autocast, SDPA, fused AdamW) at the same shapes, one after the other.
#   stage 2: batch 8 x 1024 tokens (projector + LLM); stage 1: batch 32 x 608 (projector only)
#   usage (repository root; binary at .dev/llava-jp.xz, tokenizer dir at .dev/tokenizer/):
#   bash model-import/scripts/gpu_bench_train.sh OUT_DIR ["2 1"] [STEPS]
#   TRAIN_SET="key=value ..." overrides settings of our run (batch size, checkpointing, dropout);
#   PyTorch's run takes the same batch size and gradient checkpointing.
#   TORCH=0 leaves PyTorch out (a second run of ours under other settings, same call).
#   LEAVE_GIB=24 runs ours beside gpu_ballast.py, which holds all but 24 GiB of the GPU's free
#   memory: the run fits a card of that size when it finishes (memory figures then include the
#   ballast; `device_mb` in the metrics is ours alone).
#   Our summary line has the host's mean seconds per steady step in each part of the step
#   (`times` in the metrics: recording forward / backward / optimizer, waiting for reads).
#   util-ours-N.txt has the GPU's busy share every 100 ms (nvidia-smi), timestamped.
#   PROFILE=1 adds cubecl's per-kernel profile of our run (every kernel timed, so the step
#   itself slows down) to OUT_DIR/cubecl-stageN.log, for the per-kernel breakdown.
set -uo pipefail
out=${1:?output folder}; stages=${2:-2 1}; steps=${3:-6}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 CUBECL_AUTOTUNE_LEVEL=minimal
bin=/tmp/llava-jp
[ -x $bin ] || { xz -dc .dev/llava-jp.xz > $bin && chmod +x $bin; }
b=/tmp/bench-train
python3 model-import/scripts/bench_train.py data $b --tokenizer "$PWD/.dev/tokenizer/tokenizer.json" --steps $steps
peak() { sort -n "$1" | tail -1; }
for stage in $stages; do
  if [ $stage = 2 ]; then batch=8; seq=1024; else batch=32; seq=608; fi
  # TRAIN_SET: overrides for our run (`--set` of the train command, space-separated KEY=VALUE).
  sets=(); torch_args=()
  for kv in ${TRAIN_SET:-}; do
    sets+=(--set "$kv")
    [[ $kv == per_device_train_batch_size=* ]] && batch=${kv#*=}
    [[ $kv == gradient_checkpointing=true ]] && torch_args+=(--gradient-checkpointing)
  done
  echo "== stage $stage: batch $batch x $seq tokens"
  (while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.5; done) > "$out/mem-ours-$stage.txt" &
  sampler=$!
  # The GPU's busy share (a kernel running), every 100 ms, stamped, to set against the steps.
  nvidia-smi --query-gpu=timestamp,utilization.gpu --format=csv,noheader,nounits -lms 100 > "$out/util-ours-$stage.txt" &
  util=$!
  start=$(date +%s)
  profile=()
  [ "${PROFILE:-0}" = 1 ] && profile=(env CUBECL_DEBUG_LOG="$out/cubecl-stage$stage.log" CUBECL_DEBUG_OPTION=profile-medium)
  ballast=
  if [ -n "${LEAVE_GIB:-}" ]; then
    rm -f /tmp/ballast-ready
    python3 model-import/scripts/gpu_ballast.py $LEAVE_GIB /tmp/ballast-ready > "$out/ballast-$stage.txt" 2>&1 &
    ballast=$!
    for i in $(seq 120); do [ -e /tmp/ballast-ready ] || ! kill -0 $ballast 2>/dev/null && break; sleep 0.5; done
    cat "$out/ballast-$stage.txt"
  fi
  timeout ${OURS_TIMEOUT:-420} "${profile[@]}" $bin train --config $b/stage$stage.toml --backend cuda "${sets[@]}" > "$out/ours-stage$stage.log" 2>&1
  echo "ours exit $? after $(( $(date +%s) - start )) s"
  [ -n "$ballast" ] && { kill $ballast; wait $ballast 2>/dev/null; }
  kill $sampler $util
  cp $b/run-stage$stage/metrics.jsonl "$out/ours-stage$stage.metrics.jsonl" 2>/dev/null
  python3 - "$out/ours-stage$stage.metrics.jsonl" $batch $seq "$(peak "$out/mem-ours-$stage.txt")" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
batch, seq, peak_mib = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
steady = rows[2:] if len(rows) > 3 else rows
step_s = sum(r["tokens"] / r["tokens_per_s"] for r in steady) / len(steady)
tokens = sum(r["tokens"] for r in steady) / len(steady)
llm = 1.3e9  # replaced below by the exact count when known
print(json.dumps(dict(side="ours", steps=len(rows), step_s=step_s, tokens_per_step=tokens, tokens_per_s=tokens / step_s,
                      samples_per_s=batch / step_s, first_step_s=rows[0]["tokens"] / rows[0]["tokens_per_s"],
                      peak_gib_nvidia_smi=peak_mib / 1024,
                      host_s={k: round(sum(r.get("times", {}).get(k, 0.0) for r in steady) / len(steady), 4)
                              for k in ("data_s", "upload_s", "forward_s", "backward_s", "loss_read_s", "grad_norm_s", "optimizer_s")})))
PY
  [ "${TORCH:-1}" = 1 ] || continue
  (while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.5; done) > "$out/mem-torch-$stage.txt" &
  sampler=$!
  # The kernel timeline (CUDA_INJECTION64_PATH, kernel_timeline.c) is of our run only.
  env -u CUDA_INJECTION64_PATH python3 model-import/scripts/bench_train.py torch --stage $stage --batch $batch --seq $seq --steps 8 "${torch_args[@]}" 2>&1 | grep -v Warning | tail -1
  kill $sampler
  echo "pytorch peak (nvidia-smi): $(peak "$out/mem-torch-$stage.txt") MiB"
done

# Shared by the GPU call scripts of model-import/results/*/ (sourced; GPU machine, repository root, `.dev` carried).
# Sets `out` (logs, archived into $OUT at the end by `finish`), the CUDA library path, the
# time left (`left`, against LIMIT, default 570 s of the call's 600), and unpacks the
# binaries named in BINARIES from .dev/<name>.xz to /tmp/<name>.
set -uo pipefail
final=${OUT:-/tmp/out}; out=/tmp/$CALL; mkdir -p "$out" "$final"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
export CUBECL_AUTOTUNE_LEVEL=minimal PYTHONUNBUFFERED=1
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
start=$SECONDS; limit=${LIMIT:-570}
left() { echo $(( limit - (SECONDS - start) )); }
for b in $BINARIES; do
  xz -T4 -dc .dev/$b.xz > /tmp/$b && chmod +x /tmp/$b &
done
wait
# One test of the graph-decoder binary in a process of its own: test name, log name, timeout, [env...].
run_test() {
  local name=$1 log=$2 t=$3; shift 3
  env "$@" timeout $t /tmp/graph-decode-test --ignored --exact $name --nocapture > "$out/$log.log" 2>&1
  echo "== $log: $(grep -E 'test result|panicked|differ' "$out/$log.log" | head -3) ($((SECONDS - start)) s)"
}
# The generation bench at full size, batch 1, graph decoder: name, binary, runs, [env...];
# `extra="--flag value" bench ...` adds bench arguments.
bench_args="--config configs/llava-jp-1.3b-v1.0.json --batches 1 --text-tokens 48 --new-tokens ${NEW:-128} --backends cuda --dtype bf16 --decode graph"
bench() {
  local name=$1 bin=$2 runs=$3; shift 3
  local t=$(( $(left) - 60 )); [ $t -gt 200 ] && t=200
  [ $t -lt 30 ] && { echo "== $name: skipped, $(left) s left"; return; }
  env "$@" timeout $t /tmp/$bin $bench_args ${extra:-} --runs $runs > "$out/$name.jsonl" 2> "$out/$name.err"
  echo "== $name ($((SECONDS - start)) s)"; tail -2 "$out/$name.err"; cat "$out/$name.jsonl"
}
# transformers' generate, same prompt: timeout cap.
transformers() {
  local t=$(( $(left) - 60 )); [ $t -gt $1 ] && t=$1
  [ $t -gt 30 ] && timeout $t python3 model-import/scripts/bench_generate.py --batches 1 --text-tokens 48 --new-tokens ${NEW:-128} --runs 3 2>&1 \
    | grep -v Warning > "$out/pytorch.jsonl"; echo "== transformers ($((SECONDS - start)) s)"; cat "$out/pytorch.jsonl"
}
# The train-test binary's CUDA tests, each in a process of its own (TEST_TIMEOUT s each, default 150): names...
train_tests() {
  for t in "$@"; do
    timeout ${TEST_TIMEOUT:-150} /tmp/train-test --ignored --exact $t --nocapture > "$out/$t.log" 2>&1
    echo "== $t: $(grep -E 'test result|panicked' "$out/$t.log" | head -3) ($((SECONDS - start)) s)"
    grep -A3 panicked "$out/$t.log" | head -6
  done
}
# Full-size training through gpu_bench_train.sh in what time is left (at most CAP seconds when
# set): name, stages, steps, [env...] (TORCH=0 leaves PyTorch out; TRAIN_SET overrides ours).
train_run() {
  local name=$1 stages=$2 steps=$3; shift 3
  local t=$(( $(left) - 20 )); [ -n "${CAP:-}" ] && [ $t -gt $CAP ] && t=$CAP
  [ $t -lt 60 ] && { echo "== $name: skipped, $(left) s left"; return; }
  echo "== $name ($((SECONDS - start)) s, $t s allowed)"
  # PyTorch's run gets the last 100 s, unless it is left out.
  local torch=100; [[ " $* " == *" TORCH=0 "* ]] && torch=5
  env "$@" OURS_TIMEOUT=$(( t - torch )) timeout $t bash model-import/scripts/gpu_bench_train.sh "$out/$name" "$stages" $steps
}
# Each train_run's losses of ours, a line per stage's metrics file (to set against another call's).
losses() {
  for f in $out/stage*/ours-stage*.metrics.jsonl; do
    python3 -c "import json,sys; print(sys.argv[1].split('/')[-1], [round(json.loads(l)['loss'], 4) for l in open(sys.argv[1])])" $f
  done
}
finish() {
  echo "total $((SECONDS - start)) s"
  tar czf "$final/$CALL-logs.tgz" -C "$out" .
}

# Shared by the GPU call scripts of model-import/results/*/ (sourced; GPU machine, repository root, `.dev` carried).
# Sets `out` (logs, archived into $OUT at the end by `finish`), the CUDA library path, the
# time left (`left`, against LIMIT, default 570 s of the call's 600), and unpacks the
# binaries named in BINARIES from .dev/<name>.xz to /tmp/<name> (a name may have a folder
# under .dev: `next/bench-generate` unpacks .dev/next/bench-generate.xz to /tmp/bench-generate).
set -uo pipefail
final=${OUT:-/tmp/out}; out=/tmp/$CALL; mkdir -p "$out" "$final"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
export CUBECL_AUTOTUNE_LEVEL=minimal PYTHONUNBUFFERED=1
[ -e /work/main ] || { mkdir -p /work && ln -s "$PWD" /work/main; }
start=$SECONDS; limit=${LIMIT:-570}
left() { echo $(( limit - (SECONDS - start) )); }
for b in $BINARIES; do
  xz -T4 -dc .dev/$b.xz > /tmp/${b##*/} && chmod +x /tmp/${b##*/} &
done
wait
# One test of the graph-decoder binary in a process of its own: test name, log name, timeout, [env...].
run_test() {
  local name=$1 log=$2 t=$3; shift 3
  env "$@" timeout $t /tmp/graph-decode-test --ignored --exact $name --nocapture > "$out/$log.log" 2>&1
  echo "== $log: $(grep -E 'test result|panicked|differ' "$out/$log.log" | head -3) ($((SECONDS - start)) s)"
}
# Graph-decoder tests, each in a process of its own with the default options, in what time is
# left (each gets it less 20 s; skipped under 40 s), with any failure's lines: names...
graph_tests() {
  local t
  for t in "$@"; do
    [ $(left) -lt 40 ] && { echo "== $t: skipped, $(left) s left"; continue; }
    run_test $t $t $(( $(left) - 20 ))
    grep -E "panicked|differ" -A3 "$out/$t.log" | head -6
  done
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
# One line of a bench log: its name, the step kernel's and the step's kernels' graph step (ms)
# and the greedy answers' digest.
stepms() { echo "$1 $(grep -o '"step_kernel_graph_ms":[^,}]*' $out/$1.jsonl) $(grep -o '"kernels_graph_ms":[^,}]*' $out/$1.jsonl) $(grep -o '"answers_fnv":[^,}]*' $out/$1.jsonl)"; }
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
# Every kernel of step 3 of each named stage, timed by Nsight Compute (gpu_kernel_profile.sh)
# into $out/profile, each in at most CAP s (default 130) while keeping RESERVE s (default 300)
# for what follows: stages...
stage_kernels() {
  local cap=${CAP:-130} reserve=${RESERVE:-300} stage t
  for stage in "$@"; do
    t=$(( $(left) - reserve )); [ $t -gt $cap ] && t=$cap
    [ $t -lt 60 ] && { echo "== profile stage $stage: skipped, $(left) s left"; continue; }
    echo "== stage $stage kernels ($((SECONDS - start)) s, $t s allowed)"
    timeout $t bash model-import/scripts/gpu_kernel_profile.sh "$out/profile" $stage 3-3 2>&1 | grep -v "^==PROF==" | head -45
    xz -9 "$out/profile/ncu-stage$stage.csv" 2>/dev/null
    rm -f /tmp/llava-jp
  done
}
# Where the flash kernels stall: one launch of each named kernel (forward, backward) at stage
# 1's shape on /tmp/attention-bench, Nsight Compute's warp states, occupancy, memory and
# per-SASS samples, each in at most CAP s (default 120) while keeping RESERVE s (default 30):
# kinds...
ncu_flash() {
  local cap=${CAP:-120} reserve=${RESERVE:-30} k t
  local ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  for k in "$@"; do
    t=$(( $(left) - reserve )); [ $t -gt $cap ] && t=$cap
    [ $t -lt 30 ] && { echo "== ncu $k: skipped"; continue; }
    timeout $t "$ncu" --kernel-name flash_attention_$k --launch-skip 4 --launch-count 1 --clock-control none \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SourceCounters \
      --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section InstructionStats --import-source no \
      -o "$out/ncu-$k" -f /tmp/attention-bench --shapes stage1 --flash-train-only --iters 3 > "$out/ncu-$k.log" 2>&1
    ncu_export "$ncu" ncu-$k "Registers Per|Issue Slots Busy|Compute \(SM\) Throughput|L1/TEX Hit|Shared"
  done
}
# An Nsight Compute report $out/NAME.ncu-rep (made with the SourceCounters section) as text:
# NAME.txt (every section), NAME-sass.csv.xz (per-SASS samples), and the main lines printed,
# with those matching EXTRA too: ncu-binary, name, [extra regex].
ncu_export() {
  local ncu=$1 name=$2 extra=${3:-}
  "$ncu" -i "$out/$name.ncu-rep" --page details --print-details all > "$out/$name.txt" 2>&1
  "$ncu" -i "$out/$name.ncu-rep" --page source --csv --print-source sass > "$out/$name-sass.csv" 2> "$out/$name-sass.err"
  xz -9 "$out/$name-sass.csv"
  echo "== $name ($((SECONDS - start)) s)"
  grep -E "Duration|Warp Cycles Per Issued|Achieved Occupancy|Stall|Memory Throughput|DRAM Throughput${extra:+|$extra}" "$out/$name.txt" | head -60
}
# Per bench log of this call ($out/*.jsonl): the graph step, tokens/s, the greedy answers'
# digest (and whether the runs agreed), and each decode kernel's time a step when launched one
# by one.
decode_summary() {
  echo "== summary"
  for f in $out/*.jsonl; do
    python3 - "$f" <<'PY'
import json, sys
name = sys.argv[1].split('/')[-1][:-6]
step, tps, ks, answers = None, [], "", []
for line in open(sys.argv[1]):
    try: r = json.loads(line)
    except Exception: continue
    if r.get('profile') == 'graph decode step':
        step = r.get('kernels_graph_ms')
        ks = " ".join(f"{k['kernel']}={k['ms']:.3f}" for k in r.get('kernels', []))
    if 'decode_tokens_per_s' in r: tps.append(round(r['decode_tokens_per_s'], 1))
    if 'answers_fnv' in r: answers.append(f"{r['answers_fnv']}{'' if r.get('runs_same_answers') else ' (runs differ)'}")
print(f"{name:18s} kernels_graph_ms={step} tokens/s={tps} answers={answers} | {ks}")
PY
  done
}
# A train_run of ours alone under the kernel timeline (kernel_timeline.c; .dev/cupti/ carries
# libkernel_timeline.so and libcupti.so.12.xz), then kernel_timeline.py's report of the steps
# asked for: name, stage, steps, first-last step reported, [env...].
timeline() {
  local name=$1 stage=$2 steps=$3 range=$4; shift 4
  mkdir -p /tmp/cupti
  [ -e /tmp/cupti/libcupti.so.12 ] || xz -dc .dev/cupti/libcupti.so.12.xz > /tmp/cupti/libcupti.so.12
  cp .dev/cupti/libkernel_timeline.so /tmp/cupti/
  # One CUPTI in the process: the product's stream search (src/cupti.rs) loads the same library.
  train_run $name $stage $steps TORCH=0 CUDA_INJECTION64_PATH=/tmp/cupti/libkernel_timeline.so \
    KERNEL_TIMELINE_OUT=$out/$name.tsv LD_LIBRARY_PATH=/tmp/cupti:$LD_LIBRARY_PATH LLAVA_JP_CUPTI=/tmp/cupti/libcupti.so.12 "$@"
  local f=$(ls -S $out/$name.tsv.* 2>/dev/null | head -1)
  [ -n "$f" ] || { echo "== $name: no timeline written"; return; }
  python3 model-import/scripts/kernel_timeline.py "$f" --steps $range --top 25 > "$out/$name-idle.txt"
  head -${TIMELINE_LINES:-20} "$out/$name-idle.txt"
  xz -T4 -6 "$f"
}
finish() {
  echo "total $((SECONDS - start)) s"
  tar czf "$final/$CALL-logs.tgz" -C "$out" .
}

#!/usr/bin/env bash
# Where a decode step's host time goes: cuda-gdb attached to the decode bench N times (a poor
# man's profiler; the machine has no perf/gdb), stacks of every thread, then counts.
set -u
export CUBECL_AUTOTUNE_LEVEL=minimal LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
gen=/tmp/bench-generate; [ -x $gen ] || { xz -dc .dev/bench-generate.xz > $gen; chmod +x $gen; }
gdb=$(ls /usr/local/cuda/bin/cuda-gdb-minimal 2>/dev/null || echo /usr/local/cuda/bin/cuda-gdb)
LLAVA_JP_GEMM=${GEMM:-cublaslt} timeout ${T:-400} $gen --config configs/llava-jp-1.3b-v1.0.json --batches 1 --text-tokens 48 --new-tokens ${NEW:-1500} --runs 1 --backends cuda --dtype bf16 > $OUT/gen.log 2>&1 &
sleep ${SETTLE:-40}
pid=$(pgrep -f "^/tmp/bench-generate" | head -1); echo "pid $pid"
mkdir -p /tmp/st
for i in $(seq 1 ${N:-25}); do
  timeout 30 $gdb -q -p $pid -batch -ex "set pagination off" -ex "thread apply all bt 30" > /tmp/st/s$i.txt 2>&1
  [ $i = 1 ] && head -c 3000 /tmp/st/s1.txt
done
kill $pid 2>/dev/null; wait
tar czf $OUT/stacks.tgz -C /tmp st
python3 - <<'PY'
import glob, re, collections
c = collections.Counter(); leaf = collections.Counter()
for f in glob.glob('/tmp/st/s*.txt'):
    for block in open(f, errors='replace').read().split('\nThread ')[1:]:
        name = block.split('\n')[0]
        frames = [re.sub(r'^#\d+\s+(0x[0-9a-f]+ in )?', '', l).split(' (')[0] for l in block.split('\n')[1:] if l.startswith('#')]
        if not frames: continue
        tname = re.search(r'"([^"]*)"', name); tname = tname.group(1) if tname else name[:30]
        leaf[(tname, frames[0][:80])] += 1
        for fr in set(frames[:30]): c[(tname, fr[:100])] += 1
print("== leaf frames"); [print(n, k) for k, n in leaf.most_common(40)]
print("== inclusive frames"); [print(n, k) for k, n in c.most_common(120)]
PY

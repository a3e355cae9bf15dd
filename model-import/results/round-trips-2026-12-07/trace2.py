# usage: trace2.py trace.jsonl: per phase, the tasks' wait on counters, their work after it, and
# of that work the time waiting for stages' data (mkdiag2.py's eighth field).
import collections, sys
names = {0: 'embed', 1: 'qkv', 2: 'attn', 3: 'proj', 4: 'fc', 5: 'mlp', 6: 'logits'}
seen, rows = collections.Counter(), collections.defaultdict(list)
for l in open(sys.argv[1]):
    if not l.startswith('TRACE ') or l.startswith('TRACE block'):
        continue
    b, i, k, layer, s, w, d, dw = map(int, l.split()[1:9])
    if i == 0:
        seen[b] += 1
    if seen[b] == 1:
        rows[b].append((k, layer, s, w, d, dw))
agg = collections.defaultdict(lambda: [0, 0, 0, 0])
for b in rows:
    for k, layer, s, w, d, dw in rows[b]:
        a = agg[k]; a[0] += 1; a[1] += w - s; a[2] += d - w; a[3] += dw
for k, (n, wt, wk, dw) in sorted(agg.items()):
    print(f"{names[k]:7s} {n:4d} tasks  wait {wt/n/1000:6.2f} us  work {wk/n/1000:6.2f} us  (of it, data {dw/n/1000:6.2f} us)")
b0 = rows[min(rows)]
qs = [s for k, layer, s, w, d, dw in b0 if k == 1]
if len(qs) > 1:
    print("per layer (block", min(rows), ")", round((qs[-1] - qs[0]) / 1000 / (len(qs) - 1), 2), "us")

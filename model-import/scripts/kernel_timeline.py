#!/usr/bin/env python3
"""Where a CUDA process's device sat idle, from `kernel_timeline.c`'s file.

Steps are cut at the end of each run of kernels whose name contains --boundary (the optimizer's,
`adamw_step` by default: a step then runs from one optimizer's end to the next's). For each
step: its length, the time some kernel / copy ran ("busy"), the time some kernel other than the
cuBLASLt ordering kernels ran ("work": their spinning counts as busy but does no work, so the
difference is what the ordering costs), and the idle gaps, summed by the kernel before and
after each, and by the step's tenths.

  usage: kernel_timeline.py timeline.tsv [--boundary adamw_step] [--cluster-ms 5] [--steps 3-8] [--top 25]
"""
import argparse
import collections
import sys

ORDERING = ("cublaslt_operands_ready", "cublaslt_wait_ready", "cublaslt_product_done", "cublaslt_set_done")


def read(path):
    items = []  # (start, end, stream, name)
    with open(path) as f:
        for line in f:
            p = line.rstrip("\n").split("\t")
            if len(p) < 4:
                continue
            kind, start, end, stream = p[0], int(p[1]), int(p[2]), int(p[3])
            if kind == "K":
                items.append((start, end, stream, p[4]))
            elif kind == "M":
                items.append((start, end, stream, f"memcpy[{p[5]}] {p[4]} B"))
            elif kind == "S":
                items.append((start, end, stream, f"memset {p[4]} B"))
    items.sort()
    return items


def short(name, width=60):
    return name if len(name) <= width else name[: width - 3] + "..."


def union_length(intervals):
    total, cur_s, cur_e = 0, None, None
    for s, e in intervals:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def gaps(items, min_ns, start):
    """Idle gaps of the union of `items` (sorted by start) from `start` on: (start, end, before,
    after), the step's start standing before its first item."""
    out, end, before = [], start, "(the optimizer before)"
    for s, e, _, name in items:
        if s - end >= min_ns:
            out.append((end, s, before, name))
        if e >= end:
            end, before = e, name
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("timeline")
    ap.add_argument("--boundary", default="adamw_step")
    ap.add_argument("--steps", default=None, help="first-last step (1-based) to report, e.g. 3-8")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--cluster-ms", type=float, default=5.0)
    ap.add_argument("--min-gap-us", type=float, default=1.0)
    a = ap.parse_args()
    items = read(a.timeline)
    if not items:
        sys.exit(f"{a.timeline}: no kernels")
    # Ends of the optimizer's runs: boundary kernels less than --cluster-ms apart are one run
    # (other kernels, the gradient clip's say, may come between them).
    ends, last = [], None
    for s, e, _, name in items:
        if a.boundary in name:
            if last is not None and s - last > a.cluster_ms * 1e6:
                ends.append(last)
            last = e if last is None else max(last, e)
    if last is not None:
        ends.append(last)
    steps = list(zip(ends, ends[1:]))
    print(f"{len(items)} records, {len(ends)} optimizer runs, {len(steps)} whole steps between them")
    lo, hi = 2, len(steps) + 1
    if a.steps:
        lo, hi = (int(x) for x in a.steps.split("-"))
    pairs = collections.Counter()
    pair_count = collections.Counter()
    work_pairs = collections.Counter()  # gaps between working kernels (ordering kernels not counted)
    tenths = [0.0] * 10
    kernel_time = collections.Counter()
    reported = 0
    for i, (t0, t1) in enumerate(steps, start=2):  # step i runs from optimizer i-1's end to i's
        if i < lo or i > hi:
            continue
        inside = [(max(s, t0), min(e, t1), st, n) for s, e, st, n in items if e > t0 and s < t1]
        wall = t1 - t0
        busy = union_length([(s, e) for s, e, _, _ in inside])
        work = union_length([(s, e) for s, e, _, n in inside if not n.startswith(ORDERING)])
        streams = collections.Counter(st for _, _, st, _ in inside)
        print(f"step {i}: {wall / 1e6:.2f} ms, busy {busy / 1e6:.2f} ms, work {work / 1e6:.2f} ms, "
              f"idle {(wall - busy) / 1e6:.2f} ms, ordering-only {(busy - work) / 1e6:.2f} ms, "
              f"{len(inside)} records on streams {dict(streams)}")
        for s, e, b, n in gaps(inside, int(a.min_gap_us * 1000), t0):
            key = (short(b), short(n))
            pairs[key] += e - s
            pair_count[key] += 1
            tenths[min(9, (s - t0) * 10 // wall)] += e - s
        work_items = [x for x in inside if not x[3].startswith(ORDERING)]
        for s, e, b, n in gaps(work_items, int(a.min_gap_us * 1000), t0):
            work_pairs[(short(b), short(n))] += e - s
        for s, e, _, n in inside:
            kernel_time[short(n, 80)] += e - s
        reported += 1
    if not reported:
        sys.exit("no step in the range asked")
    print(f"\nidle gaps >= {a.min_gap_us} us, ms a step, by the step's tenths:")
    print("  " + " ".join(f"{t / reported / 1e6:.2f}" for t in tenths))
    print(f"\nidle by (kernel before -> kernel after), ms a step (count a step), top {a.top}:")
    for (b, n), t in pairs.most_common(a.top):
        print(f"  {t / reported / 1e6:7.3f} {pair_count[(b, n)] / reported:7.1f}  {b} -> {n}")
    print(f"\ngaps between working kernels (the ordering kernels' time counted as idle), ms a step, top {a.top}:")
    for (b, n), t in work_pairs.most_common(a.top):
        print(f"  {t / reported / 1e6:7.3f}  {b} -> {n}")
    print(f"\nkernel time (sum over streams), ms a step, top {a.top}:")
    for n, t in kernel_time.most_common(a.top):
        print(f"  {t / reported / 1e6:7.3f}  {n}")


if __name__ == "__main__":
    main()

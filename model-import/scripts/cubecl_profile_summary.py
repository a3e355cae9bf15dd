"""Per-kernel breakdown of a cubecl profile log (`CUBECL_DEBUG_OPTION=profile-medium`, as
`gpu_bench_train.sh PROFILE=1` writes it): total time, launches and share per kernel name, the
largest first. Kernels outside cubecl (cuBLASLt) are not in it.

    python3 cubecl_profile_summary.py LOG[.xz] [--top 20]
"""
import argparse
import collections
import lzma
import re

UNITS = {"ns": 1e-9, "µs": 1e-6, "ms": 1e-3, "s": 1.0}
LINE = re.compile(r"\|\s*([\d.]+)(ns|µs|ms|s)\s*\|\s*(.*)$")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("log")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    opener = lzma.open if args.log.endswith(".xz") else open
    seconds, launches = collections.defaultdict(float), collections.Counter()
    with opener(args.log, "rt", encoding="utf-8") as f:
        for line in f:
            m = LINE.match(line)
            if not m:
                continue
            # The kernel's name is what precedes its runtime; its generic arguments are dropped.
            name = re.sub(r"\| CudaRuntime.*", "", m.group(3)).split("|")[0].strip()
            seconds[name] += float(m.group(1)) * UNITS[m.group(2)]
            launches[name] += 1
    total = sum(seconds.values())
    print(f"{total:.3f} s in {sum(launches.values())} launches")
    for name, s in sorted(seconds.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{s * 1e3:10.1f} ms {100 * s / total:5.1f}% {launches[name]:7d}  {name}")


if __name__ == "__main__":
    main()

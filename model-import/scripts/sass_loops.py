#!/usr/bin/env python3
"""The SASS of one kernel of one variant check_kernels.py compiles, on a machine without a GPU:
NVRTC to PTX, ptxas to a cubin, cuobjdump to SASS. It prints the kernel's instruction count,
its opcode mix, and each loop (a backward branch) with its size and its opcode mix, innermost
ones included. The H200's Nsight Compute found the flash forward issue-bound on integer work
(ALU the busiest pipe), so instructions in its loops are a cost read here before a GPU call.

    pip download nvidia-cuda-nvrtc-cu12 nvidia-cuda-nvcc-cu12 nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm --no-deps -d /tmp/whl
    (mkdir -p /tmp/cuda && cd /tmp/cuda && for w in /tmp/whl/*.whl; do python3 -m zipfile -e $w .; done; chmod +x */*/bin/* */*/*/bin/*)
    python3 model-import/scripts/sass_loops.py "flash D=128 bf16=1 mask=1 dropout=0" flash_attention_forward \\
      [--nvrtc .../libnvrtc.so.12] [--ptxas .../ptxas] [--cuobjdump .../cuobjdump] [--sass-out FILE]

The variant label is one check_kernels.py prints; KERNEL_SRC=DIR reads the sources from DIR.
"""
import argparse
import collections
import ctypes
import glob
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_kernels  # noqa: E402


def first(pattern):
    found = sorted(glob.glob(pattern))
    return found[0] if found else None


def opcode(text):
    """The opcode of a SASS line's instruction, without its predicate and modifiers."""
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("variant", help='a label check_kernels.py prints, e.g. "flash D=128 bf16=1 mask=1 dropout=0"')
    ap.add_argument("kernel", help="the entry point, e.g. flash_attention_forward")
    ap.add_argument("--nvrtc", default=os.environ.get("NVRTC") or first("/tmp/cuda/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"))
    ap.add_argument("--ptxas", default=first("/tmp/cuda/nvidia/cuda_nvcc/bin/ptxas"))
    ap.add_argument("--cuobjdump", default=first("/tmp/cuda/nvidia/*/bin/cuobjdump"))
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--sass-out", help="also write the kernel's SASS here")
    args = ap.parse_args()
    for what in ("nvrtc", "ptxas", "cuobjdump"):
        if not getattr(args, what):
            sys.exit(f"no {what}: pass --{what} (see this script's doc for the pip packages)")
    sources = dict(check_kernels.variants())
    if args.variant not in sources:
        sys.exit(f"no variant {args.variant!r}; check_kernels.py's labels include: {', '.join(list(sources)[:6])}, ...")
    lib = ctypes.CDLL(args.nvrtc)
    ptx, log = check_kernels.nvrtc_compile(lib, args.variant, sources[args.variant], "compute_" + args.arch[3:], [])
    if ptx is None:
        sys.exit(f"NVRTC failed on {args.variant}:\n{log}")
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "k.ptx"), "w") as f:
            f.write(ptx)
        subprocess.run([args.ptxas, f"-arch={args.arch}", f.name, "-o", os.path.join(tmp, "k.cubin")], check=True)
        # cuobjdump asks nvdisasm for the SASS: look for it beside cuobjdump and in the other packages.
        dirs = {os.path.dirname(args.cuobjdump)} | {os.path.dirname(p) for p in glob.glob(os.path.join(os.path.dirname(args.cuobjdump), "../../*/bin/nvdisasm"))}
        env = dict(os.environ, PATH=os.pathsep.join([*dirs, os.environ.get("PATH", "")]))
        out = subprocess.run([args.cuobjdump, "-sass", "-fun", args.kernel, os.path.join(tmp, "k.cubin")], capture_output=True, text=True, env=env)
    if out.returncode != 0 or "Function" not in out.stdout:
        sys.exit(f"cuobjdump gave no SASS for {args.kernel}: {out.stderr.strip()}")
    if args.sass_out:
        with open(args.sass_out, "w") as f:
            f.write(out.stdout)
    code = []
    for line in out.stdout.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            code.append((int(m.group(1), 16), m.group(2).strip()))
    if not code:
        sys.exit(f"no instructions for {args.kernel} (is nvdisasm on PATH?)")
    at = {address: i for i, (address, _) in enumerate(code)}
    mix = lambda part: " ".join(f"{k}:{v}" for k, v in collections.Counter(opcode(t) for _, t in part).most_common(12))
    print(f"{args.kernel}, {args.variant}, {args.arch}: {len(code)} instructions")
    print(f"  {mix(code)}")
    loops = []
    for i, (address, text) in enumerate(code):
        target = re.search(r"BRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address and int(target.group(1), 16) in at:
            loops.append((at[int(target.group(1), 16)], i))
    for start, end in sorted(loops):
        body = [c for c in code[start : end + 1] if not c[1].startswith(("NOP", "@!PT"))]
        print(f"loop {code[start][0]:#07x}-{code[end][0]:#07x}: {len(body):5d} instructions  {mix(body)}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Compiles every variant of the project's CUDA sources (src/*.cu) as the binary specialises
them at run time, with NVRTC, on a machine without a GPU: a kernel edit that does not compile is
found here instead of in a GPU session. With `--ptxas`, also assembles each variant for the
target and prints every kernel's registers, spills and static shared memory (ptxas -v), and
the blocks an SM can hold with them (and the dynamic shared memory the Rust side launches a
kernel with), naming the resource that limits it, for kernels whose block size the source
states (`__launch_bounds__`).

    pip download nvidia-cuda-nvrtc-cu12 nvidia-cuda-nvcc-cu12 --no-deps -d /tmp/whl
    (cd /tmp/cuda && for w in /tmp/whl/*.whl; do python3 -m zipfile -e $w .; done)
    NVRTC=/tmp/cuda/nvidia/cuda_nvrtc/lib/libnvrtc.so.12 \\
      python3 model-import/scripts/check_kernels.py [--ptxas /tmp/cuda/nvidia/cuda_nvcc/bin/ptxas] [--only flash]

NVRTC 12.x compiles what the GPU machine's 13.0 does for these sources (no headers, PTX only).
KERNEL_SRC=DIR reads the sources from DIR instead of src/ (to set a variant beside the current).
Exits 1 if any variant fails, printing NVRTC's log.
"""
import argparse
import ctypes
import itertools
import os
import re
import subprocess
import sys
import tempfile

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../src")


def read(name):
    with open(os.path.join(os.environ.get("KERNEL_SRC", SRC), name), encoding="utf-8") as f:
        return f.read()


def variants():
    """(label, source) for each specialisation the Rust side compiles."""
    # cuda_kernel::KernelSource: one `#define NAME code` in front; codes 0 f32, 1 bf16, 2 f16.
    fused_ops = read("fused_ops.cu")
    for code in range(9):  # CODE = ELEM + 3 * OTHER
        yield f"fused_ops CODE={code}", f"#define CODE {code}\n{fused_ops}"
    fused_optim = read("fused_optim.cu")
    for code in range(3):
        yield f"fused_optim GRAD_TYPE={code}", f"#define GRAD_TYPE {code}\n{fused_optim}"
    lce = read("linear_cross_entropy.cu")
    for code in range(3):
        yield f"linear_cross_entropy ELEM={code}", f"#define ELEM {code}\n{lce}"
    # flash::FlashTask::source, and the graph decoders' token-major prefill / vision variants.
    flash = read("flash_attention.cu")
    for d, bf16, mask, dropout in itertools.product((64, 128), (1, 0), (0, 1, 4), (0, 1)):
        defines = f"#define HEAD_DIM {d}\n#define IS_BF16 {bf16}\n#define MASK_BYTES {mask}\n#define DROPOUT {dropout}\n"
        yield f"flash D={d} bf16={bf16} mask={mask} dropout={dropout}", defines + flash
    for d, mask in ((128, 1), (64, 0)):
        defines = f"#define HEAD_DIM {d}\n#define IS_BF16 1\n#define MASK_BYTES {mask}\n#define DROPOUT 0\n#define OUT_TOKEN_MAJOR 1\n"
        yield f"flash token-major D={d} mask={mask}", defines + flash
    # graph_decode::Kernels::load: the decode step and the prefill's row kernels, one source.
    yield "graph_decode", read("graph_decode.cu") + "\n" + read("graph_prefill.cu")


def nvrtc_compile(lib, label, source, arch, options):
    prog = ctypes.c_void_p()
    check = lambda rc, what: rc == 0 or sys.exit(f"{label}: nvrtc {what} returned {rc}")
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{label}.cu".encode(), 0, None, None), "create")
    opts = [f"--gpu-architecture={arch}".encode()] + [o.encode() for o in options]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    ptx = None
    if rc == 0:
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, buf)
        ptx = buf.value.decode()
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx, log.value.decode(errors="replace").strip()


def ptxas_report(ptxas, ptx, sm):
    """Per kernel: (name, registers, spill stores, spill loads, static shared bytes)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run([ptxas, f"-arch={sm}", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    if out.returncode != 0:
        return None, out.stderr
    rows, name, spills = [], None, (0, 0)
    for line in out.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name, spills = m.group(1), (0, 0)
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            spills = (int(m.group(1)), int(m.group(2)))
        m = re.search(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?", line)
        if m and name:
            rows.append((name, int(m.group(1)), *spills, int(m.group(2) or 0)))
    return rows, None


# Per SM (sm_80: A100; sm_90: H100 / H200): registers, shared memory bytes, warps, blocks.
SM_LIMITS = {"sm_80": (65536, 167936, 64, 32), "sm_90": (65536, 233472, 64, 32)}


def dynamic_shared(ptx):
    """Per kernel, the dynamic shared memory it is launched with, as its source states it: a
    kernel that takes some exports `extern "C" __device__ unsigned int <entry>_dynamic_shared_bytes`
    (a global the PTX keeps with its value)."""
    return {k: int(v) for k, v in re.findall(r"\.u32 (\w+)_dynamic_shared_bytes = (\d+);", ptx)}


def occupancy(sm, threads, regs, shared):
    """Blocks an SM holds, and what limits it: registers are allotted per warp in 256s, each
    block's shared memory takes 1 KiB more for the driver."""
    max_regs, max_shared, max_warps, max_blocks = SM_LIMITS.get(sm, SM_LIMITS["sm_90"])
    warps = -(-threads // 32)
    per_warp = -(-regs * 32 // 256) * 256
    limits = {
        "registers": (max_regs // per_warp) // warps,
        "shared memory": max_shared // (shared + 1024) if shared else max_blocks,
        "warps": max_warps // warps,
        "blocks": max_blocks,
    }
    limit = min(limits, key=limits.get)
    return limits[limit], limit


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nvrtc", default=os.environ.get("NVRTC", "libnvrtc.so.12"))
    ap.add_argument("--arch", default="compute_90", help="NVRTC's virtual architecture (the H200: compute_90)")
    ap.add_argument("--ptxas", help="ptxas binary: report registers, spills and shared memory per kernel")
    ap.add_argument("--only", help="only variants whose label contains this")
    args = ap.parse_args()
    lib = ctypes.CDLL(args.nvrtc)
    failed = 0
    for label, source in variants():
        if args.only and args.only not in label:
            continue
        options = ["-DGRAPH_DECODE_PDL=1"] if label == "graph_decode" else []
        ptx, log = nvrtc_compile(lib, label, source, args.arch, options)
        if ptx is None:
            failed += 1
            print(f"FAILED {label}\n{log}\n")
            continue
        print(f"ok     {label}" + (f"  ({log.count('warning')} warnings)" if "warning" in log else ""))
        if args.ptxas:
            rows, err = ptxas_report(args.ptxas, ptx, args.arch.replace("compute", "sm"))
            if rows is None:
                failed += 1
                print(f"FAILED ptxas {label}\n{err}")
                continue
            bounds = dict((k, int(t)) for t, k in re.findall(r"__launch_bounds__\((\d+)[^)]*\)\s+(\w+)\(", source))
            sm = args.arch.replace("compute", "sm")
            dynamic_of = dynamic_shared(ptx)
            for name, regs, spill_st, spill_ld, smem in rows:
                flag = "  SPILLS" if spill_st or spill_ld else ""
                dynamic = dynamic_of.get(name, 0)
                fit = ""
                if name in bounds:
                    blocks, limit = occupancy(sm, bounds[name], regs, smem + dynamic)
                    fit = f"  {blocks:2d} blocks/SM of {bounds[name]} ({limit})"
                shared = f"{smem:6d}" + (f"+{dynamic}" if dynamic else "")
                print(f"         {name:44s} {regs:4d} regs  {spill_st:5d}/{spill_ld:<5d} B spilled  {shared:>12s} B smem{fit}{flag}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

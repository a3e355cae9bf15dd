"""Holds all but LEAVE GiB of the GPU's free memory until killed, so that a run started beside
it sees a card of LEAVE GiB (its own CUDA context included): how `gpu_bench_train.sh` shows
whether a run fits a 24 GB card on an H200.

usage: python3 gpu_ballast.py LEAVE_GIB READY_FILE
"""
import sys
import time

import torch

leave_gib, ready = float(sys.argv[1]), sys.argv[2]
free, total = torch.cuda.mem_get_info()
take = free - int(leave_gib * 2**30)
if take <= 0:
    sys.exit(f"ballast: only {free / 2**30:.2f} GiB free, cannot leave {leave_gib} GiB")
held = torch.empty(take, dtype=torch.uint8, device="cuda")
free_after, _ = torch.cuda.mem_get_info()
print(f"ballast: holding {take / 2**30:.2f} GiB of {total / 2**30:.1f}; {free_after / 2**30:.2f} GiB free", flush=True)
open(ready, "w").close()
while True:
    time.sleep(3600)

#!/usr/bin/env python3
"""The index arithmetic of gemv_rows (src/graph_decode.cu with rows.patch applied: RowsShape and the kernel's loops), in
Python: for many widths, rows, block sizes, loads in flight and grids, every weight (n, k) is
read exactly once and every output row written exactly once, by the team that summed it.
Run: python3 model-import/results/decode-anatomy-2026-12-06/rows_indexing_check.py"""
def floor_pow2(v): return 1 if v < 2 else 2*floor_pow2(v//2)
def shape(K, THREADS, LOADS):
    VEC = 8 if K % 8 == 0 else 1
    C = K // VEC
    TEAM = THREADS if C >= THREADS else floor_pow2(C)
    TEAMS = THREADS // TEAM
    I = (C + TEAM - 1) // TEAM
    U = 1 if I >= LOADS else LOADS // I
    return VEC, C, TEAM, TEAMS, I, U, TEAMS*U
def run(K, N, THREADS, LOADS, slots):
    VEC, C, TEAM, TEAMS, I, U, BATCH = shape(K, THREADS, LOADS)
    rows = max(1, -(-N // slots)); blocks = -(-N // rows)
    cover = {}
    written = {}
    for b in range(blocks):
        r0 = b*rows; r1 = min(r0+rows, N)
        base = r0
        while base < r1:
            for t in range(THREADS):
                team, member = t // TEAM, t % TEAM
                for u in range(U):
                    n = base + team + TEAMS*u
                    for i in range(I):
                        c = member + TEAM*i
                        if n < r1 and c < C:
                            for e in range(VEC):
                                key = (n, c*VEC+e); cover[key] = cover.get(key, 0) + 1
                    if member == 0 and n < r1:
                        written[n] = written.get(n, 0) + 1
            base += BATCH
    assert all(v == 1 for v in cover.values()) and len(cover) == N*K, (K, N, "cover")
    assert len(written) == N and all(v == 1 for v in written.values()), (K, N, "written")
    assert TEAM <= 32 or TEAM % 32 == 0
    return blocks, rows
for K, N in [(2,6),(2,2),(8,2),(13,39),(52,13),(32,96),(128,32),(72,216),(288,72),(256,768),(1024,256),(96,288),(384,96)]:
    for THREADS in (256, 1024, 512):
        for LOADS in (8, 4):
            for slots in (1, 7, 528, 132):
                run(K, N, THREADS, LOADS, slots)
print("small ok")

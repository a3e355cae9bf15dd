#!/usr/bin/env python3
"""Emulates `flash_attention_backward` (src/flash_attention.cu, the fused flash backward) on the
CPU, for checking the kernel's fragment arithmetic where no GPU is lent: ldmatrix (plain and
transposed) and mma.m16n8k16 follow the PTX ISA's fragment layouts, and the kernel's own index
expressions (shared tiles' rows and columns, dS^T's stores and transposed loads, the dQ column
parts, the atomics' rows) are written as the kernel has them, warp by warp between its barriers.
One (batch, head), no dropout, masks from the bounds and optionally causal; the gradients are
compared with numpy's attention backward (bf16 operands; tolerance 2e-2 of the largest value).
It must change with the kernel. Swapping the dS^T loads' matrix order, or storing dS^T's row
g + 8 as a column offset, makes it fail (dq).

    pip install numpy && python3 model-import/scripts/emulate_flash_backward.py
"""
import numpy as np
rng = np.random.default_rng(0)
D, TILE = 32, 64  # D is set again per case in __main__
ROW, DS_ROW, MASK_ROW = D + 8, TILE + 8, TILE + 16
def bf16(x):
    x = np.asarray(x, np.float32); b = x.view(np.uint32).astype(np.uint64)
    b = ((b + 0x7fff + ((b >> 16) & 1)) >> 16) << 16
    return b.astype(np.uint32).view(np.float32)

def ldmatrix_x4(mem, addrs, trans=False):
    """addrs[lane]: flat index of row (lane%8) of matrix lane//8. Returns regs[lane][m] = (lo, hi)."""
    out = np.zeros((32, 4, 2), np.float32)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for m in range(4):
            if not trans:
                row = addrs[8 * m + g]
                out[lane, m] = mem[row + 2 * t], mem[row + 2 * t + 1]
            else:
                out[lane, m] = mem[addrs[8 * m + 2 * t] + g], mem[addrs[8 * m + 2 * t + 1] + g]
    return out

def mma(c, a, b):
    """c[lane][4] += A(16x16) B(16x8); a[lane][4 regs][2], b[lane][2 regs][2]."""
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        A[g, 2*t:2*t+2] = a[lane, 0]; A[g+8, 2*t:2*t+2] = a[lane, 1]
        A[g, 2*t+8:2*t+10] = a[lane, 2]; A[g+8, 2*t+8:2*t+10] = a[lane, 3]
        B[2*t:2*t+2, g] = b[lane, 0]; B[2*t+8:2*t+10, g] = b[lane, 1]
    C = A @ B
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        c[lane] += [C[g, 2*t], C[g, 2*t+1], C[g+8, 2*t], C[g+8, 2*t+1]]

def shared_times_tile_transposed(COLS, a_tile_mem, a_off, mem, off):
    s = np.zeros((32, COLS, 4))
    a_addr = [a_off + (((l >> 3) & 1) * 8 + (l & 7)) * ROW + ((l >> 3) >> 1) * 8 for l in range(32)]
    b_addr = [off + (((l >> 3) >> 1) * 8 + (l & 7)) * ROW + ((l >> 3) & 1) * 8 for l in range(32)]
    for c in range(D // 16):
        af = ldmatrix_x4(a_tile_mem, [x + c * 16 for x in a_addr])
        for n in range(0, COLS, 2):
            bf = ldmatrix_x4(mem, [x + n * 8 * ROW + c * 16 for x in b_addr])
            mma(s[:, n], af, bf[:, 0:2]); mma(s[:, n + 1], af, bf[:, 2:4])
    return s

def pack(lo, hi): return np.stack([bf16(lo), bf16(hi)], -1)

def times_tile_rows(CHUNKS, acc, a, mem, off):
    for kk in range(CHUNKS):
        af = np.stack([pack(a[:, 2*kk, 0], a[:, 2*kk, 1]), pack(a[:, 2*kk, 2], a[:, 2*kk, 3]),
                       pack(a[:, 2*kk+1, 0], a[:, 2*kk+1, 1]), pack(a[:, 2*kk+1, 2], a[:, 2*kk+1, 3])], 1)
        at = [off + (kk * 16 + ((l >> 3) & 1) * 8 + (l & 7)) * ROW + ((l >> 3) >> 1) * 8 for l in range(32)]
        for n in range(0, D // 8, 2):
            bf = ldmatrix_x4(mem, [x + n * 8 for x in at], trans=True)
            mma(acc[:, n], af, bf[:, 0:2]); mma(acc[:, n + 1], af, bf[:, 2:4])

def run(Tq, Tk, causal, DKDV_QUERIES=16):
    q, k, v, do = (bf16(rng.standard_normal((T, D))) for T in (Tq, Tk, Tk, Tq))
    scale = 1 / np.sqrt(D)
    hidden = lambda r, c: r >= Tq or c >= Tk or (causal and c > r)
    # reference
    S = q @ k.T * scale
    M = np.array([[hidden(r, c) for c in range(Tk)] for r in range(Tq)])
    S[M] = -np.inf
    P = np.exp(S - S.max(1, keepdims=True)); P /= P.sum(1, keepdims=True)
    O = P @ v
    lse2 = np.log2(np.exp(S - S.max(1, keepdims=True)).sum(1)) + S.max(1) * np.log2(np.e)
    delta = (do * bf16(O)).sum(1)
    dP = do @ v.T; dS = P * (dP - delta[:, None])
    want_dv, want_dk, want_dq = P.T @ do, dS.T @ q * scale, dS @ k * scale
    dq_acc = np.zeros((Tq, D)); dk = np.zeros((Tk, D)); dv = np.zeros((Tk, D))
    scale_log2e = scale * np.log2(np.e)
    for kb in range(0, Tk, TILE):
        k_tile = np.zeros(TILE * ROW); v_tile = np.zeros(TILE * ROW)
        for r in range(TILE):
            if kb + r < Tk: k_tile[r*ROW:r*ROW+D] = k[kb + r]; v_tile[r*ROW:r*ROW+D] = v[kb + r]
        dk_acc = np.zeros((4, 32, D // 8, 4)); dv_acc = np.zeros((4, 32, D // 8, 4))
        for r0 in range(0, Tq, TILE):
            mask = np.array([[hidden(r0 + r, kb + c) for c in range(TILE)] for r in range(TILE)])
            if mask.all(): continue
            q_tile = np.zeros(TILE * ROW); do_tile = np.zeros(TILE * ROW); ds_tile = np.zeros(TILE * DS_ROW)
            lse_tile = np.full(TILE, -np.inf); delta_tile = np.zeros(TILE)
            for r in range(TILE):
                if r0 + r < Tq:
                    q_tile[r*ROW:r*ROW+D] = q[r0 + r]; do_tile[r*ROW:r*ROW+D] = do[r0 + r]
                    lse_tile[r] = lse2[r0 + r]; delta_tile[r] = delta[r0 + r]
            for warp in range(4):
                for c0 in range(0, TILE, DKDV_QUERIES):
                    C8 = DKDV_QUERIES // 8
                    s = shared_times_tile_transposed(C8, k_tile, warp * 16 * ROW, q_tile, c0 * ROW)
                    dp = shared_times_tile_transposed(C8, v_tile, warp * 16 * ROW, do_tile, c0 * ROW)
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        for n in range(C8):
                            for e in range(4):
                                qi = c0 + n * 8 + 2 * t + (e & 1); ki = warp * 16 + g + (e >> 1) * 8
                                l2 = lse_tile[qi]
                                pe = 0.0 if (mask[qi, ki] or l2 == -np.inf) else 2.0 ** (s[lane, n, e] * scale_log2e - l2)
                                s[lane, n, e] = pe
                                dp[lane, n, e] = pe * (dp[lane, n, e] - delta_tile[qi])
                    times_tile_rows(DKDV_QUERIES // 16, dv_acc[warp], s, do_tile, c0 * ROW)
                    times_tile_rows(DKDV_QUERIES // 16, dk_acc[warp], dp, q_tile, c0 * ROW)
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        for n in range(C8):
                            at = (warp * 16 + g) * DS_ROW + c0 + n * 8 + 2 * t
                            ds_tile[at:at+2] = bf16(dp[lane, n, 0:2])
                            ds_tile[at + 8 * DS_ROW: at + 8 * DS_ROW + 2] = bf16(dp[lane, n, 2:4])
            # dQ phase
            DQ_PARTS = 2 if (D // 16) % 2 == 0 else 1
            COLS = D // DQ_PARTS
            for warp in range(4):
                for part in range(DQ_PARTS):
                    acc = np.zeros((32, COLS // 8, 4))
                    for kk in range(TILE // 16):
                        a_addr = [(kk * 16 + ((l >> 3) >> 1) * 8 + (l & 7)) * DS_ROW + warp * 16 + ((l >> 3) & 1) * 8 for l in range(32)]
                        af = ldmatrix_x4(ds_tile, a_addr, trans=True)
                        at = [(kk * 16 + ((l >> 3) & 1) * 8 + (l & 7)) * ROW + part * COLS + ((l >> 3) >> 1) * 8 for l in range(32)]
                        for n in range(0, COLS // 8, 2):
                            bf = ldmatrix_x4(k_tile, [x + n * 8 for x in at], trans=True)
                            mma(acc[:, n], af, bf[:, 0:2]); mma(acc[:, n + 1], af, bf[:, 2:4])
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        query = r0 + warp * 16 + g
                        for r in range(2):
                            if query + r * 8 >= Tq: continue
                            for n in range(COLS // 8):
                                col = part * COLS + 2 * t + n * 8
                                dq_acc[query + r * 8, col:col+2] += acc[lane, n, 2*r:2*r+2]
        for warp in range(4):
            for lane in range(32):
                g, t = lane >> 2, lane & 3
                for r in range(2):
                    key = kb + warp * 16 + g + 8 * r
                    if key >= Tk: continue
                    for n in range(D // 8):
                        col = n * 8 + 2 * t
                        dv[key, col:col+2] = dv_acc[warp, lane, n, 2*r:2*r+2]
                        dk[key, col:col+2] = dk_acc[warp, lane, n, 2*r:2*r+2] * scale
    dq = dq_acc * scale
    for name, got, want in (("dq", dq, want_dq), ("dk", dk, want_dk), ("dv", dv, want_dv)):
        err = np.abs(got - want).max() / np.abs(want).max()
        print(f"D={D} Tq={Tq} Tk={Tk} causal={causal}: {name} max rel err {err:.2e}")
        assert err < 2e-2, name

if __name__ == "__main__":
    # Two query tiles against two key blocks, edges inside tiles; a head width of 32 (dQ in two
    # column parts) and of 48 (one part: an odd number of 16-wide fragments).
    for D in (32, 48):
        ROW = D + 8
        run(100, 100, True)
        run(70, 130, False)

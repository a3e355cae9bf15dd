// Flash attention (FlashAttention-2's scheme) for bf16 / f16 on NVIDIA tensor cores
// (mma.sync m16n8k16, sm_80+), compiled at run time by NVRTC through cubecl and launched on
// cubecl's own stream by `src/flash.rs`, which prepends:
//   HEAD_DIM    the head width, a multiple of 16 up to 128
//   IS_BF16     1 for bf16 operands, 0 for f16
//   MASK_BYTES  0 (no mask), 1 (burn's u8 bools) or 4 (u32 bools)
// No CUDA headers: operands are raw 16-bit words, conversions are PTX.
//
// Forward: one block of four warps takes 64 queries of one (batch, head); each warp keeps 16
// query rows in registers and walks the keys 64 at a time through shared memory, keeping a
// running row maximum and sum (online softmax) so the [queries, keys] scores never reach global
// memory; it also writes each row's log-sum-exp for the backward pass.
// Backward: the scores are recomputed from that log-sum-exp, twice: once per block of 64 keys
// (dK, dV, walking the queries) and once per block of 64 queries (dQ, walking the keys), so
// that no gradient needs atomics or a zeroed accumulator.
// Scores, sums and gradients accumulate in f32; probabilities and score gradients are rounded
// to the operand type for the products that follow, as PyTorch's flash kernels do.
//
// mma fragments (PTX ISA, m16n8k16 with 16-bit operands), with g = lane / 4, t = lane % 4:
//   A (16x16, row-major): reg 0 (g, 2t..2t+1), 1 (g+8, 2t..), 2 (g, 2t+8..), 3 (g+8, 2t+8..)
//   B (16x8, by column):  reg 0 (k 2t..2t+1, n g), 1 (k 2t+8..2t+9, n g)
//   C (16x8, f32):        0, 1 (g, 2t..2t+1), 2, 3 (g+8, 2t..2t+1)
// so a C fragment pair of two adjacent 8-wide tiles is, packed, the A fragment of 16 columns.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned char u8;
typedef long long i64;

// Kernel parameters, passed by value (cubecl hands its info words to the kernel as one
// grid-constant argument): all 64-bit, in the order `src/flash.rs` writes them.
struct __align__(8) Params {
    i64 batch, heads, queries, keys;
    i64 q_stride[4];     // elements, over [batch, head, position, dim]
    i64 k_stride[4];
    i64 v_stride[4];
    i64 mask_stride[4];  // [batch, head, query, key]; unused without a mask
    i64 do_stride[4];    // the output's gradient (backward only)
    i64 scale_log2e;     // f32 bits: the softmax scale times log2(e), for exp2
    i64 scale;           // f32 bits: the softmax scale
};

#define D HEAD_DIM
#define TILE 64
// Shared rows padded by 8 elements so the fragment loads of a warp spread over the banks.
#define ROW (D + 8)
#define NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ u32 pack(float lo, float hi) {
    u32 r;
#if IS_BF16
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

__device__ __forceinline__ u16 round_one(float x) {
    u16 r;
#if IS_BF16
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
#endif
    return r;
}

// c += a · b over a 16x16 (row-major) times 16x8 (by column) tile, f32 accumulators.
__device__ __forceinline__ void mma(float* c, const u32* a, const u32* b) {
#if IS_BF16
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
#endif
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ u32 pair(u16 lo, u16 hi) {
    return (u32)lo | ((u32)hi << 16);
}

__device__ __forceinline__ float f32_of(i64 bits) {
    return __int_as_float((int)bits);
}

// Sixteen bytes, for vector loads and stores.
struct __align__(16) Vec16 {
    u32 x, y, z, w;
};

// Rows `first + 0..TILE` of one (batch, head) slice into a padded shared tile; rows past `count`
// are zero (a zero row adds nothing to any product, and a zero V row keeps NaN garbage out).
// Rows whose dimensions lie contiguous and 16-byte aligned move 8 elements per load.
__device__ __forceinline__ void load_tile(u16* tile, const u16* base, const i64* stride, i64 first, i64 count) {
    const bool vector = stride[3] == 1 && (stride[2] & 7) == 0 && (((unsigned long long)base) & 15) == 0;
    if (vector) {
        for (int i = threadIdx.x; i < TILE * D / 8; i += blockDim.x) {
            const int r = i / (D / 8), c = (i % (D / 8)) * 8;
            const i64 row = first + r;
            Vec16 value = {0, 0, 0, 0};
            if (row < count) value = *(const Vec16*)(base + row * stride[2] + c);
            *(Vec16*)(tile + r * ROW + c) = value;
        }
        return;
    }
    for (int i = threadIdx.x; i < TILE * D; i += blockDim.x) {
        const int r = i / D, c = i % D;
        const i64 row = first + r;
        tile[r * ROW + c] = row < count ? base[row * stride[2] + c * stride[3]] : (u16)0;
    }
}

// Rows `rows[0]`, `rows[1]` (g and g+8 of a warp's 16) of a slice as A fragments, one per 16
// dimensions, straight from global memory; rows past `count` are zero.
__device__ __forceinline__ void load_a(u32 (*frag)[4], const u16* base, const i64* stride, const i64* rows, i64 count) {
    const int t = (threadIdx.x & 31) & 3;
#pragma unroll
    for (int c = 0; c < D / 16; ++c) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const i64 row = rows[r & 1];
            const int col = c * 16 + (r >> 1) * 8 + 2 * t;
            u16 lo = 0, hi = 0;
            if (row < count) {
                const u16* at = base + row * stride[2];
                lo = at[col * stride[3]];
                hi = at[(col + 1) * stride[3]];
            }
            frag[c][r] = pair(lo, hi);
        }
    }
}

// Whether query `row` may not see key `key`: past the end, or masked. `mask_bh` is the mask of
// this block's (batch, head) (see `mask_of`).
__device__ __forceinline__ bool hidden(const u8* mask_bh, const Params& p, i64 row, i64 key) {
    if (key >= p.keys || row >= p.queries) return true;
#if MASK_BYTES
    const i64 at = row * p.mask_stride[2] + key * p.mask_stride[3];
#if MASK_BYTES == 1
    return mask_bh[at] != 0;
#else
    return ((const u32*)mask_bh)[at] != 0;
#endif
#else
    return false;
#endif
}

__device__ __forceinline__ const u8* mask_of(const u8* mask, const Params& p, i64 b, i64 h) {
#if MASK_BYTES
    return mask + (b * p.mask_stride[0] + h * p.mask_stride[1]) * MASK_BYTES;
#else
    return mask;
#endif
}

// acc[n] (16 rows x 8 columns each) += a (16 x 16 * CHUNKS) · tile (16 * CHUNKS rows x D of a
// shared tile, read down its rows): the `p v` shape, `a` given as C fragments of 2 * CHUNKS
// 8-wide tiles.
template <int CHUNKS>
__device__ __forceinline__ void times_tile_rows(float (*acc)[4], float (*a)[4], const u16* tile) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int kk = 0; kk < CHUNKS; ++kk) {
        const u32 af[4] = {pack(a[2 * kk][0], a[2 * kk][1]), pack(a[2 * kk][2], a[2 * kk][3]),
                           pack(a[2 * kk + 1][0], a[2 * kk + 1][1]), pack(a[2 * kk + 1][2], a[2 * kk + 1][3])};
        const u16* r0 = tile + (kk * 16 + 2 * t) * ROW;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            const int col = n * 8 + g;
            const u32 bf[2] = {pair(r0[col], r0[ROW + col]), pair(r0[8 * ROW + col], r0[9 * ROW + col])};
            mma(acc[n], af, bf);
        }
    }
}

// s[n] (16 x 8 each, COLS of them) = a (16 x D, A fragments) · tileᵀ over the tile's first
// 8 * COLS rows: the `q kᵀ` shape.
template <int COLS>
__device__ __forceinline__ void times_tile_transposed(float (*s)[4], u32 (*a)[4], const u16* tile) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int n = 0; n < COLS; ++n) {
        s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
        for (int c = 0; c < D / 16; ++c) {
            const u16* kr = tile + (n * 8 + g) * ROW + c * 16 + 2 * t;
            const u32 bf[2] = {*(const u32*)kr, *(const u32*)(kr + 8)};
            mma(s[n], a[c], bf);
        }
    }
}

// Writes 16 rows (`rows`) x D of f32 C fragments, times `factor`, into a contiguous
// [batch * heads, count, D] output.
__device__ __forceinline__ void store_rows(u16* out, i64 bh, i64 count, const i64* rows, float (*acc)[4], float factor) {
    const int t = (threadIdx.x & 31) & 3;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (rows[r] >= count) continue;
        u16* at = out + (bh * count + rows[r]) * D;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            const int col = n * 8 + 2 * t;
            at[col] = round_one(acc[n][2 * r] * factor);
            at[col + 1] = round_one(acc[n][2 * r + 1] * factor);
        }
    }
}

extern "C" __global__ void __launch_bounds__(128) flash_attention_forward(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    const u8* __restrict__ mask, u16* __restrict__ out, float* __restrict__ lse,
    const __grid_constant__ Params p) {
    __shared__ __align__(16) u16 k_tile[TILE * ROW];
    __shared__ __align__(16) u16 v_tile[TILE * ROW];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const i64 bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
    const u8* mask_bh = mask_of(mask, p, b, h);
    const i64 q0 = (i64)blockIdx.x * TILE + warp * 16;  // this warp's first query
    const i64 rows[2] = {q0 + g, q0 + g + 8};
    const float scale = f32_of(p.scale_log2e);
    const u16* kb = k + b * p.k_stride[0] + h * p.k_stride[1];
    const u16* vb = v + b * p.v_stride[0] + h * p.v_stride[1];

    u32 qa[D / 16][4];
    load_a(qa, q + b * p.q_stride[0] + h * p.q_stride[1], p.q_stride, rows, p.queries);

    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float row_max[2] = {NEG_INF, NEG_INF};
    float row_sum[2] = {0.f, 0.f};  // this lane's share; the quad's shares are added at the end

    for (i64 k0 = 0; k0 < p.keys; k0 += TILE) {
        __syncthreads();  // the previous tiles are no longer read
        load_tile(k_tile, kb, p.k_stride, k0, p.keys);
        load_tile(v_tile, vb, p.v_stride, k0, p.keys);
        __syncthreads();

        float s[TILE / 8][4];
        times_tile_transposed<TILE / 8>(s, qa, k_tile);

        // Scale, mask, and the running maximum of each of this lane's two rows.
        float tile_max[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int n = 0; n < TILE / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const i64 key = k0 + n * 8 + 2 * t + (e & 1);
                const float x = hidden(mask_bh, p, rows[e >> 1], key) ? NEG_INF : s[n][e] * scale;
                s[n][e] = x;
                tile_max[e >> 1] = fmaxf(tile_max[e >> 1], x);
            }
        }
        float alpha[2], shift[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float m = tile_max[r];
            m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 1));
            m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 2));
            const float next = fmaxf(row_max[r], m);
            // A row with every key hidden so far has max -inf: shift by 0 so that exp2 gives
            // 0 here, not NaN.
            shift[r] = next == NEG_INF ? 0.f : next;
            alpha[r] = exp2f(row_max[r] - shift[r]);
            row_max[r] = next;
            row_sum[r] *= alpha[r];
        }
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            o[n][0] *= alpha[0];
            o[n][1] *= alpha[0];
            o[n][2] *= alpha[1];
            o[n][3] *= alpha[1];
        }
#pragma unroll
        for (int n = 0; n < TILE / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float pe = exp2f(s[n][e] - shift[e >> 1]);
                s[n][e] = pe;
                row_sum[e >> 1] += pe;
            }
        }
        times_tile_rows<TILE / 16>(o, s, v_tile);
    }

    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float sum = row_sum[r];
        sum += __shfl_xor_sync(0xffffffff, sum, 1);
        sum += __shfl_xor_sync(0xffffffff, sum, 2);
        // A row that sees no key at all gets 0 (as burn's attention gives), not 0/0; its delta
        // is then 0 and no NaN reaches the backward.
        inv[r] = sum > 0.f ? 1.f / sum : 0.f;
        // The row's log-sum-exp in the scaled base-2 domain, for the backward pass.
        if (rows[r] < p.queries && t == 0) lse[bh * p.queries + rows[r]] = sum > 0.f ? row_max[r] + log2f(sum) : NEG_INF;
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        o[n][0] *= inv[0];
        o[n][1] *= inv[0];
        o[n][2] *= inv[1];
        o[n][3] *= inv[1];
    }
    store_rows(out, bh, p.queries, rows, o, 1.f);
}

// The probabilities and score gradients of one 16 x TILE tile, in place: `s` holds scores
// (q kᵀ) and `dp` holds dO vᵀ, both as C fragments; on return `s` holds P and `dp` holds
// dS = P (dP - delta) (before the softmax scale), over COLS 8-wide tiles. ROW_OF / COL_OF give
// the query and key of entry e of tile n, LSE2_OF and DELTA_OF that query's values.
#define PROBABILITIES_AND_GRADIENTS(COLS, ROW_OF, COL_OF, LSE2_OF, DELTA_OF)                    \
    _Pragma("unroll") for (int n = 0; n < COLS; ++n) {                                         \
        _Pragma("unroll") for (int e = 0; e < 4; ++e) {                                        \
            const i64 query = ROW_OF, key = COL_OF;                                             \
            const float l2 = LSE2_OF;                                                           \
            const float pe = (hidden(mask_bh, p, query, key) || l2 == NEG_INF)                        \
                                 ? 0.f : exp2f(s[n][e] * scale_log2e - l2);                     \
            s[n][e] = pe;                                                                       \
            dp[n][e] = pe * (dp[n][e] - (DELTA_OF));                                           \
        }                                                                                       \
    }

// dQ: one block per 64 queries, walking the keys. `lse` and `delta` (rowsum(dO * O)) are f32
// [batch * heads, queries]; `dq` is a contiguous [batch, heads, queries, D].
extern "C" __global__ void __launch_bounds__(128) flash_attention_backward_dq(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    const u8* __restrict__ mask, const u16* __restrict__ dout, const float* __restrict__ lse,
    const float* __restrict__ delta, u16* __restrict__ dq, const __grid_constant__ Params p) {
    __shared__ __align__(16) u16 k_tile[TILE * ROW];
    __shared__ __align__(16) u16 v_tile[TILE * ROW];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const i64 bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
    const u8* mask_bh = mask_of(mask, p, b, h);
    const i64 q0 = (i64)blockIdx.x * TILE + warp * 16;
    const i64 rows[2] = {q0 + g, q0 + g + 8};
    const float scale_log2e = f32_of(p.scale_log2e);
    const u16* kb = k + b * p.k_stride[0] + h * p.k_stride[1];
    const u16* vb = v + b * p.v_stride[0] + h * p.v_stride[1];

    u32 qa[D / 16][4], da[D / 16][4];
    load_a(qa, q + b * p.q_stride[0] + h * p.q_stride[1], p.q_stride, rows, p.queries);
    load_a(da, dout + b * p.do_stride[0] + h * p.do_stride[1], p.do_stride, rows, p.queries);
    float row_lse[2], row_delta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const bool in = rows[r] < p.queries;
        row_lse[r] = in ? lse[bh * p.queries + rows[r]] : NEG_INF;
        row_delta[r] = in ? delta[bh * p.queries + rows[r]] : 0.f;
    }

    float acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

    for (i64 k0 = 0; k0 < p.keys; k0 += TILE) {
        __syncthreads();
        load_tile(k_tile, kb, p.k_stride, k0, p.keys);
        load_tile(v_tile, vb, p.v_stride, k0, p.keys);
        __syncthreads();

        float s[TILE / 8][4], dp[TILE / 8][4];
        times_tile_transposed<TILE / 8>(s, qa, k_tile);
        times_tile_transposed<TILE / 8>(dp, da, v_tile);
        PROBABILITIES_AND_GRADIENTS(TILE / 8, rows[e >> 1], k0 + n * 8 + 2 * t + (e & 1), row_lse[e >> 1], row_delta[e >> 1])
        times_tile_rows<TILE / 16>(acc, dp, k_tile);  // dQ += dS k
    }
    store_rows(dq, bh, p.queries, rows, acc, f32_of(p.scale));
}

// dK and dV: one block per 64 keys, walking the queries. Each warp keeps 16 keys (and their
// values) as A fragments and computes the transposed tiles: sᵀ = k qᵀ, dPᵀ = v dOᵀ, then
// dV += Pᵀ dO and dK += dSᵀ q. `dk` and `dv` are contiguous [batch, heads, keys, D].
extern "C" __global__ void __launch_bounds__(128) flash_attention_backward_dkdv(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    const u8* __restrict__ mask, const u16* __restrict__ dout, const float* __restrict__ lse,
    const float* __restrict__ delta, u16* __restrict__ dk, u16* __restrict__ dv,
    const __grid_constant__ Params p) {
    __shared__ __align__(16) u16 q_tile[TILE * ROW];
    __shared__ __align__(16) u16 do_tile[TILE * ROW];
    __shared__ float lse_tile[TILE];
    __shared__ float delta_tile[TILE];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const i64 bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
    const u8* mask_bh = mask_of(mask, p, b, h);
    const i64 k0 = (i64)blockIdx.x * TILE + warp * 16;
    const i64 keys[2] = {k0 + g, k0 + g + 8};
    const float scale_log2e = f32_of(p.scale_log2e);
    const u16* qb = q + b * p.q_stride[0] + h * p.q_stride[1];
    const u16* db = dout + b * p.do_stride[0] + h * p.do_stride[1];

    u32 ka[D / 16][4], va[D / 16][4];
    load_a(ka, k + b * p.k_stride[0] + h * p.k_stride[1], p.k_stride, keys, p.keys);
    load_a(va, v + b * p.v_stride[0] + h * p.v_stride[1], p.v_stride, keys, p.keys);

    float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        dk_acc[n][0] = dk_acc[n][1] = dk_acc[n][2] = dk_acc[n][3] = 0.f;
        dv_acc[n][0] = dv_acc[n][1] = dv_acc[n][2] = dv_acc[n][3] = 0.f;
    }

    for (i64 r0 = 0; r0 < p.queries; r0 += TILE) {
        __syncthreads();
        load_tile(q_tile, qb, p.q_stride, r0, p.queries);
        load_tile(do_tile, db, p.do_stride, r0, p.queries);
        for (int i = threadIdx.x; i < TILE; i += blockDim.x) {
            const i64 row = r0 + i;
            lse_tile[i] = row < p.queries ? lse[bh * p.queries + row] : NEG_INF;
            delta_tile[i] = row < p.queries ? delta[bh * p.queries + row] : 0.f;
        }
        __syncthreads();

        // Transposed tiles (rows: this warp's keys, columns: queries), 32 queries at a time so
        // that two such tiles fit in registers beside the four 16 x D operands and sums.
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int c0 = half * 32;
            float s[4][4], dp[4][4];
            times_tile_transposed<4>(s, ka, q_tile + c0 * ROW);
            times_tile_transposed<4>(dp, va, do_tile + c0 * ROW);
            PROBABILITIES_AND_GRADIENTS(4, r0 + c0 + n * 8 + 2 * t + (e & 1), keys[e >> 1], lse_tile[c0 + n * 8 + 2 * t + (e & 1)],
                                        delta_tile[c0 + n * 8 + 2 * t + (e & 1)])
            times_tile_rows<2>(dv_acc, s, do_tile + c0 * ROW);  // dV += Pᵀ dO
            times_tile_rows<2>(dk_acc, dp, q_tile + c0 * ROW);  // dK += dSᵀ q
        }
    }
    store_rows(dv, bh, p.keys, keys, dv_acc, 1.f);
    store_rows(dk, bh, p.keys, keys, dk_acc, f32_of(p.scale));
}

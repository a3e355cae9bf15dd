// LayerNorm, exact and quick GELU, and the residual add with or without dropout, forward and
// backward, as kernels of our own (src/fused_ops.rs launches them on cubecl's stream; NVRTC compiles them). burn
// records each as a chain of operations, and recording operations is what bounds a training
// step on the GPU; here each is one operation each way.
// `src/fused_ops.rs` prepends `#define CODE n`, n = ELEM + 3 * OTHER, each of them
//   0: f32, 1: bf16, 2: f16
// ELEM is the type of the input, weight, bias and outputs; OTHER that of the residual add's
// branch `h` and its gradient (a linear layer's output: the compute dtype under autocast), of
// LayerNorm's output and its gradient (a linear layer's input: the compute dtype under
// autocast), and of the column sums.
// Statistics and sums are f32 whatever the element type.
#define ELEM ((CODE) % 3)
#define OTHER ((CODE) / 3)

typedef unsigned short u16;
typedef long long i64;

// Kernel parameters, passed by value (cubecl's info words, as one grid-constant argument):
// 64-bit words in the order `src/fused_ops.rs` writes them.
struct __align__(8) Params {
    i64 rows;           // every dimension but the last, multiplied out (element-wise kernels: elements)
    i64 d;              // the normalised (last) dimension
    i64 eps;            // f32 bits (LayerNorm's epsilon; dropout's 1 / (1 - prob))
    i64 rows_per_chunk; // weight / bias gradients: rows a block of partial sums covers (dropout: its hash threshold)
    i64 chunks;         // and how many such blocks (LayerNorm's input gradient: 1 where `addend` is added in)
};

// The two 16-bit formats as distinct types, so that loads and stores overload on them.
struct bf16_t { u16 bits; };
struct f16_t { u16 bits; };

__device__ __forceinline__ float load(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ void store(float* p, i64 i, float x) { p[i] = x; }
__device__ __forceinline__ float load(const bf16_t* p, i64 i) { return __int_as_float(((int)p[i].bits) << 16); }
__device__ __forceinline__ void store(bf16_t* p, i64 i, float x) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    p[i].bits = h;
}
__device__ __forceinline__ float load(const f16_t* p, i64 i) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p[i].bits));
    return f;
}
__device__ __forceinline__ void store(f16_t* p, i64 i, float x) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    p[i].bits = h;
}

#if ELEM == 0
typedef float elem_t;
#elif ELEM == 1
typedef bf16_t elem_t;
#else
typedef f16_t elem_t;
#endif
#if OTHER == 0
typedef float other_t;
#elif OTHER == 1
typedef bf16_t other_t;
#else
typedef f16_t other_t;
#endif

__device__ __forceinline__ float warp_sum(float x) {
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

// One warp per row (eight rows a block): the mean, then the biased variance from the
// deviations (two passes over a row that stays in L1), then y = (x - mean) / sqrt(var + eps) *
// weight + bias, as src/model/nn.rs's LayerNorm computes it, rounded once to the output's type.
// Writes each row's mean and 1 / sqrt(var + eps) for the backward.
extern "C" __global__ void __launch_bounds__(256) layer_norm_forward(
    const elem_t* __restrict__ x, const elem_t* __restrict__ weight, const elem_t* __restrict__ bias,
    other_t* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out, const __grid_constant__ Params p) {
    const int lane = threadIdx.x & 31;
    const i64 row = (i64)blockIdx.x * 8 + (threadIdx.x >> 5);
    if (row >= p.rows) return;
    const elem_t* xr = x + row * p.d;
    float sum = 0.0f;
    for (i64 i = lane; i < p.d; i += 32) sum += load(xr, i);
    const float mean = warp_sum(sum) / (float)p.d;
    float sq = 0.0f;
    for (i64 i = lane; i < p.d; i += 32) {
        const float c = load(xr, i) - mean;
        sq += c * c;
    }
    const float var = warp_sum(sq) / (float)p.d;
    const float rstd = 1.0f / sqrtf(var + __int_as_float((int)p.eps));
    other_t* yr = y + row * p.d;
    for (i64 i = lane; i < p.d; i += 32) store(yr, i, (load(xr, i) - mean) * rstd * load(weight, i) + load(bias, i));
    if (lane == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

// The input's gradient, one warp per row: with xhat = (x - mean) * rstd and g = dy * weight,
// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)). dy is in the output's type. With
// `p.chunks` 1, `addend` (the input's gradient from its other uses: a pre-LN block's residual
// branch) is added before the one rounding, which saves burn's add a pass over [rows, d] of its
// own; otherwise `addend` is not read (the launch passes dx in its place).
extern "C" __global__ void __launch_bounds__(256) layer_norm_backward_input(
    const elem_t* __restrict__ x, const elem_t* __restrict__ weight, const other_t* __restrict__ dy,
    const float* __restrict__ mean_in, const float* __restrict__ rstd_in, elem_t* __restrict__ dx, const elem_t* __restrict__ addend,
    const __grid_constant__ Params p) {
    const int lane = threadIdx.x & 31;
    const i64 row = (i64)blockIdx.x * 8 + (threadIdx.x >> 5);
    if (row >= p.rows) return;
    const float mean = mean_in[row], rstd = rstd_in[row];
    const elem_t* xr = x + row * p.d;
    const other_t* dyr = dy + row * p.d;
    float sum_g = 0.0f, sum_gx = 0.0f;
    for (i64 i = lane; i < p.d; i += 32) {
        const float g = load(dyr, i) * load(weight, i);
        sum_g += g;
        sum_gx += g * (load(xr, i) - mean) * rstd;
    }
    const float mean_g = warp_sum(sum_g) / (float)p.d;
    const float mean_gx = warp_sum(sum_gx) / (float)p.d;
    elem_t* dxr = dx + row * p.d;
    const elem_t* addr = addend + row * p.d;
    for (i64 i = lane; i < p.d; i += 32) {
        const float xhat = (load(xr, i) - mean) * rstd;
        const float more = p.chunks ? load(addr, i) : 0.0f;
        store(dxr, i, rstd * (load(dyr, i) * load(weight, i) - mean_g - xhat * mean_gx) + more);
    }
}

// ---- The same two kernels with a block of 256 threads per row, for rows up to WIDE_PER * 256
// wide (the models' 1024 and 2048): each thread holds its WIDE_PER elements of the row in
// registers, so the row is read from memory once (the warp-per-row kernels above read it two
// or three times, which at the LLM's width missed L1 and ran at about half the memory's speed).

#define WIDE_PER 8

// The sum of `x` over the block's 256 threads, in a fixed order; every thread gets it.
// `scratch` holds 8 floats; the barriers let a second call reuse it.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
    x = warp_sum(x);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = x;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < 8; ++w) total += scratch[w];
    return total;
}

extern "C" __global__ void __launch_bounds__(256) layer_norm_forward_wide(
    const elem_t* __restrict__ x, const elem_t* __restrict__ weight, const elem_t* __restrict__ bias,
    other_t* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out, const __grid_constant__ Params p) {
    __shared__ float scratch[8];
    const i64 row = blockIdx.x;
    const elem_t* xr = x + row * p.d;
    float v[WIDE_PER];
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < WIDE_PER; ++j) {
        const i64 i = threadIdx.x + j * 256;
        v[j] = i < p.d ? load(xr, i) : 0.0f;
        sum += v[j];
    }
    const float mean = block_sum(sum, scratch) / (float)p.d;
    float sq = 0.0f;
#pragma unroll
    for (int j = 0; j < WIDE_PER; ++j) {
        const float c = threadIdx.x + j * 256 < p.d ? v[j] - mean : 0.0f;
        sq += c * c;
    }
    const float var = block_sum(sq, scratch) / (float)p.d;
    const float rstd = 1.0f / sqrtf(var + __int_as_float((int)p.eps));
    other_t* yr = y + row * p.d;
#pragma unroll
    for (int j = 0; j < WIDE_PER; ++j) {
        const i64 i = threadIdx.x + j * 256;
        if (i < p.d) store(yr, i, (v[j] - mean) * rstd * load(weight, i) + load(bias, i));
    }
    if (threadIdx.x == 0) {
        mean_out[row] = mean;
        rstd_out[row] = rstd;
    }
}

extern "C" __global__ void __launch_bounds__(256) layer_norm_backward_input_wide(
    const elem_t* __restrict__ x, const elem_t* __restrict__ weight, const other_t* __restrict__ dy,
    const float* __restrict__ mean_in, const float* __restrict__ rstd_in, elem_t* __restrict__ dx, const elem_t* __restrict__ addend,
    const __grid_constant__ Params p) {
    __shared__ float scratch[8];
    const i64 row = blockIdx.x;
    const float mean = mean_in[row], rstd = rstd_in[row];
    const elem_t* xr = x + row * p.d;
    const other_t* dyr = dy + row * p.d;
    float xhat[WIDE_PER], g[WIDE_PER];
    float sum_g = 0.0f, sum_gx = 0.0f;
#pragma unroll
    for (int j = 0; j < WIDE_PER; ++j) {
        const i64 i = threadIdx.x + j * 256;
        const bool in = i < p.d;
        xhat[j] = in ? (load(xr, i) - mean) * rstd : 0.0f;
        g[j] = in ? load(dyr, i) * load(weight, i) : 0.0f;
        sum_g += g[j];
        sum_gx += g[j] * xhat[j];
    }
    const float mean_g = block_sum(sum_g, scratch) / (float)p.d;
    const float mean_gx = block_sum(sum_gx, scratch) / (float)p.d;
    elem_t* dxr = dx + row * p.d;
    const elem_t* addr = addend + row * p.d;
#pragma unroll
    for (int j = 0; j < WIDE_PER; ++j) {
        const i64 i = threadIdx.x + j * 256;
        if (i < p.d) store(dxr, i, rstd * (g[j] - mean_g - xhat[j] * mean_gx) + (p.chunks ? load(addr, i) : 0.0f));
    }
}

// The weight's and bias's gradients, first as partial sums: block (column block, chunk) sums
// dy * xhat and dy over its chunk's rows for 256 adjacent columns (reads coalesced along the
// row), into partial_weight / partial_bias [chunks, d].
extern "C" __global__ void __launch_bounds__(256) layer_norm_backward_params_partial(
    const elem_t* __restrict__ x, const other_t* __restrict__ dy, const float* __restrict__ mean_in,
    const float* __restrict__ rstd_in, float* __restrict__ partial_weight, float* __restrict__ partial_bias,
    const __grid_constant__ Params p) {
    const i64 col = (i64)blockIdx.x * 256 + threadIdx.x;
    if (col >= p.d) return;
    const i64 chunk = blockIdx.y;
    const i64 first = chunk * p.rows_per_chunk;
    const i64 last = min(first + p.rows_per_chunk, p.rows);
    float dw = 0.0f, db = 0.0f;
#pragma unroll 8
    for (i64 row = first; row < last; ++row) {
        const float g = load(dy, row * p.d + col);
        dw += g * (load(x, row * p.d + col) - mean_in[row]) * rstd_in[row];
        db += g;
    }
    partial_weight[chunk * p.d + col] = dw;
    partial_bias[chunk * p.d + col] = db;
}

// The totals over `p.chunks` chunks of N sets of partial sums (`partials[n]`: [chunks, p.d],
// f32) for the 32 columns of this block of 256 threads: each of its eight warps adds every
// eighth chunk (warp w: chunks w, w + 8, ...) in order, then warp 0 adds the eight sums in warp
// order. A fixed order, so the same partial sums give the same bits. (One thread a column
// walking every chunk left the GPU mostly idle: 6144 threads for c_attn's bias, each with 128
// loads in a row.) True in the lanes of warp 0 whose column `col` is inside, with `total` set.
template <int N>
__device__ __forceinline__ bool chunk_totals(const float* const (&partials)[N], const Params& p, i64& col, float (&total)[N]) {
    __shared__ float sums[N][8][33];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    col = (i64)blockIdx.x * 32 + lane;
    float s[N];
#pragma unroll
    for (int n = 0; n < N; ++n) s[n] = 0.0f;
    if (col < p.d) {
        for (i64 c = warp; c < p.chunks; c += 8) {
#pragma unroll
            for (int n = 0; n < N; ++n) s[n] += partials[n][c * p.d + col];
        }
    }
#pragma unroll
    for (int n = 0; n < N; ++n) sums[n][warp][lane] = s[n];
    __syncthreads();
    if (warp != 0 || col >= p.d) return false;
#pragma unroll
    for (int n = 0; n < N; ++n) {
        total[n] = 0.0f;
#pragma unroll
        for (int w = 0; w < 8; ++w) total[n] += sums[n][w][lane];
    }
    return true;
}

// The partial sums over the chunks: dweight, dbias [d] in the element type, by `chunk_totals`
// (a fixed order: the same partial sums give the same bits).
extern "C" __global__ void __launch_bounds__(256) layer_norm_backward_params_sum(
    const float* __restrict__ partial_weight, const float* __restrict__ partial_bias,
    elem_t* __restrict__ dweight, elem_t* __restrict__ dbias, const __grid_constant__ Params p) {
    const float* partials[2] = {partial_weight, partial_bias};
    float total[2];
    i64 col;
    if (chunk_totals<2>(partials, p, col, total)) {
        store(dweight, col, total[0]);
        store(dbias, col, total[1]);
    }
}

// ---- Element-wise kernels over `p.rows` elements, for the GELUs and the residual adds.
// Each replaces a chain of burn operations recorded one by one. A thread takes UNROLL elements
// 256 apart (each load coalesced over the warp) and loads them all before using any, so that
// it has UNROLL loads in flight (one at a time left the 16-bit kernels waiting on memory);
// the grid strides over what it does not cover.

#define UNROLL 8
#define GROUPS(g) for (i64 g = (i64)blockIdx.x * 256 * UNROLL + threadIdx.x; g < p.rows; g += (i64)gridDim.x * 256 * UNROLL)
// Element j of group g, and whether it is inside.
#define AT(g, j) ((g) + (i64)(j) * 256)
#define INSIDE(g, j) (AT(g, j) < p.rows)

// Element-wise kernels over whole 16-byte vectors of elements (8 of a 16-bit type, 4 of f32),
// VECTORS of them in flight per thread: one load or store instruction moves 16 bytes where the
// element-at-a-time loop above moves 2, which left the 16-bit GELUs at ~60% of PyTorch's
// bandwidth. Used where every pointer is 16-byte aligned (`ALIGNED`); the elements past the last
// whole vector, and misaligned tensors, take the element-at-a-time loop.
#define PER_VECTOR (16 / (int)sizeof(elem_t))
#define VECTORS 2
union elem_vector {
    uint4 bits;
    elem_t e[PER_VECTOR];
};
#define ALIGNED(ptr) ((((unsigned long long)(ptr)) & 15) == 0)
// Vector group g (VECTORS vectors 256 apart) over the elements' whole vectors.
#define VECTOR_GROUPS(g) for (i64 g = (i64)blockIdx.x * 256 * VECTORS + threadIdx.x; g < p.rows / PER_VECTOR; g += (i64)gridDim.x * 256 * VECTORS)
#define VECTOR_AT(g, k) ((g) + (i64)(k) * 256)
#define VECTOR_INSIDE(g, k) (VECTOR_AT(g, k) < p.rows / PER_VECTOR)
// The elements past the whole vectors, one per thread of the grid.
#define TAIL(i) for (i64 i = p.rows / PER_VECTOR * PER_VECTOR + (i64)blockIdx.x * 256 + threadIdx.x; i < p.rows; i += (i64)gridDim.x * 256)

__device__ __forceinline__ float gelu_erf(float x) {
    return x * ((erff(x * 0.70710678118654752f) + 1.0f) * 0.5f);
}

// dGELU/dx = Phi(x) + x * phi(x), phi the standard normal density.
__device__ __forceinline__ float gelu_erf_slope(float x) {
    const float cdf = (erff(x * 0.70710678118654752f) + 1.0f) * 0.5f;
    const float pdf = expf(-0.5f * x * x) * 0.39894228040143268f;
    return cdf + x * pdf;
}

// Exact GELU, x * (1 + erf(x / sqrt 2)) / 2 (PyTorch's `nn.GELU()`, llm-jp's activation).
extern "C" __global__ void __launch_bounds__(256) gelu_forward(
    const elem_t* __restrict__ x, elem_t* __restrict__ y, const __grid_constant__ Params p) {
    if (ALIGNED(x) && ALIGNED(y)) {
        const uint4* xv = (const uint4*)x;
        uint4* yv = (uint4*)y;
        VECTOR_GROUPS(g) {
            elem_vector v[VECTORS];
#pragma unroll
            for (int k = 0; k < VECTORS; ++k)
                if (VECTOR_INSIDE(g, k)) v[k].bits = xv[VECTOR_AT(g, k)];
#pragma unroll
            for (int k = 0; k < VECTORS; ++k) {
                if (!VECTOR_INSIDE(g, k)) continue;
                elem_vector out;
#pragma unroll
                for (int j = 0; j < PER_VECTOR; ++j) store(out.e, j, gelu_erf(load(v[k].e, j)));
                yv[VECTOR_AT(g, k)] = out.bits;
            }
        }
        TAIL(i) store(y, i, gelu_erf(load(x, i)));
        return;
    }
    GROUPS(g) {
        float v[UNROLL];
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) v[j] = INSIDE(g, j) ? load(x, AT(g, j)) : 0.0f;
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) {
            if (INSIDE(g, j)) store(y, AT(g, j), gelu_erf(v[j]));
        }
    }
}

// dx = dy * (Phi(x) + x * phi(x)).
extern "C" __global__ void __launch_bounds__(256) gelu_backward(
    const elem_t* __restrict__ x, const elem_t* __restrict__ dy, elem_t* __restrict__ dx, const __grid_constant__ Params p) {
    if (ALIGNED(x) && ALIGNED(dy) && ALIGNED(dx)) {
        const uint4* xv = (const uint4*)x;
        const uint4* dyv = (const uint4*)dy;
        uint4* dxv = (uint4*)dx;
        VECTOR_GROUPS(g) {
            elem_vector v[VECTORS], d[VECTORS];
#pragma unroll
            for (int k = 0; k < VECTORS; ++k) {
                if (VECTOR_INSIDE(g, k)) {
                    v[k].bits = xv[VECTOR_AT(g, k)];
                    d[k].bits = dyv[VECTOR_AT(g, k)];
                }
            }
#pragma unroll
            for (int k = 0; k < VECTORS; ++k) {
                if (!VECTOR_INSIDE(g, k)) continue;
                elem_vector out;
#pragma unroll
                for (int j = 0; j < PER_VECTOR; ++j) store(out.e, j, load(d[k].e, j) * gelu_erf_slope(load(v[k].e, j)));
                dxv[VECTOR_AT(g, k)] = out.bits;
            }
        }
        TAIL(i) store(dx, i, load(dy, i) * gelu_erf_slope(load(x, i)));
        return;
    }
    GROUPS(g) {
        float v[UNROLL], d[UNROLL];
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) {
            v[j] = INSIDE(g, j) ? load(x, AT(g, j)) : 0.0f;
            d[j] = INSIDE(g, j) ? load(dy, AT(g, j)) : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) {
            if (INSIDE(g, j)) store(dx, AT(g, j), d[j] * gelu_erf_slope(v[j]));
        }
    }
}

// x rounded to the element type, as PyTorch rounds each operation's result in it.
__device__ __forceinline__ float round_elem(float x) {
    elem_t r[1];
    store(r, 0, x);
    return load(r, 0);
}

// CLIP's quick GELU, x * sigmoid(1.702 x), with PyTorch's roundings: transformers computes it as
// three operations (a scale, a sigmoid, a product), each rounded to the element type.
__device__ __forceinline__ float quick_gelu_sigmoid(float x) {
    return round_elem(1.0f / (1.0f + expf(-round_elem(x * 1.702f))));
}

extern "C" __global__ void __launch_bounds__(256) quick_gelu_forward(
    const elem_t* __restrict__ x, elem_t* __restrict__ y, const __grid_constant__ Params p) {
    GROUPS(g) {
        float v[UNROLL];
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) v[j] = INSIDE(g, j) ? load(x, AT(g, j)) : 0.0f;
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) {
            if (INSIDE(g, j)) store(y, AT(g, j), v[j] * quick_gelu_sigmoid(v[j]));
        }
    }
}

// The backward of those three operations as PyTorch's autograd runs them, each result rounded:
// dx = dy * s + 1.702 * (dy * x) * s * (1 - s), s the rounded sigmoid.
extern "C" __global__ void __launch_bounds__(256) quick_gelu_backward(
    const elem_t* __restrict__ x, const elem_t* __restrict__ dy, elem_t* __restrict__ dx, const __grid_constant__ Params p) {
    GROUPS(g) {
        float v[UNROLL], d[UNROLL];
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) {
            v[j] = INSIDE(g, j) ? load(x, AT(g, j)) : 0.0f;
            d[j] = INSIDE(g, j) ? load(dy, AT(g, j)) : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) {
            const float s = quick_gelu_sigmoid(v[j]);
            const float through_x = round_elem(d[j] * s);
            const float through_s = round_elem(round_elem(round_elem(d[j] * v[j]) * (1.0f - s) * s) * 1.702f);
            if (INSIDE(g, j)) store(dx, AT(g, j), through_x + through_s);
        }
    }
}

// y = x + h, h in its own type (a linear layer's output under autocast), y in x's.
extern "C" __global__ void __launch_bounds__(256) residual_add(
    const elem_t* __restrict__ x, const other_t* __restrict__ h, elem_t* __restrict__ y, const __grid_constant__ Params p) {
    GROUPS(g) {
        float xs[UNROLL], hs[UNROLL];
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) {
            xs[j] = INSIDE(g, j) ? load(x, AT(g, j)) : 0.0f;
            hs[j] = INSIDE(g, j) ? load(h, AT(g, j)) : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) {
            if (INSIDE(g, j)) store(y, AT(g, j), xs[j] + hs[j]);
        }
    }
}

// lowbias32, as src/model/nn.rs's `mix32`.
__device__ __forceinline__ unsigned mix32(unsigned x) {
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
    return x;
}

// Whether element i survives dropout: `SeededDropout::keeps_element` in src/model/nn.rs.
__device__ __forceinline__ bool kept(const int* seed, i64 i, unsigned drop_below) {
    const unsigned lo = (unsigned)i, hi = (unsigned)(i >> 32);
    const unsigned h = mix32(mix32((unsigned)seed[0] ^ lo) ^ mix32((unsigned)seed[1] + hi * 0x9e3779b9u));
    return h >= drop_below;
}

// y = x + dropout(h): h's elements kept with probability 1 - prob and scaled by 1 / (1 - prob).
// p.eps holds the f32 bits of 1 / (1 - prob), p.rows_per_chunk the hash threshold (prob * 2^32).
extern "C" __global__ void __launch_bounds__(256) residual_dropout_forward(
    const elem_t* __restrict__ x, const other_t* __restrict__ h, const int* __restrict__ seed,
    elem_t* __restrict__ y, const __grid_constant__ Params p) {
    const float scale = __int_as_float((int)p.eps);
    const unsigned drop_below = (unsigned)p.rows_per_chunk;
    GROUPS(g) {
        float xs[UNROLL], hs[UNROLL];
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) {
            xs[j] = INSIDE(g, j) ? load(x, AT(g, j)) : 0.0f;
            hs[j] = INSIDE(g, j) ? load(h, AT(g, j)) : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) {
            if (INSIDE(g, j)) store(y, AT(g, j), xs[j] + (kept(seed, AT(g, j), drop_below) ? hs[j] * scale : 0.0f));
        }
    }
}

// dh = dy where kept, scaled; 0 where dropped (x's gradient is dy itself).
extern "C" __global__ void __launch_bounds__(256) residual_dropout_backward(
    const elem_t* __restrict__ dy, const int* __restrict__ seed, other_t* __restrict__ dh, const __grid_constant__ Params p) {
    const float scale = __int_as_float((int)p.eps);
    const unsigned drop_below = (unsigned)p.rows_per_chunk;
    GROUPS(g) {
        float d[UNROLL];
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) d[j] = INSIDE(g, j) ? load(dy, AT(g, j)) : 0.0f;
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) {
            if (INSIDE(g, j)) store(dh, AT(g, j), kept(seed, AT(g, j), drop_below) ? d[j] * scale : 0.0f);
        }
    }
}

// ---- Column sums of a [rows, d] matrix (a linear layer's bias gradient: the output gradient
// summed over rows), as partial sums per chunk of rows, then the chunks added in order (the
// same sums give the same bits).
// Two adjacent elements of a row, as one 8- or 4-byte load (`i` even, the buffer aligned).
__device__ __forceinline__ void load_pair(const float* p, i64 i, float& a, float& b) {
    const float2 v = *reinterpret_cast<const float2*>(p + i);
    a = v.x;
    b = v.y;
}
__device__ __forceinline__ void load_pair(const bf16_t* p, i64 i, float& a, float& b) {
    const unsigned v = *reinterpret_cast<const unsigned*>(p + i);
    a = __int_as_float((int)(v << 16));
    b = __int_as_float((int)(v & 0xffff0000u));
}
__device__ __forceinline__ void load_pair(const f16_t* p, i64 i, float& a, float& b) {
    a = load(p, i);
    b = load(p, i + 1);
}

// Each thread sums two adjacent columns over one chunk of rows, in row order. With an even
// width each row's pair is one load: a warp reads 128 (bf16) or 256 bytes a row, not 64 bytes
// by 2-byte loads.
extern "C" __global__ void __launch_bounds__(256) column_sum_partial(
    const elem_t* __restrict__ x, float* __restrict__ partial, const __grid_constant__ Params p) {
    const i64 col = 2 * ((i64)blockIdx.x * 256 + threadIdx.x);
    if (col >= p.d) return;
    const i64 chunk = blockIdx.y;
    const i64 first = chunk * p.rows_per_chunk;
    const i64 last = min(first + p.rows_per_chunk, p.rows);
    const bool two = col + 1 < p.d;
    float s0 = 0.0f, s1 = 0.0f;
    // Pairs start at even elements: with an even width, on an aligned buffer, each is one load.
    const bool paired = p.d % 2 == 0 && (unsigned long long)x % (2 * sizeof(elem_t)) == 0;
    if (two && paired) {
        // Unrolled so that eight rows' loads are in flight at once (the sums' order is kept).
#pragma unroll 8
        for (i64 row = first; row < last; ++row) {
            float a, b;
            load_pair(x, row * p.d + col, a, b);
            s0 += a;
            s1 += b;
        }
    } else {
        for (i64 row = first; row < last; ++row) {
            s0 += load(x, row * p.d + col);
            if (two) s1 += load(x, row * p.d + col + 1);
        }
    }
    partial[chunk * p.d + col] = s0;
    if (two) partial[chunk * p.d + col + 1] = s1;
}

// The chunks' partial sums added up, by `chunk_totals`.
extern "C" __global__ void __launch_bounds__(256) column_sum_total(
    const float* __restrict__ partial, other_t* __restrict__ out, const __grid_constant__ Params p) {
    const float* partials[1] = {partial};
    float total[1];
    i64 col;
    if (chunk_totals<1>(partials, p, col, total)) store(out, col, total[0]);
}

// ---- Embedding backward: out[ids[r]] += dy[r] for each of the p.rows rows of dy ([rows, p.d],
// the element type), in f32, into out ([p.chunks, p.d], the table's rows). burn's `select_add`
// gives each column one thread that walks every row in turn (2048 threads over 8192 rows at
// stage 2, ~3 ms an embedding); here each row is a block's and each element a thread's, added
// by f32 atomics, so rows sharing an id add in whatever order they land (the last bits of such
// a sum vary between runs, as the flash backward's dQ does). An id outside the table adds
// nothing.
extern "C" __global__ void __launch_bounds__(256) embedding_backward_zero(float* __restrict__ out, const __grid_constant__ Params p) {
    const i64 n = p.chunks * p.d;
    for (i64 i = (i64)blockIdx.x * 256 + threadIdx.x; i < n; i += (i64)gridDim.x * 256) out[i] = 0.0f;
}

extern "C" __global__ void __launch_bounds__(256) embedding_backward(
    const elem_t* __restrict__ dy, const int* __restrict__ ids, float* __restrict__ out, const __grid_constant__ Params p) {
    for (i64 row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const int id = ids[row];
        if (id < 0 || (i64)id >= p.chunks) continue;
        float* to = out + (i64)id * p.d;
        const elem_t* from = dy + row * p.d;
        for (i64 col = threadIdx.x; col < p.d; col += 256) atomicAdd(to + col, load(from, col));
    }
}

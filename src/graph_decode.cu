// Kernels of one GPT-2 decode step at batch 1 (src/graph_decode.rs captures them in a CUDA graph).
// Weights, keys and values are `T` (bf16 kept as its bits, or float); every activation is f32.
// The step reads its token and position from `state` in device memory, so one captured graph
// serves every step: state[0] token, state[1] position, state[2] the step's arg max.
//
// A layer is five kernels: c_attn, attention, attn.c_proj, c_fc, mlp.c_proj. A product is a
// GEMV over the weight stored transposed ([out, in], as nn.Linear keeps it), a warp per output:
// each block first puts the input in shared memory (normalising it when a LayerNorm comes
// before the product) while its warps' first weight loads are already on their way, and each
// warp finishes its output itself: bias, then the activation (c_fc) or the residual (the
// projections). So no kernel exists only to normalise, activate or add, and a step is
// 5 x layers + 2 launches.
typedef unsigned short bf16;
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __uint_as_float(((unsigned)v) << 16); }

__device__ __forceinline__ void store(float* p, size_t i, float v) { p[i] = v; }
// Round to nearest even, as torch's and burn's f32 -> bf16 casts do.
__device__ __forceinline__ void store(bf16* p, size_t i, float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) { p[i] = 0x7fc0; return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    p[i] = (bf16)(u >> 16);
}

// Eight consecutive values, 16-byte aligned (bf16) or 32-byte aligned (float).
__device__ __forceinline__ void unpack8(uint4 u, float out[8]) {
    unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        out[2 * j] = __uint_as_float(w[j] << 16);
        out[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
}
__device__ __forceinline__ void load8(const bf16* p, size_t i, float out[8]) {
    unpack8(*reinterpret_cast<const uint4*>(p + i), out);
}
__device__ __forceinline__ void load8(const float* p, size_t i, float out[8]) {
    float4 a = *reinterpret_cast<const float4*>(p + i);
    float4 b = *reinterpret_cast<const float4*>(p + i + 4);
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (any multiple of 32 threads up to 1024); every thread gets it.
__device__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < warps; w++) total += scratch[w];
    return total;
}

// After a block's results are written: whether this block is the last of `expected` to
// arrive at `counter`. The last resets the counter for the next kernel (the graph's next
// replay included) and must read the others' results with __ldcg (past its L1).
__device__ bool last_to_arrive(int* counter, int expected) {
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        last = atomicAdd(counter, 1) == expected - 1;
        if (last) *counter = 0;
    }
    __syncthreads();
    return last;
}

// h = wte[token] + wpe[position].
template <typename T>
__device__ void embed(const int* state, const T* wte, const T* wpe, float* h, int d_model) {
    int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= d_model) return;
    size_t token = (size_t)state[0], position = (size_t)state[1];
    h[d] = to_f32(wte[token * d_model + d]) + to_f32(wpe[position * d_model + d]);
}

// xs = LayerNorm(h) over k_dim values (two passes over xs, as torch computes the variance).
// Every thread of the block takes part.
__device__ void layernorm_into(float* xs, const float* h, const float* gamma, const float* beta, float eps, int k_dim, float* scratch) {
    float sum = 0.f;
    for (int k = threadIdx.x; k < k_dim; k += blockDim.x) {
        float v = h[k];
        xs[k] = v;
        sum += v;
    }
    float mean = block_sum(sum, scratch) / k_dim;
    float sq = 0.f;
    for (int k = threadIdx.x; k < k_dim; k += blockDim.x) {
        float c = xs[k] - mean;
        sq += c * c;
    }
    float rstd = rsqrtf(block_sum(sq, scratch) / k_dim + eps);
    for (int k = threadIdx.x; k < k_dim; k += blockDim.x) xs[k] = (xs[k] - mean) * rstd * gamma[k] + beta[k];
}

__device__ float activate(float v, int activation) {
    switch (activation) {
        case 0: return v / (1.f + expf(-1.702f * v));                       // quick_gelu
        case 1: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));  // gelu (erf)
        case 2: {                                                            // gelu tanh
            float inner = 0.7978845608028654f * (v + 0.044715f * v * v * v);
            return 0.5f * v * (1.f + tanhf(inner));
        }
        case 3: return fmaxf(v, 0.f);                                       // relu
        default: return v / (1.f + expf(-v));                              // silu
    }
}

// A warp's dot product of a weight row with xs (shared). A step is 256 values (a 16-byte load
// of eight bf16 per lane); PREFETCH steps are loaded at once, the first before the block's
// prologue, so that memory always has many reads outstanding. Rows of a length that is a
// multiple of 8 only (16-byte aligned); `row_dot_scalar` takes the others.
#define PREFETCH 8
template <typename T>
__device__ __forceinline__ void prefetch_row(const T* wr, int k_dim, int lane, float pre[PREFETCH][8]) {
#pragma unroll
    for (int u = 0; u < PREFETCH; u++) {
        int k = u * 256 + lane * 8;
        if (k < k_dim) load8(wr, k, pre[u]);
    }
}

template <typename T>
__device__ __forceinline__ float row_dot(const T* wr, const float* xs, int k_dim, int lane, float pre[PREFETCH][8]) {
    float s = 0.f;
#pragma unroll
    for (int u = 0; u < PREFETCH; u++) {
        int k = u * 256 + lane * 8;
        if (k < k_dim) {
#pragma unroll
            for (int j = 0; j < 8; j++) s += pre[u][j] * xs[k + j];
        }
    }
    for (int k0 = PREFETCH * 256; k0 < k_dim; k0 += PREFETCH * 256) {
        float wv[PREFETCH][8];
#pragma unroll
        for (int u = 0; u < PREFETCH; u++) {
            int k = k0 + u * 256 + lane * 8;
            if (k < k_dim) load8(wr, k, wv[u]);
        }
#pragma unroll
        for (int u = 0; u < PREFETCH; u++) {
            int k = k0 + u * 256 + lane * 8;
            if (k < k_dim) {
#pragma unroll
                for (int j = 0; j < 8; j++) s += wv[u][j] * xs[k + j];
            }
        }
    }
    return warp_sum(s);
}

template <typename T>
__device__ float row_dot_scalar(const T* wr, const float* xs, int k_dim, int lane) {
    float s = 0.f;
    for (int k = lane; k < k_dim; k += 32) s += to_f32(wr[k]) * xs[k];
    return warp_sum(s);
}

// What a GEMV does before and after its product.
#define PROLOGUE_PLAIN 0      // the input is `x`
#define PROLOGUE_LAYERNORM 1  // the input is LayerNorm(h)
#define EPILOGUE_STORE 0      // out = w x + bias
#define EPILOGUE_ACTIVATE 1   // out = activation(w x + bias)
#define EPILOGUE_RESIDUAL 2   // h += w x + bias

struct GemvArgs {
    const float* x;
    float* h;
    const float* gamma;
    const float* beta;
    float eps;
    const float* bias;
    float* out;
    int k_dim, n_dim, prologue, epilogue, activation;
};

// out[n] = w[n, :] . input + bias[n], w row-major [n_dim, k_dim]: a warp per n, the input in
// shared memory (`xs`, dynamic, k_dim floats).
#define GEMV_THREADS 256
template <typename T>
__device__ void gemv(const GemvArgs& a, const T* w) {
    extern __shared__ float xs[];
    __shared__ float scratch[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int n = blockIdx.x * (GEMV_THREADS / 32) + warp;
    bool active = n < a.n_dim, vec = a.k_dim % 8 == 0;
    const T* wr = w + (size_t)(active ? n : 0) * a.k_dim;
    float pre[PREFETCH][8];
    if (active && vec) prefetch_row(wr, a.k_dim, lane, pre);
    if (a.prologue == PROLOGUE_LAYERNORM) {
        layernorm_into(xs, a.h, a.gamma, a.beta, a.eps, a.k_dim, scratch);
    } else {
        for (int k = threadIdx.x; k < a.k_dim; k += blockDim.x) xs[k] = a.x[k];
    }
    __syncthreads();
    if (!active) return;
    float s = vec ? row_dot(wr, xs, a.k_dim, lane, pre) : row_dot_scalar(wr, xs, a.k_dim, lane);
    if (lane == 0) {
        float v = s + a.bias[n];
        if (a.epilogue == EPILOGUE_STORE) a.out[n] = v;
        else if (a.epilogue == EPILOGUE_ACTIVATE) a.out[n] = activate(v, a.activation);
        else a.h[n] += v;
    }
}

// Four consecutive values of a key or value row from `d` on (zeros past head_dim).
__device__ __forceinline__ void load4(const bf16* row, int d, int head_dim, bool vec, float out[4]) {
    if (vec) {
        uint2 u = *reinterpret_cast<const uint2*>(row + d);
        out[0] = __uint_as_float(u.x << 16);
        out[1] = __uint_as_float(u.x & 0xffff0000u);
        out[2] = __uint_as_float(u.y << 16);
        out[3] = __uint_as_float(u.y & 0xffff0000u);
    } else {
#pragma unroll
        for (int e = 0; e < 4; e++) out[e] = d + e < head_dim ? to_f32(row[d + e]) : 0.f;
    }
}
__device__ __forceinline__ void load4(const float* row, int d, int head_dim, bool vec, float out[4]) {
    if (vec) {
        float4 f = *reinterpret_cast<const float4*>(row + d);
        out[0] = f.x; out[1] = f.y; out[2] = f.z; out[3] = f.w;
    } else {
#pragma unroll
        for (int e = 0; e < 4; e++) out[e] = d + e < head_dim ? row[d + e] : 0.f;
    }
}

// Attention of the step's query against keys 0..=position. The cache is [head, position,
// head_dim], each head's rows contiguous. One block per (head, chunk of ATTN_CHUNK keys): the
// block whose chunk holds the position first writes this token's key and value (rounded as
// the cache stores them); then each warp loads its KEYS_PER_WARP keys and values at once, a
// lane holding four values of a row per 128 (G groups of 128: heads up to G x 128 wide), and
// takes their softmax; the block combines its warps into the chunk's maximum, sum and
// weighted values. The last chunk of a head to finish merges the chunks into
// out[head * head_dim ..].
#define ATTN_CHUNK 32
#define ATTN_THREADS 128
#define KEYS_PER_WARP (ATTN_CHUNK / (ATTN_THREADS / 32))
#define MAX_HEAD_DIM 256
template <typename T, int G>
__device__ void attention(const int* state, const float* qkv, T* k_cache, T* v_cache, float* chunk_acc, float* chunk_ml,
                          int* counters, float* out, int d_model, int head_dim, int n_positions, int max_chunks, float scale) {
    extern __shared__ float chunk_weight[];
    __shared__ float q[MAX_HEAD_DIM];
    __shared__ float warp_m[4], warp_l[4], warp_acc[4][MAX_HEAD_DIM];
    __shared__ float scratch[32];
    int position = state[1], head = blockIdx.x, chunk = blockIdx.y;
    int chunks = position / ATTN_CHUNK + 1;
    if (chunk >= chunks) return;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int j0 = chunk * ATTN_CHUNK, j_end = min(j0 + ATTN_CHUNK, position + 1);
    size_t base = (size_t)head * n_positions * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        int c = head * head_dim + d;
        q[d] = qkv[c];
        if (chunk == chunks - 1) {
            size_t at = base + (size_t)position * head_dim + d;
            store(k_cache, at, qkv[d_model + c]);
            store(v_cache, at, qkv[2 * d_model + c]);
        }
    }
    // Also makes the new key and value visible to the block.
    __syncthreads();

    bool vec = head_dim % 4 == 0;
    float kv[KEYS_PER_WARP][G][4], vv[KEYS_PER_WARP][G][4];
    int jw = j0 + warp * KEYS_PER_WARP;
#pragma unroll
    for (int i = 0; i < KEYS_PER_WARP; i++) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            int d = g * 128 + lane * 4;
            if (jw + i < j_end && d < head_dim) {
                load4(k_cache + base + (size_t)(jw + i) * head_dim, d, head_dim, vec, kv[i][g]);
                load4(v_cache + base + (size_t)(jw + i) * head_dim, d, head_dim, vec, vv[i][g]);
            } else {
#pragma unroll
                for (int e = 0; e < 4; e++) kv[i][g][e] = vv[i][g][e] = 0.f;
            }
        }
    }
    float qv[G][4];
#pragma unroll
    for (int g = 0; g < G; g++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int d = g * 128 + lane * 4 + e;
            qv[g][e] = d < head_dim ? q[d] : 0.f;
        }
    float s[KEYS_PER_WARP], m = NEG_INF;
#pragma unroll
    for (int i = 0; i < KEYS_PER_WARP; i++) {
        float dot = 0.f;
#pragma unroll
        for (int g = 0; g < G; g++)
#pragma unroll
            for (int e = 0; e < 4; e++) dot += qv[g][e] * kv[i][g][e];
        s[i] = warp_sum(dot) * scale;
        if (jw + i < j_end) m = fmaxf(m, s[i]);
    }
    float l = 0.f, acc[G][4] = {};
#pragma unroll
    for (int i = 0; i < KEYS_PER_WARP; i++) {
        float p = jw + i < j_end ? expf(s[i] - m) : 0.f;
        l += p;
#pragma unroll
        for (int g = 0; g < G; g++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[g][e] += p * vv[i][g][e];
    }
    if (lane == 0) { warp_m[warp] = m; warp_l[warp] = l; }
#pragma unroll
    for (int g = 0; g < G; g++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int d = g * 128 + lane * 4 + e;
            if (d < head_dim) warp_acc[warp][d] = acc[g][e];
        }
    __syncthreads();
    float big = NEG_INF;
    for (int w = 0; w < 4; w++) if (warp_l[w] > 0.f) big = fmaxf(big, warp_m[w]);
    float weight[4], total = 0.f;
    for (int w = 0; w < 4; w++) {
        weight[w] = warp_l[w] > 0.f ? expf(warp_m[w] - big) : 0.f;
        total += warp_l[w] * weight[w];
    }
    size_t slot = (size_t)head * max_chunks + chunk;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.f;
        for (int w = 0; w < 4; w++) a += warp_acc[w][d] * weight[w];
        chunk_acc[slot * head_dim + d] = a;
    }
    if (threadIdx.x == 0) { chunk_ml[slot * 2] = big; chunk_ml[slot * 2 + 1] = total; }

    if (!last_to_arrive(&counters[head], chunks)) return;
    const float* ml = chunk_ml + (size_t)head * max_chunks * 2;
    float local = NEG_INF;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) local = fmaxf(local, __ldcg(&ml[2 * c]));
    local = warp_max(local);
    __syncthreads();
    if (lane == 0) scratch[warp] = local;
    __syncthreads();
    big = fmaxf(fmaxf(scratch[0], scratch[1]), fmaxf(scratch[2], scratch[3]));
    float part = 0.f;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        float wc = expf(__ldcg(&ml[2 * c]) - big);
        chunk_weight[c] = wc;
        part += __ldcg(&ml[2 * c + 1]) * wc;
    }
    total = block_sum(part, scratch);
    const float* acc_head = chunk_acc + (size_t)head * max_chunks * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.f;
#pragma unroll 8
        for (int c = 0; c < chunks; c++) a += __ldcg(&acc_head[(size_t)c * head_dim + d]) * chunk_weight[c];
        out[head * head_dim + d] = a / total;
    }
}

// logits[row] = w[row, :] . LayerNorm_f(h), w row-major [rows, d_model] (the tied wte or
// lm_head): a warp per row, the grid's warps striding over the rows. Each block keeps its
// rows' first arg max; the last block picks the step's (NaN never wins), makes it the next
// token and moves the position on.
template <typename T>
__device__ void logits_argmax(const float* h, const float* gamma, const float* beta, float eps, const T* w, float* logits,
                              float* best, int* counters, int* state, int rows, int d_model) {
    extern __shared__ float xs[];
    __shared__ float warp_v[32], scratch[32];
    __shared__ int warp_i[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    bool vec = d_model % 8 == 0;
    int row = blockIdx.x * warps + warp;
    float pre[PREFETCH][8];
    if (row < rows && vec) prefetch_row(w + (size_t)row * d_model, d_model, lane, pre);
    layernorm_into(xs, h, gamma, beta, eps, d_model, scratch);
    __syncthreads();
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    // The warp's first row was loaded before the LayerNorm.
    for (bool loaded = true; row < rows; row += gridDim.x * warps, loaded = false) {
        const T* wr = w + (size_t)row * d_model;
        float s;
        if (vec) {
            if (!loaded) prefetch_row(wr, d_model, lane, pre);
            s = row_dot(wr, xs, d_model, lane, pre);
        } else {
            s = row_dot_scalar(wr, xs, d_model, lane);
        }
        if (lane == 0) logits[row] = s;
        // Rows come in increasing order: only a larger value replaces (first max).
        if (s > bv || (bi == 0x7fffffff && s == bv)) { bv = s; bi = row; }
    }
    if (lane == 0) { warp_v[warp] = bv; warp_i[warp] = bi; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w2 = 1; w2 < warps; w2++) {
            if (warp_v[w2] > bv || (warp_v[w2] == bv && warp_i[w2] < bi)) { bv = warp_v[w2]; bi = warp_i[w2]; }
        }
        best[2 * blockIdx.x] = bv;
        best[2 * blockIdx.x + 1] = __int_as_float(bi);
    }
    if (!last_to_arrive(&counters[0], gridDim.x)) return;
    if (threadIdx.x == 0) {
        bv = NEG_INF;
        bi = 0x7fffffff;
        for (int b = 0; b < (int)gridDim.x; b++) {
            float v = __ldcg(&best[2 * b]);
            int i = __float_as_int(__ldcg(&best[2 * b + 1]));
            if (v > bv || (v == bv && i < bi)) { bv = v; bi = i; }
        }
        int token = bi == 0x7fffffff ? 0 : bi;
        state[2] = token;
        state[0] = token;
        state[1] += 1;
    }
}

#define INSTANCES(SUFFIX, T)                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) embed_##SUFFIX(const int* state, const T* wte, const T* wpe, float* h, int d_model) { \
        embed<T>(state, wte, wpe, h, d_model);                                                                        \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_##SUFFIX(GemvArgs a, const T* w) {               \
        gemv<T>(a, w);                                                                                                \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_##SUFFIX(const int* state, const float* qkv, T* k_cache, \
            T* v_cache, float* chunk_acc, float* chunk_ml, int* counters, float* out, int d_model, int head_dim, int n_positions, \
            int max_chunks, float scale) {                                                                            \
        attention<T, 1>(state, qkv, k_cache, v_cache, chunk_acc, chunk_ml, counters, out, d_model, head_dim, n_positions, max_chunks, scale); \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_wide_##SUFFIX(const int* state, const float* qkv, T* k_cache, \
            T* v_cache, float* chunk_acc, float* chunk_ml, int* counters, float* out, int d_model, int head_dim, int n_positions, \
            int max_chunks, float scale) {                                                                            \
        attention<T, 2>(state, qkv, k_cache, v_cache, chunk_acc, chunk_ml, counters, out, d_model, head_dim, n_positions, max_chunks, scale); \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256) logits_##SUFFIX(const float* h, const float* gamma, const float* beta, float eps, \
            const T* w, float* logits, float* best, int* counters, int* state, int rows, int d_model) {              \
        logits_argmax<T>(h, gamma, beta, eps, w, logits, best, counters, state, rows, d_model);                      \
    }

INSTANCES(bf16, bf16)
INSTANCES(f32, float)

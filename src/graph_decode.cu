// Kernels of one GPT-2 decode step at batch 1 (src/graph_decode.rs captures them in a CUDA graph).
// Weights, keys and values are `T` (bf16 kept as its bits, or float); every activation is f32.
// The step reads its token and position from `state` in device memory, so one captured graph
// serves every step: state[0] token, state[1] position, state[2] the step's arg max.
//
// A layer is five kernels: c_attn, attention, attn.c_proj, c_fc, mlp.c_proj. Each product is a
// split-K GEMV whose blocks write partial sums; the last block to finish a column block (a
// counter in device memory says which) adds them up with the bias and applies what follows
// the product: nothing (q, k, v), the activation (c_fc), or the residual (the projections),
// which also leaves the LayerNorm statistics of its columns for the next product, whose
// blocks normalise their rows of the input themselves. So no kernel exists only to add up,
// normalise or activate, and a step is 5 x layers + 2 launches.

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

// LayerNorm statistics of the residual stream come in slots of STAT_COLUMNS columns: each
// slot's mean and sum of squared deviations, combined here in slot order (Chan et al.).
#define STAT_COLUMNS 256
__device__ void combined_stats(const float* stats, int d_model, float eps, float* mean_out, float* rstd_out) {
    float n = 0.f, mean = 0.f, m2 = 0.f;
    for (int s = 0; s * STAT_COLUMNS < d_model; s++) {
        float nb = (float)min(STAT_COLUMNS, d_model - s * STAT_COLUMNS);
        float mb = stats[2 * s], m2b = stats[2 * s + 1];
        float total = n + nb, delta = mb - mean;
        mean += delta * nb / total;
        m2 += m2b + delta * delta * n * nb / total;
        n = total;
    }
    *mean_out = mean;
    *rstd_out = rsqrtf(m2 / n + eps);
}

// This block's `count` (<= blockDim.x) values, one per thread (threads past `count` give
// nothing): their mean and sum of squared deviations into stats[slot].
__device__ void slot_stats(float v, int count, float* stats, int slot, float* scratch) {
    bool valid = threadIdx.x < count;
    float mean = block_sum(valid ? v : 0.f, scratch) / count;
    float c = valid ? v - mean : 0.f;
    float m2 = block_sum(c * c, scratch);
    if (threadIdx.x == 0) { stats[2 * slot] = mean; stats[2 * slot + 1] = m2; }
}

// h = wte[token] + wpe[position], and h's statistics. Blocks of STAT_COLUMNS threads.
template <typename T>
__device__ void embed(const int* state, const T* wte, const T* wpe, float* h, float* stats, int d_model) {
    __shared__ float scratch[32];
    int d = blockIdx.x * blockDim.x + threadIdx.x;
    size_t token = (size_t)state[0], position = (size_t)state[1];
    float v = 0.f;
    if (d < d_model) {
        v = to_f32(wte[token * d_model + d]) + to_f32(wpe[position * d_model + d]);
        h[d] = v;
    }
    slot_stats(v, min((int)blockDim.x, d_model - (int)(blockIdx.x * blockDim.x)), stats, blockIdx.x, scratch);
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

// What a GEMV does before and after its product.
#define PROLOGUE_PLAIN 0      // the input is `x`
#define PROLOGUE_LAYERNORM 1  // the input is LayerNorm(h) with h's slot statistics
#define EPILOGUE_STORE 0      // out = sum + bias
#define EPILOGUE_ACTIVATE 1   // out = activation(sum + bias)
#define EPILOGUE_RESIDUAL 2   // h += sum + bias, then h's slot statistics

struct GemvArgs {
    const float* x;
    float* h;
    float* stats;
    const float* gamma;
    const float* beta;
    float eps;
    const float* bias;
    float* parts;
    float* out;
    int* counters;
    int k_dim, n_dim, rows_per_split, prologue, epilogue, activation;
};

// out[n] from x[k] * w[k, n], w row-major [k_dim, n_dim] (Conv1D's layout). A block: 32
// column groups of 8 columns (one 16-byte load of bf16 each, a warp reading 512 contiguous
// bytes of a row) times 8 row lanes (the warps), over the rows of split `blockIdx.y`; the
// block's input rows are first put in shared memory (`xs`, dynamic), normalised if asked.
#define GEMV_THREADS 256
#define GEMV_UNROLL 8
template <typename T>
__device__ void gemv(const GemvArgs& a, const T* w) {
    extern __shared__ float xs[];
    __shared__ float sums[8][GEMV_THREADS + 1];
    __shared__ float scratch[32];
    int group = threadIdx.x & 31, lane = threadIdx.x >> 5;
    int k0 = blockIdx.y * a.rows_per_split;
    int k1 = min(k0 + a.rows_per_split, a.k_dim);
    if (a.prologue == PROLOGUE_LAYERNORM) {
        float mean, rstd;
        combined_stats(a.stats, a.k_dim, a.eps, &mean, &rstd);
        for (int k = k0 + threadIdx.x; k < k1; k += blockDim.x) xs[k - k0] = (a.h[k] - mean) * rstd * a.gamma[k] + a.beta[k];
    } else {
        for (int k = k0 + threadIdx.x; k < k1; k += blockDim.x) xs[k - k0] = a.x[k];
    }
    __syncthreads();

    int n_dim = a.n_dim;
    int col0 = (blockIdx.x * 32 + group) * 8;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    bool vec = (n_dim % 8 == 0) && col0 + 8 <= n_dim;
    if (vec) {
        int k = k0 + lane;
        // GEMV_UNROLL rows' loads in flight before their products: the weights are the
        // step's whole cost, and memory only keeps up with many reads outstanding.
        for (; k + 8 * (GEMV_UNROLL - 1) < k1; k += 8 * GEMV_UNROLL) {
            float wv[GEMV_UNROLL][8];
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; u++) load8(w, (size_t)(k + 8 * u) * n_dim + col0, wv[u]);
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; u++) {
                float xv = xs[k + 8 * u - k0];
#pragma unroll
                for (int j = 0; j < 8; j++) acc[j] += xv * wv[u][j];
            }
        }
        for (; k < k1; k += 8) {
            float xv = xs[k - k0], wv[8];
            load8(w, (size_t)k * n_dim + col0, wv);
#pragma unroll
            for (int j = 0; j < 8; j++) acc[j] += xv * wv[j];
        }
    } else if (col0 < n_dim) {
        for (int k = k0 + lane; k < k1; k += 8) {
            float xv = xs[k - k0];
            for (int j = 0; j < 8 && col0 + j < n_dim; j++) acc[j] += xv * to_f32(w[(size_t)k * n_dim + col0 + j]);
        }
    }
#pragma unroll
    for (int j = 0; j < 8; j++) sums[lane][group * 8 + j] = acc[j];
    __syncthreads();
    int col = blockIdx.x * GEMV_THREADS + threadIdx.x;
    float s = 0.f;
#pragma unroll
    for (int l = 0; l < 8; l++) s += sums[l][threadIdx.x];
    if (col < n_dim) a.parts[(size_t)blockIdx.y * n_dim + col] = s;

    if (!last_to_arrive(&a.counters[blockIdx.x], gridDim.y)) return;
    float v = 0.f;
    if (col < n_dim) {
        v = a.bias[col];
        for (int split = 0; split < (int)gridDim.y; split++) v += __ldcg(&a.parts[(size_t)split * n_dim + col]);
        if (a.epilogue == EPILOGUE_STORE) {
            a.out[col] = v;
        } else if (a.epilogue == EPILOGUE_ACTIVATE) {
            a.out[col] = activate(v, a.activation);
        } else {
            v += a.h[col];
            a.h[col] = v;
        }
    }
    if (a.epilogue == EPILOGUE_RESIDUAL) {
        slot_stats(v, min(GEMV_THREADS, n_dim - (int)(blockIdx.x * GEMV_THREADS)), a.stats, blockIdx.x, scratch);
    }
}

// Attention of the step's query against keys 0..=position. The cache is [head, position,
// head_dim], each head's rows contiguous. One block per (head, chunk of ATTN_CHUNK keys): two
// threads per key take its scores (the block whose chunk holds the position first writes
// this token's key and value, rounded as the cache stores them), then the softmax over the
// chunk, then each thread a column of the values. The last chunk of a head to finish merges
// the chunks into out[head * head_dim ..].
#define ATTN_CHUNK 64
#define ATTN_THREADS 128
#define MAX_HEAD_DIM 256
template <typename T>
__device__ void attention(const int* state, const float* qkv, T* k_cache, T* v_cache, float* chunk_acc, float* chunk_ml,
                          int* counters, float* out, int d_model, int head_dim, int n_positions, int max_chunks, float scale) {
    __shared__ float q[MAX_HEAD_DIM];
    __shared__ float p[ATTN_CHUNK];
    __shared__ float chunk_max, chunk_sum;
    int position = state[1], head = blockIdx.x, chunk = blockIdx.y;
    int chunks = position / ATTN_CHUNK + 1;
    if (chunk >= chunks) return;
    int j0 = chunk * ATTN_CHUNK;
    int n = min(ATTN_CHUNK, position + 1 - j0);
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

    int j = threadIdx.x >> 1, half = threadIdx.x & 1;
    float s = 0.f;
    if (j < n) {
        const T* kj = k_cache + base + (size_t)(j0 + j) * head_dim;
        int width = (head_dim + 1) / 2, d0 = half * width, d1 = min(head_dim, d0 + width);
        if (head_dim % 16 == 0) {
#pragma unroll 8
            for (int d = d0; d < d1; d += 8) {
                float kv[8];
                load8(kj, d, kv);
#pragma unroll
                for (int i = 0; i < 8; i++) s += q[d + i] * kv[i];
            }
        } else {
#pragma unroll 8
            for (int d = d0; d < d1; d++) s += q[d] * to_f32(kj[d]);
        }
    }
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    if (half == 0 && j < n) p[j] = s * scale;
    __syncthreads();
    if (threadIdx.x < 32) {
        float m = NEG_INF;
        for (int i = threadIdx.x; i < n; i += 32) m = fmaxf(m, p[i]);
        m = warp_max(m);
        float l = 0.f;
        for (int i = threadIdx.x; i < n; i += 32) {
            float e = expf(p[i] - m);
            p[i] = e;
            l += e;
        }
        l = warp_sum(l);
        if (threadIdx.x == 0) { chunk_max = m; chunk_sum = l; }
    }
    __syncthreads();
    size_t slot = (size_t)head * max_chunks + chunk;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        const T* vd = v_cache + base + (size_t)j0 * head_dim + d;
        float a = 0.f;
#pragma unroll 8
        for (int i = 0; i < n; i++) a += p[i] * to_f32(vd[(size_t)i * head_dim]);
        chunk_acc[slot * head_dim + d] = a;
    }
    if (threadIdx.x == 0) { chunk_ml[slot * 2] = chunk_max; chunk_ml[slot * 2 + 1] = chunk_sum; }

    if (!last_to_arrive(&counters[head], chunks)) return;
    float big = NEG_INF;
    for (int c = 0; c < chunks; c++) big = fmaxf(big, __ldcg(&chunk_ml[((size_t)head * max_chunks + c) * 2]));
    float total = 0.f;
    for (int c = 0; c < chunks; c++) {
        size_t sl = (size_t)head * max_chunks + c;
        total += __ldcg(&chunk_ml[sl * 2 + 1]) * expf(__ldcg(&chunk_ml[sl * 2]) - big);
    }
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.f;
        for (int c = 0; c < chunks; c++) {
            size_t sl = (size_t)head * max_chunks + c;
            a += __ldcg(&chunk_acc[sl * head_dim + d]) * expf(__ldcg(&chunk_ml[sl * 2]) - big);
        }
        out[head * head_dim + d] = a / total;
    }
}

// logits[row] = w[row, :] . LayerNorm_f(h), w row-major [rows, d_model] (the tied wte or
// lm_head); a warp per row, the block's warps striding over the rows. Each block keeps its
// rows' first arg max; the last block picks the step's (NaN never wins), makes it the next
// token and moves the position on.
template <typename T>
__device__ void logits_argmax(const float* h, const float* stats, const float* gamma, const float* beta, float eps, const T* w,
                              float* logits, float* best, int* counters, int* state, int rows, int d_model) {
    extern __shared__ float xs[];
    __shared__ float warp_v[32];
    __shared__ int warp_i[32];
    float mean, rstd;
    combined_stats(stats, d_model, eps, &mean, &rstd);
    for (int k = threadIdx.x; k < d_model; k += blockDim.x) xs[k] = (h[k] - mean) * rstd * gamma[k] + beta[k];
    __syncthreads();
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    for (int row = blockIdx.x * warps + warp; row < rows; row += gridDim.x * warps) {
        const T* wr = w + (size_t)row * d_model;
        float s = 0.f;
        if (d_model % 8 == 0) {
#pragma unroll 8
            for (int k = lane * 8; k < d_model; k += 256) {
                float wv[8];
                load8(wr, k, wv);
#pragma unroll
                for (int j = 0; j < 8; j++) s += wv[j] * xs[k + j];
            }
        } else {
            for (int k = lane; k < d_model; k += 32) s += to_f32(wr[k]) * xs[k];
        }
        s = warp_sum(s);
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
    extern "C" __global__ void __launch_bounds__(STAT_COLUMNS) embed_##SUFFIX(const int* state, const T* wte, const T* wpe, float* h, \
            float* stats, int d_model) {                                                                              \
        embed<T>(state, wte, wpe, h, stats, d_model);                                                                 \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_##SUFFIX(GemvArgs a, const T* w) {               \
        gemv<T>(a, w);                                                                                                \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_##SUFFIX(const int* state, const float* qkv, T* k_cache, \
            T* v_cache, float* chunk_acc, float* chunk_ml, int* counters, float* out, int d_model, int head_dim, int n_positions, \
            int max_chunks, float scale) {                                                                            \
        attention<T>(state, qkv, k_cache, v_cache, chunk_acc, chunk_ml, counters, out, d_model, head_dim, n_positions, max_chunks, scale); \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256) logits_##SUFFIX(const float* h, const float* stats, const float* gamma, \
            const float* beta, float eps, const T* w, float* logits, float* best, int* counters, int* state, int rows, int d_model) { \
        logits_argmax<T>(h, stats, gamma, beta, eps, w, logits, best, counters, state, rows, d_model);               \
    }

INSTANCES(bf16, bf16)
INSTANCES(f32, float)

// Kernels of one GPT-2 decode step at batch 1 (src/graph_decode.rs captures them in a CUDA graph).
// Weights, keys and values are `T` (bf16 kept as its bits, or float); every activation is f32.
// The step reads its token and position from `state` in device memory, so one captured graph
// serves every step: state[0] token, state[1] position, state[2] the step's arg max.

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

// Eight consecutive values; `vec` says they are 16-byte aligned and all in range.
__device__ __forceinline__ void load8(const bf16* p, size_t i, float out[8]) {
    uint4 u = *reinterpret_cast<const uint4*>(p + i);
    unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        out[2 * j] = __uint_as_float(w[j] << 16);
        out[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
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

// h = wte[token] + wpe[position].
template <typename T>
__device__ void embed(const int* state, const T* wte, const T* wpe, float* h, int d_model) {
    int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= d_model) return;
    size_t token = (size_t)state[0], position = (size_t)state[1];
    h[d] = to_f32(wte[token * d_model + d]) + to_f32(wpe[position * d_model + d]);
}

// When `parts` is given, first the residual: h += sum of the product's `n_parts` partial sums
// + bias. Then x = LayerNorm(h) (two passes over h, as torch computes the variance). One block.
__device__ void residual_layernorm(float* h, const float* parts, int n_parts, const float* bias,
                                   const float* gamma, const float* beta, float* x, int d_model, float eps) {
    __shared__ float scratch[32];
    float sum = 0.f;
    for (int d = threadIdx.x; d < d_model; d += blockDim.x) {
        float v = h[d];
        if (parts) {
            float p = bias[d];
            for (int s = 0; s < n_parts; s++) p += parts[(size_t)s * d_model + d];
            v += p;
            h[d] = v;
        }
        sum += v;
    }
    float mean = block_sum(sum, scratch) / d_model;
    float sq = 0.f;
    for (int d = threadIdx.x; d < d_model; d += blockDim.x) {
        float c = h[d] - mean;
        sq += c * c;
    }
    float rstd = rsqrtf(block_sum(sq, scratch) / d_model + eps);
    for (int d = threadIdx.x; d < d_model; d += blockDim.x) x[d] = (h[d] - mean) * rstd * gamma[d] + beta[d];
}

// partial[split, n] = sum over rows k of split `blockIdx.y` of x[k] * w[k, n], w row-major
// [k_dim, n_dim] (Conv1D's layout). A block: 32 column groups of 8 columns (one 16-byte load of
// bf16 each, a warp reading 512 contiguous bytes) times 8 row lanes (the warps).
#define GEMV_THREADS 256
template <typename T>
__device__ void gemv(const float* x, const T* w, float* partial, int k_dim, int n_dim, int rows_per_split) {
    __shared__ float sums[8][GEMV_THREADS + 1];
    int group = threadIdx.x & 31, lane = threadIdx.x >> 5;
    int col0 = (blockIdx.x * 32 + group) * 8;
    int k0 = blockIdx.y * rows_per_split;
    int k1 = min(k0 + rows_per_split, k_dim);
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    bool vec = (n_dim % 8 == 0) && col0 + 8 <= n_dim;
    if (vec) {
#pragma unroll 4
        for (int k = k0 + lane; k < k1; k += 8) {
            float xv = x[k], wv[8];
            load8(w, (size_t)k * n_dim + col0, wv);
#pragma unroll
            for (int j = 0; j < 8; j++) acc[j] += xv * wv[j];
        }
    } else if (col0 < n_dim) {
        for (int k = k0 + lane; k < k1; k += 8) {
            float xv = x[k];
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
    if (col < n_dim) partial[(size_t)blockIdx.y * n_dim + col] = s;
}

// x = activation(sum of partials + bias). Activations as `nn::Activation` numbers them.
__device__ void bias_activation(const float* parts, int n_parts, const float* bias, float* x, int n_dim, int activation) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= n_dim) return;
    float v = bias[n];
    for (int s = 0; s < n_parts; s++) v += parts[(size_t)s * n_dim + n];
    switch (activation) {
        case 0: v = v / (1.f + expf(-1.702f * v)); break;                       // quick_gelu
        case 1: v = 0.5f * v * (1.f + erff(v * 0.70710678118654752f)); break;  // gelu (erf)
        case 2: {                                                                // gelu tanh
            float inner = 0.7978845608028654f * (v + 0.044715f * v * v * v);
            v = 0.5f * v * (1.f + tanhf(inner));
            break;
        }
        case 3: v = fmaxf(v, 0.f); break;                                       // relu
        default: v = v / (1.f + expf(-v)); break;                              // silu
    }
    x[n] = v;
}

// Attention of the step's query against keys 0..=position, one block per (head, chunk of
// ATTN_CHUNK keys), four warps each taking every fourth key with an online softmax. The block
// whose chunk holds the position also finishes q/k/v from the c_attn product's partials and
// writes this token's key and value to the cache. Writes each chunk's max, sum and weighted
// values; `attention_merge` combines the chunks.
#define ATTN_CHUNK 64
#define ATTN_THREADS 128
#define MAX_HEAD_DIM 256
template <typename T>
__device__ void attention_chunk(const int* state, const float* parts, int n_parts, const float* bias, T* k_cache, T* v_cache,
                                float* chunk_acc, float* chunk_ml, int d_model, int head_dim, int max_chunks, float scale) {
    __shared__ float q[MAX_HEAD_DIM], k_new[MAX_HEAD_DIM], v_new[MAX_HEAD_DIM];
    __shared__ float warp_m[4], warp_l[4], warp_acc[4][MAX_HEAD_DIM];
    int position = state[1], head = blockIdx.x, chunk = blockIdx.y;
    int j0 = chunk * ATTN_CHUNK;
    if (j0 > position) return;
    int j1 = min(j0 + ATTN_CHUNK, position + 1);
    bool owns = position < j1;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        int c = head * head_dim + d;
        float qv = bias[c];
        for (int s = 0; s < n_parts; s++) qv += parts[(size_t)s * 3 * d_model + c];
        q[d] = qv;
        if (owns) {
            float kv = bias[d_model + c], vv = bias[2 * d_model + c];
            for (int s = 0; s < n_parts; s++) {
                kv += parts[(size_t)s * 3 * d_model + d_model + c];
                vv += parts[(size_t)s * 3 * d_model + 2 * d_model + c];
            }
            size_t at = (size_t)position * d_model + c;
            // The cache holds T; this step reads back what later steps will read.
            store(k_cache, at, kv);
            store(v_cache, at, vv);
            k_new[d] = to_f32(k_cache[at]);
            v_new[d] = to_f32(v_cache[at]);
        }
    }
    __syncthreads();
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float m = NEG_INF, l = 0.f, acc[MAX_HEAD_DIM / 32];
#pragma unroll
    for (int i = 0; i < MAX_HEAD_DIM / 32; i++) acc[i] = 0.f;
    for (int j = j0 + warp; j < j1; j += 4) {
        const T* kj = k_cache + (size_t)j * d_model + head * head_dim;
        const T* vj = v_cache + (size_t)j * d_model + head * head_dim;
        bool current = j == position;
        float s = 0.f;
        for (int d = lane; d < head_dim; d += 32) s += q[d] * (current ? k_new[d] : to_f32(kj[d]));
        s = warp_sum(s) * scale;
        float m_new = fmaxf(m, s);
        float correction = expf(m - m_new), p = expf(s - m_new);
        l = l * correction + p;
#pragma unroll
        for (int i = 0; i < MAX_HEAD_DIM / 32; i++) {
            int d = lane + 32 * i;
            if (d < head_dim) acc[i] = acc[i] * correction + p * (current ? v_new[d] : to_f32(vj[d]));
        }
        m = m_new;
    }
    if (lane == 0) { warp_m[warp] = m; warp_l[warp] = l; }
#pragma unroll
    for (int i = 0; i < MAX_HEAD_DIM / 32; i++) {
        int d = lane + 32 * i;
        if (d < head_dim) warp_acc[warp][d] = acc[i];
    }
    __syncthreads();
    float big = fmaxf(fmaxf(warp_m[0], warp_m[1]), fmaxf(warp_m[2], warp_m[3]));
    float weight[4], total = 0.f;
    for (int w = 0; w < 4; w++) {
        weight[w] = warp_l[w] > 0.f ? expf(warp_m[w] - big) : 0.f;
        total += warp_l[w] * weight[w];
    }
    size_t slot = (size_t)head * max_chunks + chunk;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.f;
        for (int w = 0; w < 4; w++) if (weight[w] > 0.f) a += warp_acc[w][d] * weight[w];
        chunk_acc[slot * head_dim + d] = a;
    }
    if (threadIdx.x == 0) { chunk_ml[slot * 2] = big; chunk_ml[slot * 2 + 1] = total; }
}

// x[head * head_dim + d] = the softmax-weighted values over every chunk up to the position.
__device__ void attention_merge(const int* state, const float* chunk_acc, const float* chunk_ml, float* x, int head_dim, int max_chunks) {
    int head = blockIdx.x, chunks = state[1] / ATTN_CHUNK + 1;
    float big = NEG_INF;
    for (int c = 0; c < chunks; c++) big = fmaxf(big, chunk_ml[((size_t)head * max_chunks + c) * 2]);
    float total = 0.f;
    for (int c = 0; c < chunks; c++) {
        size_t slot = (size_t)head * max_chunks + c;
        total += chunk_ml[slot * 2 + 1] * expf(chunk_ml[slot * 2] - big);
    }
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.f;
        for (int c = 0; c < chunks; c++) {
            size_t slot = (size_t)head * max_chunks + c;
            a += chunk_acc[slot * head_dim + d] * expf(chunk_ml[slot * 2] - big);
        }
        x[head * head_dim + d] = a / total;
    }
}

// logits[row] = w[row, :] . x, w row-major [rows, d_model] (the tied wte or lm_head); a warp
// per row.
template <typename T>
__device__ void logits_rows(const float* x, const T* w, float* logits, int rows, int d_model) {
    int lane = threadIdx.x & 31;
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const T* wr = w + (size_t)row * d_model;
    float s = 0.f;
    if (d_model % 8 == 0) {
        for (int k = lane * 8; k < d_model; k += 256) {
            float wv[8];
            load8(w, (size_t)row * d_model + k, wv);
#pragma unroll
            for (int j = 0; j < 8; j++) s += wv[j] * x[k + j];
        }
    } else {
        for (int k = lane; k < d_model; k += 32) s += to_f32(wr[k]) * x[k];
    }
    s = warp_sum(s);
    if (lane == 0) logits[row] = s;
}

// The first index of the largest logit (NaN never wins) becomes the next token; the position
// moves on. One block of 1024 threads.
extern "C" __global__ void __launch_bounds__(1024) argmax_advance(const float* logits, int rows, int* state) {
    __shared__ float best_v[1024];
    __shared__ int best_i[1024];
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        float v = logits[r];
        if (v > bv || (bi == 0x7fffffff && v == bv)) { bv = v; bi = r; }
    }
    best_v[threadIdx.x] = bv;
    best_i[threadIdx.x] = bi;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) {
            float ov = best_v[threadIdx.x + half];
            int oi = best_i[threadIdx.x + half];
            if (ov > best_v[threadIdx.x] || (ov == best_v[threadIdx.x] && oi < best_i[threadIdx.x])) {
                best_v[threadIdx.x] = ov;
                best_i[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        int token = best_i[0] == 0x7fffffff ? 0 : best_i[0];
        state[2] = token;
        state[0] = token;
        state[1] += 1;
    }
}

extern "C" __global__ void __launch_bounds__(1024) layernorm_f32(float* h, const float* parts, int n_parts, const float* bias,
        const float* gamma, const float* beta, float* x, int d_model, float eps) {
    residual_layernorm(h, parts, n_parts, bias, gamma, beta, x, d_model, eps);
}

extern "C" __global__ void __launch_bounds__(256) bias_activation_f32(const float* parts, int n_parts, const float* bias, float* x, int n_dim, int activation) {
    bias_activation(parts, n_parts, bias, x, n_dim, activation);
}

extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_merge_f32(const int* state, const float* chunk_acc, const float* chunk_ml, float* x, int head_dim, int max_chunks) {
    attention_merge(state, chunk_acc, chunk_ml, x, head_dim, max_chunks);
}

#define INSTANCES(SUFFIX, T)                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) embed_##SUFFIX(const int* state, const T* wte, const T* wpe, float* h, int d_model) { \
        embed<T>(state, wte, wpe, h, d_model);                                                                        \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) gemv_##SUFFIX(const float* x, const T* w, float* partial, int k_dim, int n_dim, int rows_per_split) { \
        gemv<T>(x, w, partial, k_dim, n_dim, rows_per_split);                                                        \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_chunk_##SUFFIX(const int* state, const float* parts, int n_parts, \
            const float* bias, T* k_cache, T* v_cache, float* chunk_acc, float* chunk_ml, int d_model, int head_dim, int max_chunks, float scale) { \
        attention_chunk<T>(state, parts, n_parts, bias, k_cache, v_cache, chunk_acc, chunk_ml, d_model, head_dim, max_chunks, scale); \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256) logits_##SUFFIX(const float* x, const T* w, float* logits, int rows, int d_model) { \
        logits_rows<T>(x, w, logits, rows, d_model);                                                                  \
    }

INSTANCES(bf16, bf16)
INSTANCES(f32, float)

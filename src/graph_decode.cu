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
// blocks normalise their rows of the input themselves. The attention leaves one partial
// softmax per chunk of keys, merged by attn.c_proj's blocks as they read their rows. So no
// kernel exists only to add up, normalise, merge or activate: a step is 5 x layers + 2 launches.
//
// On sm_90 and later (GRAPH_DECODE_PDL) every kernel after `embed` is launched as a
// programmatic dependent: its blocks start while the kernel before finishes, load what does
// not depend on it (a GEMV its first weight rows, the attention the cache's older keys and
// values, into registers; the logits kernel asks L2 for its first rows) and only then wait for
// it, so the memory stays busy across kernel boundaries.

typedef unsigned short bf16;
#define NEG_INF __int_as_float(0xff800000)

#ifndef GRAPH_DECODE_PDL
#define GRAPH_DECODE_PDL 0
#endif

// Returns once the kernel before has finished and its writes are visible (at once without a
// programmatic launch).
__device__ __forceinline__ void wait_for_previous_kernel() {
#if GRAPH_DECODE_PDL
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel's blocks start as this one's leave room. Called after the wait, so
// that at most two kernels overlap and their prefetches do not crowd L2.
__device__ __forceinline__ void let_next_kernel_start() {
#if GRAPH_DECODE_PDL
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// The 128-byte lines of `bytes` bytes from `p`, into L2; `i` and `step` spread them over threads.
__device__ __forceinline__ void prefetch_bytes(const char* p, size_t bytes, int i, int step) {
    for (size_t at = (size_t)i * 128; at < bytes; at += (size_t)step * 128) prefetch_l2(p + at);
    // A range that starts mid-line ends in one more line.
    if (i == 0 && bytes > 0) prefetch_l2(p + bytes - 1);
}

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __uint_as_float(((unsigned)v) << 16); }

__device__ __forceinline__ void store(float* p, size_t i, float v) { p[i] = v; }
// Round to nearest even, as torch's and burn's f32 -> bf16 casts do.
__device__ __forceinline__ bf16 to_bf16(float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}
__device__ __forceinline__ void store(bf16* p, size_t i, float v) { p[i] = to_bf16(v); }

// Eight values as loaded (bf16 bits or floats), converted only where used: loads kept in
// flight take half the registers in bf16.
template <typename T> struct Raw8;
template <> struct Raw8<bf16> { uint4 u; };
template <> struct Raw8<float> { float4 a, b; };

__device__ __forceinline__ void load_raw8(const bf16* p, Raw8<bf16>& r) { r.u = *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void load_raw8(const float* p, Raw8<float>& r) {
    r.a = *reinterpret_cast<const float4*>(p);
    r.b = *reinterpret_cast<const float4*>(p + 4);
}
// The first `m` (at most 8) values of an unaligned row, the rest zero.
__device__ __forceinline__ void load_some8(const bf16* p, int m, Raw8<bf16>& r) {
    unsigned v[8];
#pragma unroll
    for (int e = 0; e < 8; e++) v[e] = e < m ? (unsigned)p[e] : 0u;
    r.u = make_uint4(v[0] | (v[1] << 16), v[2] | (v[3] << 16), v[4] | (v[5] << 16), v[6] | (v[7] << 16));
}
__device__ __forceinline__ void load_some8(const float* p, int m, Raw8<float>& r) {
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; e++) v[e] = e < m ? p[e] : 0.f;
    r.a = make_float4(v[0], v[1], v[2], v[3]);
    r.b = make_float4(v[4], v[5], v[6], v[7]);
}
// `v` rounded as T stores it, back to raw.
__device__ __forceinline__ void pack8(const float v[8], Raw8<bf16>& r) {
    unsigned b[8];
#pragma unroll
    for (int e = 0; e < 8; e++) b[e] = to_bf16(v[e]);
    r.u = make_uint4(b[0] | (b[1] << 16), b[2] | (b[3] << 16), b[4] | (b[5] << 16), b[6] | (b[7] << 16));
}
__device__ __forceinline__ void pack8(const float v[8], Raw8<float>& r) {
    r.a = make_float4(v[0], v[1], v[2], v[3]);
    r.b = make_float4(v[4], v[5], v[6], v[7]);
}
template <typename T> __device__ __forceinline__ void zero8(Raw8<T>& r);
template <> __device__ __forceinline__ void zero8(Raw8<bf16>& r) { r.u = make_uint4(0, 0, 0, 0); }
template <> __device__ __forceinline__ void zero8(Raw8<float>& r) { r.a = r.b = make_float4(0.f, 0.f, 0.f, 0.f); }

// Eight consecutive values, 16-byte aligned.
__device__ __forceinline__ void unpack8(uint4 u, float out[8]) {
    unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        out[2 * j] = __uint_as_float(w[j] << 16);
        out[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
}
__device__ __forceinline__ void unpack8(const Raw8<bf16>& r, float out[8]) { unpack8(r.u, out); }
__device__ __forceinline__ void unpack8(const Raw8<float>& r, float out[8]) {
    out[0] = r.a.x; out[1] = r.a.y; out[2] = r.a.z; out[3] = r.a.w;
    out[4] = r.b.x; out[5] = r.b.y; out[6] = r.b.z; out[7] = r.b.w;
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

// h = wte[token] + wpe[position] over the STAT_COLUMNS columns of `block`, and their
// statistics. Blocks of STAT_COLUMNS threads.
template <typename T>
__device__ void embed_body(const int* state, const T* wte, const T* wpe, float* h, float* stats, int d_model, int block) {
    __shared__ float scratch[32];
    int d = block * STAT_COLUMNS + threadIdx.x;
    size_t token = (size_t)state[0], position = (size_t)state[1];
    float v = 0.f;
    if (d < d_model) {
        v = to_f32(wte[token * d_model + d]) + to_f32(wpe[position * d_model + d]);
        h[d] = v;
    }
    slot_stats(v, min(STAT_COLUMNS, d_model - block * STAT_COLUMNS), stats, block, scratch);
}

template <typename T>
__device__ void embed(const int* state, const T* wte, const T* wpe, float* h, float* stats, int d_model) {
    wait_for_previous_kernel();
    let_next_kernel_start();
    embed_body(state, wte, wpe, h, stats, d_model, blockIdx.x);
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
#define PROLOGUE_ATTENTION 2  // the input is the attention's chunks merged
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
    // PROLOGUE_ATTENTION: the step's state and the attention's per-chunk results.
    const int* state;
    const float* chunk_acc;
    const float* chunk_ml;
    int head_dim, attn_chunk, max_chunks;
    int k_dim, n_dim, rows_per_split, prologue, epilogue, activation;
};

// Output k of the attention (head k / head_dim): its chunks' partial softmaxes merged.
__device__ float merged_attention(const GemvArgs& a, int k, int chunks) {
    int head = k / a.head_dim, d = k % a.head_dim;
    const float* ml = a.chunk_ml + (size_t)head * a.max_chunks * 2;
    const float* acc = a.chunk_acc + (size_t)head * a.max_chunks * a.head_dim + d;
    float big = NEG_INF;
    for (int c = 0; c < chunks; c++) big = fmaxf(big, ml[2 * c]);
    float total = 0.f, v = 0.f;
    for (int c = 0; c < chunks; c++) {
        float scale = expf(ml[2 * c] - big);
        total += ml[2 * c + 1] * scale;
        v += acc[(size_t)c * a.head_dim] * scale;
    }
    return v / total;
}

// out[n] from x[k] * w[k, n], w row-major [k_dim, n_dim] (Conv1D's layout). A block: 32
// column groups of 8 columns (one 16-byte load of bf16 each, a warp reading 512 contiguous
// bytes of a row) times 8 row lanes (the warps), over the rows of split `blockIdx.y`. Before
// waiting for the kernel before, each thread loads its first GEMV_UNROLL rows of weights (an
// L2 prefetch of the whole tile measured slower: twice the requests); then the block's input
// rows go to shared memory (`xs`, dynamic), normalised or merged if asked.
#define GEMV_THREADS 256
#ifndef GEMV_UNROLL
#define GEMV_UNROLL 8
#endif
template <typename T>
__device__ __forceinline__ bool gemv_preload(const GemvArgs& a, const T* w, int column_block, int split, Raw8<T> (&wr)[GEMV_UNROLL]) {
    int group = threadIdx.x & 31, lane = threadIdx.x >> 5;
    int k0 = split * a.rows_per_split;
    int k1 = min(k0 + a.rows_per_split, a.k_dim);
    int col0 = (column_block * 32 + group) * 8;
    bool vec = (a.n_dim % 8 == 0) && col0 + 8 <= a.n_dim;
    int k = k0 + lane;
    bool first_group = vec && k + 8 * (GEMV_UNROLL - 1) < k1;
    if (first_group) {
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) load_raw8(w + (size_t)(k + 8 * u) * a.n_dim + col0, wr[u]);
    }
    return first_group;
}

// The product of split `split` (of `splits`) of column block `column_block`, once what it
// reads is ready; `first_group`: gemv_preload loaded the first rows into `wr`.
template <typename T>
__device__ void gemv_body(const GemvArgs& a, const T* w, int column_block, int split, int splits, bool first_group,
                          Raw8<T> (&wr)[GEMV_UNROLL]) {
    extern __shared__ float xs[];
    __shared__ float sums[8][GEMV_THREADS + 1];
    __shared__ float scratch[32];
    int group = threadIdx.x & 31, lane = threadIdx.x >> 5;
    int k0 = split * a.rows_per_split;
    int k1 = min(k0 + a.rows_per_split, a.k_dim);
    int n_dim = a.n_dim;
    int col0 = (column_block * 32 + group) * 8;
    bool vec = (n_dim % 8 == 0) && col0 + 8 <= n_dim;
    int k = k0 + lane;
    if (a.prologue == PROLOGUE_LAYERNORM) {
        float mean, rstd;
        combined_stats(a.stats, a.k_dim, a.eps, &mean, &rstd);
        for (int k = k0 + threadIdx.x; k < k1; k += blockDim.x) xs[k - k0] = (a.h[k] - mean) * rstd * a.gamma[k] + a.beta[k];
    } else if (a.prologue == PROLOGUE_ATTENTION) {
        int chunks = a.state[1] / a.attn_chunk + 1;
        for (int k = k0 + threadIdx.x; k < k1; k += blockDim.x) xs[k - k0] = merged_attention(a, k, chunks);
    } else {
        for (int k = k0 + threadIdx.x; k < k1; k += blockDim.x) xs[k - k0] = a.x[k];
    }
    __syncthreads();

    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (first_group) {
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; u++) {
            float xv = xs[k + 8 * u - k0], wv[8];
            unpack8(wr[u], wv);
#pragma unroll
            for (int j = 0; j < 8; j++) acc[j] += xv * wv[j];
        }
        k += 8 * GEMV_UNROLL;
    }
    if (vec) {
        // GEMV_UNROLL rows' loads in flight before their products: the weights are the
        // step's whole cost, and memory only keeps up with many reads outstanding.
        for (; k + 8 * (GEMV_UNROLL - 1) < k1; k += 8 * GEMV_UNROLL) {
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; u++) load_raw8(w + (size_t)(k + 8 * u) * n_dim + col0, wr[u]);
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; u++) {
                float xv = xs[k + 8 * u - k0], wv[8];
                unpack8(wr[u], wv);
#pragma unroll
                for (int j = 0; j < 8; j++) acc[j] += xv * wv[j];
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
    int col = column_block * GEMV_THREADS + threadIdx.x;
    float s = 0.f;
#pragma unroll
    for (int l = 0; l < 8; l++) s += sums[l][threadIdx.x];
    if (col < n_dim) a.parts[(size_t)split * n_dim + col] = s;

    if (!last_to_arrive(&a.counters[column_block], splits)) return;
    float v = 0.f;
    if (col < n_dim) {
        v = a.bias[col];
        for (int sp = 0; sp < splits; sp++) v += __ldcg(&a.parts[(size_t)sp * n_dim + col]);
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
        slot_stats(v, min(GEMV_THREADS, n_dim - column_block * GEMV_THREADS), a.stats, column_block, scratch);
    }
}

template <typename T>
__device__ void gemv(const GemvArgs& a, const T* w) {
    Raw8<T> wr[GEMV_UNROLL];
    bool first_group = gemv_preload(a, w, blockIdx.x, blockIdx.y, wr);
    wait_for_previous_kernel();
    let_next_kernel_start();
    gemv_body(a, w, blockIdx.x, blockIdx.y, gridDim.y, first_group, wr);
}

// Attention of the step's query against keys 0..=position, one block per (head, chunk of
// `chunk` keys). The cache is [head, position, head_dim], each head's rows contiguous. A key
// is read by `lanes_per_key` adjacent lanes, eight of its dimensions each (16 bytes of bf16),
// so a warp reads 32 / lanes_per_key keys at once; a thread holds its ATTN_ITERS keys and
// values in registers, loaded before the wait (the step's own key, not yet in the cache, is
// taken from qkv after it and written to the cache). The block leaves its chunk's softmax
// numerator (un-normalised, against the chunk's max) and its (max, sum) for attn.c_proj.
// `chunk` must be ATTN_ITERS x (ATTN_THREADS / lanes_per_key), as `attention_layout` in
// src/graph_decode.rs makes it: a block covers no more keys than that.
#define ATTN_THREADS 128
#define ATTN_ITERS 8
#define MAX_HEAD_DIM 256
// A thread's keys and values of its chunk, as loaded.
template <typename T, int ITERS> struct AttnRegs { Raw8<T> k[ITERS], v[ITERS]; };

// Loads this thread's keys and values of chunk `c` of `head` (the older keys only: the
// cache's rows written before this step), which need nothing of the step.
template <typename T, int THREADS, int ITERS>
__device__ __forceinline__ void attention_preload(int position, const T* k_cache, const T* v_cache, int head_dim, int n_positions,
                                                  int chunk, int lanes_per_key, int head, int c, AttnRegs<T, ITERS>& r) {
    int j0 = c * chunk, n = min(chunk, position + 1 - j0);
    int t = threadIdx.x;
    int sub = t % lanes_per_key, slot = t / lanes_per_key, keys_per_iter = THREADS / lanes_per_key;
    int d0 = sub * 8, dims = max(0, min(8, head_dim - d0));
    bool vec = head_dim % 8 == 0;
    size_t base = (size_t)head * n_positions * head_dim;
#pragma unroll
    for (int i = 0; i < ITERS; i++) {
        int j = slot + i * keys_per_iter;
        zero8(r.k[i]);
        zero8(r.v[i]);
        if (j < n && dims > 0) {
            size_t at = base + (size_t)(j0 + j) * head_dim + d0;
            if (vec) {
                load_raw8(k_cache + at, r.k[i]);
                load_raw8(v_cache + at, r.v[i]);
            } else {
                load_some8(k_cache + at, dims, r.k[i]);
                load_some8(v_cache + at, dims, r.v[i]);
            }
        }
    }
}

// The chunk's softmax against the step's query, once q, k, v are in `qkv`.
template <typename T, int THREADS, int ITERS>
__device__ void attention_body(int position, const float* qkv, T* k_cache, T* v_cache, float* chunk_acc, float* chunk_ml, int d_model,
                               int head_dim, int n_positions, int max_chunks, int chunk, int lanes_per_key, float scale, int head, int c,
                               AttnRegs<T, ITERS>& r) {
    constexpr int WARPS = THREADS / 32;
    __shared__ float warp_m[WARPS], warp_l[WARPS];
    __shared__ float warp_acc[WARPS][MAX_HEAD_DIM];
    int chunks = position / chunk + 1;
    int j0 = c * chunk, n = min(chunk, position + 1 - j0);
    int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    int sub = t % lanes_per_key, slot = t / lanes_per_key, keys_per_iter = THREADS / lanes_per_key;
    int d0 = sub * 8, dims = max(0, min(8, head_dim - d0));
    size_t base = (size_t)head * n_positions * head_dim;

    const float* qh = qkv + (size_t)head * head_dim + d0;
    float q[8];
#pragma unroll
    for (int e = 0; e < 8; e++) q[e] = e < dims ? qh[e] : 0.f;
    if (c == chunks - 1 && slot == (position - j0) % keys_per_iter && dims > 0) {
        // This thread holds the step's own key: from qkv, rounded as the cache keeps it.
        float kn[8], vn[8];
#pragma unroll
        for (int e = 0; e < 8; e++) {
            kn[e] = e < dims ? qh[d_model + e] : 0.f;
            vn[e] = e < dims ? qh[2 * d_model + e] : 0.f;
        }
        int which = (position - j0) / keys_per_iter;
        size_t at = base + (size_t)position * head_dim + d0;
#pragma unroll
        for (int i = 0; i < ITERS; i++) {
            if (i == which) {
                pack8(kn, r.k[i]);
                pack8(vn, r.v[i]);
            }
        }
        for (int e = 0; e < dims; e++) {
            store(k_cache, at + e, kn[e]);
            store(v_cache, at + e, vn[e]);
        }
    }

    float s[ITERS];
    float m = NEG_INF;
#pragma unroll
    for (int i = 0; i < ITERS; i++) {
        float kf[8], x = 0.f;
        unpack8(r.k[i], kf);
#pragma unroll
        for (int e = 0; e < 8; e++) x += q[e] * kf[e];
        for (int o = lanes_per_key / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
        s[i] = slot + i * keys_per_iter < n ? x * scale : NEG_INF;
        m = fmaxf(m, s[i]);
    }
    m = warp_max(m);
    if (lane == 0) warp_m[warp] = m;
    __syncthreads();
    m = warp_m[0];
    for (int w2 = 1; w2 < WARPS; w2++) m = fmaxf(m, warp_m[w2]);

    float l = 0.f, acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int i = 0; i < ITERS; i++) {
        float p = expf(s[i] - m), vf[8];
        l += p;
        unpack8(r.v[i], vf);
#pragma unroll
        for (int e = 0; e < 8; e++) acc[e] += p * vf[e];
    }
    // Each key's p sits in its lanes_per_key lanes: count it once.
    l = warp_sum(sub == 0 ? l : 0.f);
    for (int o = lanes_per_key; o < 32; o <<= 1) {
#pragma unroll
        for (int e = 0; e < 8; e++) acc[e] += __shfl_xor_sync(0xffffffffu, acc[e], o);
    }
    if (lane == 0) warp_l[warp] = l;
    if (lane < lanes_per_key) {
        for (int e = 0; e < dims; e++) warp_acc[warp][d0 + e] = acc[e];
    }
    __syncthreads();
    size_t at = (size_t)head * max_chunks + c;
    for (int d = t; d < head_dim; d += THREADS) {
        float a = 0.f;
#pragma unroll
        for (int w2 = 0; w2 < WARPS; w2++) a += warp_acc[w2][d];
        chunk_acc[at * head_dim + d] = a;
    }
    if (t == 0) {
        float total = 0.f;
        for (int w2 = 0; w2 < WARPS; w2++) total += warp_l[w2];
        chunk_ml[at * 2] = m;
        chunk_ml[at * 2 + 1] = total;
    }
    // The shared arrays are read above: a next chunk of this block must not overwrite them yet.
    __syncthreads();
}

template <typename T>
__device__ void attention(const int* state, const float* qkv, T* k_cache, T* v_cache, float* chunk_acc, float* chunk_ml,
                          int d_model, int head_dim, int n_positions, int max_chunks, int chunk, int lanes_per_key, float scale) {
    // The position is the step's state, written before the graph began: safe before the wait.
    int position = state[1], head = blockIdx.x, c = blockIdx.y;
    if (c >= position / chunk + 1) return;
    AttnRegs<T, ATTN_ITERS> r;
    attention_preload<T, ATTN_THREADS, ATTN_ITERS>(position, k_cache, v_cache, head_dim, n_positions, chunk, lanes_per_key, head, c, r);
    wait_for_previous_kernel();
    let_next_kernel_start();
    attention_body<T, ATTN_THREADS, ATTN_ITERS>(position, qkv, k_cache, v_cache, chunk_acc, chunk_ml, d_model, head_dim, n_positions, max_chunks,
                                    chunk, lanes_per_key, scale, head, c, r);
}

// logits[row] = w[row, :] . LayerNorm_f(h), w row-major [rows, d_model] (the tied wte or
// lm_head); a warp per row, the block's warps striding over the rows, each warp asking L2 for
// its row two strides ahead. Each block keeps its rows' first arg max; the last block picks
// the step's (NaN never wins), makes it the next token and moves the position on.
#ifndef LOGITS_AHEAD
#define LOGITS_AHEAD 2
#endif
// Asks L2 for this block's first rows (they need nothing of the step).
template <typename T>
__device__ __forceinline__ void logits_prefetch(const T* w, int rows, int d_model, int block, int blocks) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int stride = blocks * warps, first = block * warps + warp;
    size_t row_bytes = (size_t)d_model * sizeof(T);
    for (int a = 0; a < LOGITS_AHEAD; a++) {
        int row = first + a * stride;
        if (row < rows) prefetch_bytes(reinterpret_cast<const char*>(w + (size_t)row * d_model), row_bytes, lane, 32);
    }
}

// Block `block` of `blocks`: its rows' logits and first arg max; the last block to finish
// picks the step's.
template <typename T>
__device__ void logits_body(const float* h, const float* stats, const float* gamma, const float* beta, float eps, const T* w,
                            float* logits, float* best, int* counters, int* state, int rows, int d_model, int block, int blocks) {
    extern __shared__ float xs[];
    __shared__ float warp_v[32];
    __shared__ int warp_i[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int stride = blocks * warps, first = block * warps + warp;
    size_t row_bytes = (size_t)d_model * sizeof(T);
    float mean, rstd;
    combined_stats(stats, d_model, eps, &mean, &rstd);
    for (int k = threadIdx.x; k < d_model; k += blockDim.x) xs[k] = (h[k] - mean) * rstd * gamma[k] + beta[k];
    __syncthreads();
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    for (int row = first; row < rows; row += stride) {
        int ahead = row + LOGITS_AHEAD * stride;
        if (ahead < rows) prefetch_bytes(reinterpret_cast<const char*>(w + (size_t)ahead * d_model), row_bytes, lane, 32);
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
        best[2 * block] = bv;
        best[2 * block + 1] = __int_as_float(bi);
    }
    if (!last_to_arrive(&counters[0], blocks)) return;
    // The blocks' bests, a share a thread, then the warps', then the block's: the order
    // (larger value, then smaller row) is total, so any grouping picks what a scan in block
    // order would. One thread scanning every block's took ~15 us a step (H100).
    bv = NEG_INF;
    bi = 0x7fffffff;
    for (int b = threadIdx.x; b < blocks; b += blockDim.x) {
        float v = __ldcg(&best[2 * b]);
        int i = __float_as_int(__ldcg(&best[2 * b + 1]));
        if (v > bv || (v == bv && i < bi)) { bv = v; bi = i; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float v = __shfl_xor_sync(0xffffffffu, bv, o);
        int i = __shfl_xor_sync(0xffffffffu, bi, o);
        if (v > bv || (v == bv && i < bi)) { bv = v; bi = i; }
    }
    if (lane == 0) { warp_v[warp] = bv; warp_i[warp] = bi; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w2 = 1; w2 < warps; w2++) {
            if (warp_v[w2] > bv || (warp_v[w2] == bv && warp_i[w2] < bi)) { bv = warp_v[w2]; bi = warp_i[w2]; }
        }
        int token = bi == 0x7fffffff ? 0 : bi;
        state[2] = token;
        state[0] = token;
        state[1] += 1;
    }
}


template <typename T>
__device__ void logits_argmax(const float* h, const float* stats, const float* gamma, const float* beta, float eps, const T* w,
                              float* logits, float* best, int* counters, int* state, int rows, int d_model) {
    logits_prefetch(w, rows, d_model, blockIdx.x, gridDim.x);
    wait_for_previous_kernel();
    let_next_kernel_start();
    logits_body(h, stats, gamma, beta, eps, w, logits, best, counters, state, rows, d_model, blockIdx.x, gridDim.x);
}

// ---- The whole step as one kernel ----
// The same phases as the kernels above, run by one grid whose blocks are all resident at once
// (a cooperative launch): between two phases the blocks meet at a grid barrier instead of a
// kernel boundary. Before the barrier each block loads what its next piece of work needs of
// the weights or the cache (as the kernels do before waiting for the kernel before), so the
// memory stays busy while the last blocks finish. Work items of a phase are spread over the
// blocks: block b takes items b, b + blocks, ...

// Every block of the grid arrives; none leaves until all have, and then sees what every block
// wrote before arriving (the fences; plain loads after it see fresh data, as after a kernel
// boundary). One counter: each block adds 1, the first block adds 2^31 - (blocks - 1)
// instead, so that the top bit flips when the last one arrives, whoever it is, and the
// count is back where it started modulo the flip. Measured at ~25 ns an arriving block
// (model-import/results/step-kernel-2026-12-06/, call 2): the arrivals serialise on the one
// word every waiting block also reads.
__device__ void grid_barrier(unsigned* bar) {
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1) : 1u;
        __threadfence();
        unsigned before = atomicAdd(bar, add);
        while (((before ^ *(volatile unsigned*)bar) & 0x80000000u) == 0) {
        }
        __threadfence();
    }
    __syncthreads();
}

// One layer's weights, key/value cache and attention scale (DecodeLayer in src/graph_decode.rs, same
// layout); its products' GemvArgs are built on the host, as the kernels above are launched.
struct DecodeLayer {
    // c_attn, attn.c_proj, c_fc, mlp.c_proj
    const void* weights[4];
    void *k_cache, *v_cache;
    float scale, unused;
};

// The step kernel's parameters (StepArgs in src/graph_decode.rs, same layout). `products`:
// each layer's c_attn, attn.c_proj, c_fc and mlp.c_proj, in device memory (read in place,
// not copied into registers).
struct StepArgs {
    const GemvArgs* products;
    const DecodeLayer* layers;
    const void *wte, *wpe, *lm_head;
    const float *lnf_g, *lnf_b, *h, *stats;
    float *qkv, *logits, *best, *chunk_acc, *chunk_ml;
    int *state, *counters;
    unsigned* barrier;
    float lnf_eps;
    int n_layer, n_embd, n_head, vocab, n_positions, head_dim, max_chunks, attn_chunk, lanes_per_key;
};

#define STEP_THREADS 256
// Keys a thread of the step kernel holds: fewer than the attention kernel's, since the
// kernel's registers are its phases' most, and they bound the blocks an SM holds.
// Blocks an SM must hold: the registers a thread may take follow (65536 / (256 x blocks)).
#ifndef STEP_MIN_BLOCKS
#define STEP_MIN_BLOCKS 4
#endif
// Not to be set from outside: src/graph_decode.rs sizes the attention chunks with it.
#define STEP_ATTN_ITERS 4

template <typename T>
__device__ __noinline__ void gemv_phase(const GemvArgs& a, const T* w, unsigned* barrier) {
    int column_blocks = (a.n_dim + GEMV_THREADS - 1) / GEMV_THREADS;
    int splits = (a.k_dim + a.rows_per_split - 1) / a.rows_per_split;
    int items = column_blocks * splits;
    int item = blockIdx.x;
    Raw8<T> wr[GEMV_UNROLL];
    bool first_group = item < items && gemv_preload(a, w, item % column_blocks, item / column_blocks, wr);
    grid_barrier(barrier);
    for (; item < items; item += gridDim.x) {
        gemv_body(a, w, item % column_blocks, item / column_blocks, splits, first_group, wr);
        first_group = false;
    }
}

template <typename T>
__device__ __noinline__ void attention_phase(const StepArgs& s, const DecodeLayer& L, int position, int attn_items) {
    const int chunk = s.attn_chunk;
    T* kc = (T*)L.k_cache;
    T* vc = (T*)L.v_cache;
    int item = blockIdx.x;
    AttnRegs<T, STEP_ATTN_ITERS> r;
    if (item < attn_items) {
        attention_preload<T, STEP_THREADS, STEP_ATTN_ITERS>(position, kc, vc, s.head_dim, s.n_positions, chunk, s.lanes_per_key,
                                                            item % s.n_head, item / s.n_head, r);
    }
    grid_barrier(s.barrier);
    for (bool first = true; item < attn_items; item += gridDim.x, first = false) {
        int head = item % s.n_head, c = item / s.n_head;
        if (!first) {
            attention_preload<T, STEP_THREADS, STEP_ATTN_ITERS>(position, kc, vc, s.head_dim, s.n_positions, chunk, s.lanes_per_key, head,
                                                                c, r);
        }
        attention_body<T, STEP_THREADS, STEP_ATTN_ITERS>(position, s.qkv, kc, vc, s.chunk_acc, s.chunk_ml, s.n_embd, s.head_dim,
                                                         s.n_positions, s.max_chunks, chunk, s.lanes_per_key, L.scale, head, c, r);
    }
}

template <typename T>
__device__ void decode_step(const StepArgs& s) {
    const int position = s.state[1];
    const int d = s.n_embd;
    for (int b = blockIdx.x; b * STAT_COLUMNS < d; b += gridDim.x) {
        embed_body(s.state, (const T*)s.wte, (const T*)s.wpe, (float*)s.h, (float*)s.stats, d, b);
    }
    const int attn_items = s.n_head * (position / s.attn_chunk + 1);
    for (int l = 0; l < s.n_layer; l++) {
        const GemvArgs* p = s.products + 4 * l;
        const DecodeLayer& L = s.layers[l];
        gemv_phase(p[0], (const T*)L.weights[0], s.barrier);
        attention_phase<T>(s, L, position, attn_items);
        gemv_phase(p[1], (const T*)L.weights[1], s.barrier);
        gemv_phase(p[2], (const T*)L.weights[2], s.barrier);
        gemv_phase(p[3], (const T*)L.weights[3], s.barrier);
    }
    const T* lm_head = (const T*)s.lm_head;
    logits_prefetch(lm_head, s.vocab, d, blockIdx.x, gridDim.x);
    grid_barrier(s.barrier);
    logits_body(s.h, s.stats, s.lnf_g, s.lnf_b, s.lnf_eps, lm_head, s.logits, s.best, s.counters, s.state, s.vocab, d, blockIdx.x,
                gridDim.x);
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
            T* v_cache, float* chunk_acc, float* chunk_ml, int d_model, int head_dim, int n_positions, int max_chunks, int chunk, \
            int lanes_per_key, float scale) {                                                                         \
        attention<T>(state, qkv, k_cache, v_cache, chunk_acc, chunk_ml, d_model, head_dim, n_positions, max_chunks, chunk, \
                     lanes_per_key, scale);                                                                           \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256) logits_##SUFFIX(const float* h, const float* stats, const float* gamma, \
            const float* beta, float eps, const T* w, float* logits, float* best, int* counters, int* state, int rows, int d_model) { \
        logits_argmax<T>(h, stats, gamma, beta, eps, w, logits, best, counters, state, rows, d_model);               \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(STEP_THREADS, STEP_MIN_BLOCKS) decode_step_##SUFFIX(StepArgs s) { decode_step<T>(s); }

INSTANCES(bf16, bf16)
INSTANCES(f32, float)

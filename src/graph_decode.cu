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

// ---- The whole step as one persistent kernel ----
// One block an SM, all resident (a cooperative launch). Each block walks the step's tasks in
// order (embed, then per layer c_attn tiles, attention chunks, attn.c_proj tiles, c_fc tiles,
// mlp.c_proj tiles, then the logits' rows), taking task t of a phase when t falls to it round
// robin. A task waits only for the phase it reads (a counter in device memory that the tasks
// of that phase raise when done), not for the whole grid. One warp of each block streams the
// weights (and the cache's older keys and values) of the block's coming tasks into a ring of
// shared-memory stages with bulk copies, whatever the tasks wait on: so the memory keeps
// streaming while the eight other warps wait for the phase before. Split-K partial sums are
// added in a fixed order: by the task that reads them (q, k, v by the attention; c_fc's by
// mlp.c_proj), or, for the residual products, by the last tile of a column block to finish,
// which also leaves the LayerNorm statistics of its columns. No float atomics.
#define STEP_CONSUMERS 256
#define STEP_THREADS (STEP_CONSUMERS + 32)
#ifndef STEP_STAGES
#define STEP_STAGES 6
#endif
// Stages whose copies the streaming warp keeps in flight at most (cp.async; up to
// STEP_STAGES). One is fastest: with more, the computing warps' own loads (partial sums,
// counters, the cache) queue behind the stream's; step 1.275 ms at 1, 1.357 at 2, 1.396 at 6
// on an H100 (model-import/results/pairs-2026-12-07/, calls 2 and 3). The ring still needs
// its six stages (1.47 ms with three).
#ifndef STEP_INFLIGHT
#define STEP_INFLIGHT 1
#endif
// How the streaming warp fills a stage (one contiguous stretch): 1, one bulk copy by the TMA
// unit; 0, 16-byte cp.async by every lane, measured faster (step 1.467 against 1.669 ms on an
// H100, model-import/results/stream-step-2026-12-07/ call 5).
#ifndef STEP_BULK
#define STEP_BULK 0
#endif
#define STEP_STAGE_BYTES 32768
// A tile's columns: a LayerNorm statistics slot, so a residual tail leaves whole slots.
#define STEP_COLUMNS STAT_COLUMNS
// Ints between two counters: a 128-byte line each.
#define STEP_PAD 32
// (head, chunk) pairs attn.c_proj's tile merges at most.
#define STEP_MERGE 1024

// One layer as the step kernel reads it (StepLayer in src/graph_decode.rs, same layout).
struct StepLayer {
    // c_attn, attn.c_proj, c_fc, mlp.c_proj: weights by column blocks (block c, columns
    // from 256c, as a [k, its width] matrix; the blocks one after another); biases.
    const void* w[4];
    const float* b[4];
    const float* ln1_g;
    const float* ln1_b;
    const float* ln2_g;
    const float* ln2_b;
    void* k_cache;
    void* v_cache;
    // STEP_FOLD: c_attn's G and B (3 n_embd each), c_fc's G and B (inner each), made by
    // step_fold_layernorm: G = w^T g, B = bias + w^T b of the LayerNorm before the product.
    const float* fold[4];
    float ln1_eps, ln2_eps, scale, unused;
};

// The step kernel's parameters (StepArgs in src/graph_decode.rs, same layout). The host sizes
// the tiles; the kernel traps where a buffer is smaller than they need.
struct StepArgs {
    const StepLayer* layers;
    const void* wte;
    const void* wpe;
    const void* lm_head;
    const float* lnf_g;
    const float* lnf_b;
    float* h;
    float* stats;
    float* logits;
    float* best;
    float* parts;
    float* chunk_acc;
    float* chunk_ml;
    int* state;
    int* counters;
    float lnf_eps;
    int n_layer, n_embd, n_head, inner, vocab, n_positions, activation;
    // Rows of a tile of c_attn, attn.c_proj, c_fc, mlp.c_proj.
    int rows[4];
    int attn_keys, max_chunks, logits_rows, parts_per_layer, n_counters, xs_floats;
};

// 1: the LayerNorms before c_attn and c_fc are applied after the product, where its split-K
// partial sums are added up (the attention; mlp.c_proj's prologue):
//   W^T LayerNorm(h) + bias = rstd (W^T (g h) - mean G) + B,  G = W^T g,  B = bias + W^T b,
// so a c_attn or c_fc tile waits only for its own rows of h (its column blocks' residual tails),
// not for every column's statistics. 0: normalised first.
#ifndef STEP_FOLD
#define STEP_FOLD 1
#endif

// 1: c_attn's and c_fc's partial sums reach their readers (the attention; mlp.c_proj's
// prologue) as (value, step serial) pairs, each one 64-bit store, which the readers poll
// themselves. The tile then makes no release and the reader no counter poll before a second
// round trip for the data. Same sums in the same order as 0 (partial sums, then a counter).
// 2: the attention chunks' accumulators and (max, sum) for attn.c_proj as well. Step 1.275 ms
// at 2, 1.288 at 1, 1.297 at 0 on an H100 (pairs-2026-12-07/, call 3), same greedy answers.
#ifndef STEP_LL
#define STEP_LL 2
#endif

#define STEP_EMBED 0
#define STEP_QKV 1
#define STEP_ATTN 2
#define STEP_PROJ 3
#define STEP_FC 4
#define STEP_MLP 5
#define STEP_LOGITS 6

// Keys of an attention chunk at `position`: a multiple of `attn_keys` (what one stage holds
// of both keys and values), the smallest that gives every head's chunks a block of their
// own, at most 256 (a chunk's scores sit in shared memory). A chunk reads its keys' stages,
// then its values'.
__device__ __forceinline__ int chunk_keys(const StepArgs& s, int position) {
#ifdef STEP_CHUNK_KEYS
    // A fixed length (a multiple of attn_keys, at most 256), for checking chunks of several stages.
    return STEP_CHUNK_KEYS;
#endif
    int most = max(s.attn_keys, 256 / s.attn_keys * s.attn_keys), keys = s.attn_keys;
    while (keys < most && s.n_head * (position / keys + 1) > (int)gridDim.x) keys += s.attn_keys;
    return keys;
}
// Keys (or values) of one head a stage holds.
template <typename T>
__device__ __forceinline__ int stage_keys(const StepArgs& s) {
    return STEP_STAGE_BYTES / (s.n_embd / s.n_head * (int)sizeof(T));
}

struct StepShared {
    float sums[STEP_CONSUMERS / 32][STEP_COLUMNS];
    float sc[256];
    float q[256], kn[256], vn[256];
    float red[256];
    float merge_m[STEP_MERGE], merge_l[STEP_MERGE];
    float tot[64];
    float scratch[32];
    float best_v[8];
    int best_i[8];
#if STEP_LL
    // This step's serial: the tag its partial-sum pairs carry.
    unsigned serial;
#endif
    int flag;
    unsigned long long full[STEP_STAGES], empty[STEP_STAGES];
};

// LayerNorm statistics of the layer's two residual points: 0 before c_attn (after the
// embedding or mlp.c_proj), 1 before c_fc (after attn.c_proj). Apart: one point's readers may
// still read while the other's tails write.
__device__ __forceinline__ float* step_stats(const StepArgs& s, int point) {
    return s.stats + point * 2 * ((s.n_embd + STAT_COLUMNS - 1) / STAT_COLUMNS);
}

// A product's shape and tiling: p 0..3 is c_attn, attn.c_proj, c_fc, mlp.c_proj.
struct StepProduct {
    int k, n, rows, col_blocks, splits, parts_at;
};
__device__ StepProduct step_product(const StepArgs& s, int p) {
    StepProduct r;
    r.parts_at = 0;
    for (int q = 0; q <= p; q++) {
        r.k = q == 3 ? s.inner : s.n_embd;
        r.n = q == 0 ? 3 * s.n_embd : q == 2 ? s.inner : s.n_embd;
        r.rows = s.rows[q];
        r.col_blocks = (r.n + STEP_COLUMNS - 1) / STEP_COLUMNS;
        r.splits = (r.k + r.rows - 1) / r.rows;
        if (q < p) r.parts_at += r.splits * r.n;
    }
    return r;
}

// Counters: 0 embed's column blocks done, 1 blocks done with the step, then per layer (at
// `layer_counters` + an offset of StepCounters): c_attn's tiles done per column block, attention
// chunks done per head, attn.c_proj's column blocks added up, c_fc's tiles done per column
// block, mlp.c_proj's column blocks added up, and the two residual products' tiles done per
// column block. So a task waits only for what it reads: an attention head for its q, k and v
// column blocks, an attn.c_proj tile for its heads, an mlp.c_proj tile for its c_fc columns.
struct StepCounters {
    int qkv, attn, resid_o, fc, resid_p, tail_o, tail_p, per_layer;
};
__device__ StepCounters step_counters(const StepArgs& s) {
    int cd = (s.n_embd + STEP_COLUMNS - 1) / STEP_COLUMNS;
    StepCounters c;
    c.qkv = 0;
    c.attn = c.qkv + (3 * s.n_embd + STEP_COLUMNS - 1) / STEP_COLUMNS;
    c.resid_o = c.attn + s.n_head;
    c.fc = c.resid_o + 1;
    c.resid_p = c.fc + (s.inner + STEP_COLUMNS - 1) / STEP_COLUMNS;
    c.tail_o = c.resid_p + 1;
    c.tail_p = c.tail_o + cd;
    c.per_layer = c.tail_p + cd;
    return c;
}
__device__ __forceinline__ int layer_counters(const StepCounters& c, int layer) { return 2 + layer * c.per_layer; }
__device__ __forceinline__ int* step_counter(const StepArgs& s, int index) { return s.counters + (size_t)index * STEP_PAD; }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ unsigned smem_address(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(unsigned long long* bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_address(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect(unsigned long long* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_address(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_address(bar)) : "memory");
}
__device__ __forceinline__ bool mbar_try(unsigned long long* bar, unsigned parity) {
    unsigned done;
    asm volatile(
        "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(done)
        : "r"(smem_address(bar)), "r"(parity)
        : "memory");
    return done != 0;
}
// A hang (a counter never reached: a bug) traps after ~2^31 cycles instead of holding the GPU.
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
    long long start = clock64();
    while (!mbar_try(bar, parity)) {
        if (clock64() - start > (1ll << 31)) __trap();
    }
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, unsigned long long* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_address(dst)),
                 "l"(src), "r"(bytes), "r"(smem_address(bar))
                 : "memory");
}
__device__ __forceinline__ void copy16_async(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_address(dst)), "l"(src) : "memory");
}
// One arrival on `bar` once this thread's cp.asyncs so far have landed.
__device__ __forceinline__ void mbar_arrive_on_copies(unsigned long long* bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_address(bar)) : "memory");
}
// `bytes` (a multiple of 16) from `src` to `dst`, by the warp's lanes (`lane` of 32).
__device__ __forceinline__ void copy_async(char* dst, const char* src, unsigned bytes, int lane) {
    for (unsigned u = lane * 16; u < bytes; u += 32 * 16) copy16_async(dst + u, src + u);
}
__device__ __forceinline__ int load_acquire(const int* p) {
    int v;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ void add_release(int* p, int v) {
    asm volatile("red.release.gpu.global.add.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ int add_acq_rel(int* p, int v) {
    int old;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;" : "=r"(old) : "l"(p), "r"(v) : "memory");
    return old;
}
// The eight computing warps only (the streaming warp never joins).
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(STEP_CONSUMERS) : "memory"); }

__device__ float consumers_sum(float v, StepShared& sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    consumers_sync();
    if (lane == 0) sh.scratch[warp] = v;
    consumers_sync();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < STEP_CONSUMERS / 32; w++) total += sh.scratch[w];
    return total;
}
__device__ float consumers_max(float v, StepShared& sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    consumers_sync();
    if (lane == 0) sh.scratch[warp] = v;
    consumers_sync();
    float m = sh.scratch[0];
#pragma unroll
    for (int w = 1; w < STEP_CONSUMERS / 32; w++) m = fmaxf(m, sh.scratch[w]);
    return m;
}

// Consumers wait until `counter` reaches `target` (thread 0 polls; the acquire also drops the
// SM's L1, so plain loads after the barrier see what the phase wrote). `known`: the counter
// this block last saw reached (targets are fixed within a step).
__device__ void wait_counter(const int* counter, int target, const int*& known, StepShared& sh) {
    if (known == counter) return;
    if (threadIdx.x == 0) {
        long long start = clock64();
        while (load_acquire(counter) < target) {
            if (clock64() - start > (1ll << 31)) __trap();
        }
    }
    consumers_sync();
    known = counter;
}
// Consumers wait until counters [a, a + na), [b, b + nb) and [c, c + nc) all reach `target`:
// a thread polls each, all at once.
__device__ void wait_counters(const StepArgs& s, int a, int na, int b, int nb, int c, int nc, int target) {
    int t = threadIdx.x, i = -1;
    if (t < na) i = a + t;
    else if (t < na + nb) i = b + t - na;
    else if (t < na + nb + nc) i = c + t - na - nb;
    if (i >= 0) {
        const int* counter = step_counter(s, i);
        long long start = clock64();
        while (load_acquire(counter) < target) {
            if (clock64() - start > (1ll << 31)) __trap();
        }
    }
    consumers_sync();
}

// STEP_LL's (value, serial) pairs: after the step's partial sums, an 8-byte aligned region
// holding one pair per partial sum (the host allocates s.parts three times as long, zeroed, so
// no pair carries a serial before its step). The serials: a word of counter 1's line, which
// the end-of-step reset leaves alone.
__device__ __forceinline__ unsigned long long* pairs_after(float* p, size_t floats) {
    return (unsigned long long*)(p + ((floats + 1) & ~(size_t)1));
}
__device__ __forceinline__ unsigned long long* step_pairs(const StepArgs& s) {
    return pairs_after(s.parts, (size_t)s.n_layer * s.parts_per_layer);
}
// STEP_LL >= 2: the chunks' accumulators and (max, sum) as pairs, after each buffer's floats.
__device__ __forceinline__ unsigned long long* chunk_acc_pairs(const StepArgs& s) {
    return pairs_after(s.chunk_acc, (size_t)s.n_layer * s.n_head * s.max_chunks * (s.n_embd / s.n_head));
}
__device__ __forceinline__ unsigned long long* chunk_ml_pairs(const StepArgs& s) {
    return pairs_after(s.chunk_ml, (size_t)s.n_layer * s.n_head * s.max_chunks * 2);
}
__device__ __forceinline__ unsigned* step_serial(const StepArgs& s) { return (unsigned*)s.counters + STEP_PAD + 1; }
__device__ __forceinline__ void store_pair(unsigned long long* p, float v, unsigned serial) {
    unsigned long long x = ((unsigned long long)serial << 32) | __float_as_uint(v);
    asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(x) : "memory");
}
__device__ __forceinline__ unsigned long long load_pair(const unsigned long long* p) {
    unsigned long long x;
    asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(x) : "l"(p) : "memory");
    return x;
}
// A pair's value once it carries `serial` (loaded until it does).
__device__ __forceinline__ float pair_value(const unsigned long long* p, unsigned serial) {
    unsigned long long x = load_pair(p);
    long long start = clock64();
    while ((unsigned)(x >> 32) != serial) {
        if (clock64() - start > (1ll << 31)) __trap();
        x = load_pair(p);
    }
    return __uint_as_float((unsigned)x);
}
// The values of pairs p[j * stride], j < min(m, 8) (the rest 0), once each carries `serial`:
// all loads issued before any is waited for, those not yet written loaded again.
__device__ __forceinline__ void pairs8(const unsigned long long* p, size_t stride, int m, unsigned serial, float out[8]) {
    unsigned long long x[8];
#pragma unroll
    for (int j = 0; j < 8; j++) x[j] = j < m ? load_pair(p + (size_t)j * stride) : (unsigned long long)serial << 32;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        out[j] = (unsigned)(x[j] >> 32) == serial ? __uint_as_float((unsigned)x[j]) : pair_value(p + (size_t)j * stride, serial);
    }
}
// sum_strided over pairs, each waited for until it carries `serial`: the same adds in the same
// order.
__device__ __forceinline__ float sum_pairs(const unsigned long long* p, size_t stride, int n, unsigned serial) {
    float v = 0.f;
    for (int q = 0; q < n; q += 8) {
        float a[8];
        pairs8(p + (size_t)q * stride, stride, n - q, serial, a);
#pragma unroll
        for (int j = 0; j < 8; j++) v += a[j];
    }
    return v;
}

// sum over q < n of p[q * stride], in q's order, with the loads issued eight at a time (a
// loop of dependent adds would otherwise wait on each load in turn).
__device__ __forceinline__ float sum_strided(const float* p, size_t stride, int n) {
    float v = 0.f;
    for (int q = 0; q < n; q += 8) {
        float a[8];
#pragma unroll
        for (int j = 0; j < 8; j++) a[j] = q + j < n ? __ldcg(p + (size_t)(q + j) * stride) : 0.f;
#pragma unroll
        for (int j = 0; j < 8; j++) v += a[j];
    }
    return v;
}

// After the consumers' writes: one release add for the block.
__device__ void signal_counter(int* counter) {
    consumers_sync();
    if (threadIdx.x == 0) add_release(counter, 1);
}

// The step's tasks in order; `f(kind, layer, task)` for this block's.
template <typename F>
__device__ void step_walk(const StepArgs& s, int chunks, F&& f) {
    int blocks = gridDim.x, b = blockIdx.x, offset = 0;
    auto phase = [&](int kind, int layer, int tasks) {
        int first = (b - offset) % blocks;
        if (first < 0) first += blocks;
        for (int t = first; t < tasks; t += blocks) f(kind, layer, t);
        offset = (offset + tasks) % blocks;
    };
    int cd = (s.n_embd + STEP_COLUMNS - 1) / STEP_COLUMNS;
    phase(STEP_EMBED, 0, cd);
    for (int l = 0; l < s.n_layer; l++) {
        StepProduct p0 = step_product(s, 0), p1 = step_product(s, 1), p2 = step_product(s, 2), p3 = step_product(s, 3);
        phase(STEP_QKV, l, p0.col_blocks * p0.splits);
        phase(STEP_ATTN, l, s.n_head * chunks);
        phase(STEP_PROJ, l, p1.col_blocks * p1.splits);
        phase(STEP_FC, l, p2.col_blocks * p2.splits);
        phase(STEP_MLP, l, p3.col_blocks * p3.splits);
    }
    phase(STEP_LOGITS, 0, (s.vocab + s.logits_rows - 1) / s.logits_rows);
}

__device__ __forceinline__ int product_of_kind(int kind) {
    return kind == STEP_QKV ? 0 : kind == STEP_PROJ ? 1 : kind == STEP_FC ? 2 : 3;
}

// The stream of one block's stages: for each task the stages it reads, in walk order. (Also
// asking L2 for the stages 4 to 16 ahead of the fills made the step slower, 1.62 to 2.12
// against 1.47 ms on an H100: model-import/results/step-prefetch-2026-12-07/.)
template <typename T>
__device__ void step_stream(const StepArgs& s, StepShared& sh, char* ring, int position, int chunks) {
    int lane = threadIdx.x & 31;
    int filled = 0;
    const int head_dim = s.n_embd / s.n_head;
    // One stage, `bytes` from `src`: wait until the consumers freed it, then fill it, the
    // copies completing on its `full` barrier.
    auto emit = [&](const void* src, size_t bytes) {
        int at = filled % STEP_STAGES;
        unsigned round = filled / STEP_STAGES;
        unsigned long long* bar = &sh.full[at];
        char* dst = ring + (size_t)at * STEP_STAGE_BYTES;
        if (lane == 0) {
            mbar_wait(&sh.empty[at], (round & 1) ^ 1);
            if (STEP_BULK) mbar_arrive_expect(&sh.full[at], (unsigned)bytes);
        }
        __syncwarp();
        if (STEP_BULK) {
            if (lane == 0 && bytes > 0) bulk_copy(dst, src, (unsigned)bytes, bar);
        } else {
            copy_async(dst, (const char*)src, (unsigned)bytes, lane);
            mbar_arrive_on_copies(bar);
            if (STEP_INFLIGHT < STEP_STAGES) {
                asm volatile("cp.async.commit_group;" ::: "memory");
                asm volatile("cp.async.wait_group %0;" ::"n"(STEP_INFLIGHT - 1) : "memory");
            }
        }
        filled++;
    };
    step_walk(s, chunks, [&](int kind, int layer, int t) {
        const StepLayer& L = s.layers[layer];
        if (kind == STEP_EMBED) return;
        if (kind == STEP_ATTN) {
            int head = t % s.n_head, c = t / s.n_head;
            const int keys = chunk_keys(s, position), per_stage = stage_keys<T>(s);
            int j0 = c * keys;
            int n_old = max(0, min(keys, position - j0));
            // The chunk's keys' stages, then its values'.
            for (int kv = 0; kv < 2; kv++) {
                const T* cache = (const T*)(kv ? L.v_cache : L.k_cache) + ((size_t)head * s.n_positions + j0) * head_dim;
                for (int s0 = 0; s0 < keys; s0 += per_stage) {
                    int sn = max(0, min(per_stage, n_old - s0));
                    emit(cache + (size_t)s0 * head_dim, (size_t)sn * head_dim * sizeof(T));
                }
            }
            return;
        }
        if (kind == STEP_LOGITS) {
            int r0 = t * s.logits_rows, r1 = min(r0 + s.logits_rows, s.vocab);
            const T* src = (const T*)s.lm_head + (size_t)r0 * s.n_embd;
            emit(src, (size_t)(r1 - r0) * s.n_embd * sizeof(T));
            return;
        }
        int p = product_of_kind(kind);
        StepProduct P = step_product(s, p);
        const T* w = (const T*)L.w[p];
        int c = t % P.col_blocks, sp = t / P.col_blocks;
        int k0 = sp * P.rows, k1 = min(k0 + P.rows, P.k);
        int col0 = c * STEP_COLUMNS, ncols = min(STEP_COLUMNS, P.n - col0);
        const int piece_rows = STEP_STAGE_BYTES / (STEP_COLUMNS * (int)sizeof(T));
        // The column block's rows are contiguous, `ncols` wide: a stage is one stretch.
        const T* block = w + (size_t)col0 * P.k;
        for (int r0 = k0; r0 < k1; r0 += piece_rows) {
            int nr = min(piece_rows, k1 - r0);
            emit(block + (size_t)r0 * ncols, (size_t)nr * ncols * sizeof(T));
        }
    });
}

__device__ __forceinline__ float as_stored(float v, const float*) { return v; }
__device__ __forceinline__ float as_stored(float v, const bf16*) { return to_f32(to_bf16(v)); }

// The consumers' side of one stage: wait for it, run `use`, free it.
struct StepRing {
    char* base;
    int piece;
};
template <typename U>
__device__ __forceinline__ void consume_stage(StepShared& sh, StepRing& ring, U&& use) {
    int at = ring.piece % STEP_STAGES;
    unsigned round = ring.piece / STEP_STAGES;
    mbar_wait(&sh.full[at], round & 1);
    use(ring.base + (size_t)at * STEP_STAGE_BYTES);
    __syncwarp();
    if ((threadIdx.x & 31) == 0) mbar_arrive(&sh.empty[at]);
    ring.piece++;
}

// Slot c of `stats`: the statistics of v (one per thread, `count` valid).
__device__ void step_residual_slot(StepShared& sh, float* stats, float v, int c, int count) {
    bool valid = threadIdx.x < count;
    float mean = consumers_sum(valid ? v : 0.f, sh) / count;
    float d = valid ? v - mean : 0.f;
    float m2 = consumers_sum(d * d, sh);
    if (threadIdx.x == 0) {
        stats[2 * c] = mean;
        stats[2 * c + 1] = m2;
    }
}

template <typename T>
__device__ void step_embed(const StepArgs& s, StepShared& sh, int c, int token, int position) {
    int d = c * STEP_COLUMNS + threadIdx.x;
    int count = min(STEP_COLUMNS, s.n_embd - c * STEP_COLUMNS);
    float v = 0.f;
    if (threadIdx.x < count) {
        v = to_f32(((const T*)s.wte)[(size_t)token * s.n_embd + d]) + to_f32(((const T*)s.wpe)[(size_t)position * s.n_embd + d]);
        s.h[d] = v;
    }
    step_residual_slot(sh, step_stats(s, 0), v, c, count);
    signal_counter(step_counter(s, 0));
}

// xs[0 .. k1 - k0) = LayerNorm(h)[k0 .. k1), h's statistics in `stats`.
__device__ void step_layernorm_rows(const StepArgs& s, const float* stats, float* xs, const float* g, const float* b, float eps, int k0,
                                    int k1) {
    float mean, rstd;
    combined_stats(stats, s.n_embd, eps, &mean, &rstd);
    for (int k = k0 + threadIdx.x; k < k1; k += STEP_CONSUMERS) xs[k - k0] = (s.h[k] - mean) * rstd * g[k] + b[k];
}

// A tile of a product: its input rows, its stages, its partial sums; the residual products'
// last tile of a column block adds them up.
template <typename T>
__device__ void step_gemv(const StepArgs& s, StepShared& sh, StepRing& ring, float* xs, int kind, int layer, int t, int position,
                          int chunks, const int*& known) {
    const StepLayer& L = s.layers[layer];
    int p = product_of_kind(kind);
    StepProduct P = step_product(s, p);
    int c = t % P.col_blocks, sp = t / P.col_blocks;
    int k0 = sp * P.rows, k1 = min(k0 + P.rows, P.k);
    int col0 = c * STEP_COLUMNS, ncols = min(STEP_COLUMNS, P.n - col0);
    int cd = (s.n_embd + STEP_COLUMNS - 1) / STEP_COLUMNS;
    float* parts = s.parts + (size_t)layer * s.parts_per_layer;
    const int head_dim = s.n_embd / s.n_head;

    StepCounters cn = step_counters(s);
    int base = layer_counters(cn, layer);
    if (kind == STEP_QKV || kind == STEP_FC) {
        bool qkv = kind == STEP_QKV;
#if STEP_FOLD
        // g h over this tile's rows, once their column blocks' tails wrote them (the tail's
        // release after the tiles' arrivals: splits + 1), or the embedding did.
        int c0 = k0 / STEP_COLUMNS, c1 = (k1 - 1) / STEP_COLUMNS;
        if (qkv && layer == 0) {
            wait_counter(step_counter(s, 0), cd, known, sh);
        } else {
            int tails = qkv ? layer_counters(cn, layer - 1) + cn.tail_p : base + cn.tail_o;
            wait_counters(s, tails + c0, c1 - c0 + 1, 0, 0, 0, 0, step_product(s, qkv ? 3 : 1).splits + 1);
        }
        const float* g = qkv ? L.ln1_g : L.ln2_g;
        for (int k = k0 + threadIdx.x; k < k1; k += STEP_CONSUMERS) xs[k - k0] = g[k] * s.h[k];
#else
        if (qkv) wait_counter(step_counter(s, layer == 0 ? 0 : layer_counters(cn, layer - 1) + cn.resid_p), cd, known, sh);
        else wait_counter(step_counter(s, base + cn.resid_o), cd, known, sh);
        step_layernorm_rows(s, step_stats(s, qkv ? 0 : 1), xs, qkv ? L.ln1_g : L.ln2_g, qkv ? L.ln1_b : L.ln2_b,
                            qkv ? L.ln1_eps : L.ln2_eps, k0, k1);
#endif
    } else if (kind == STEP_MLP) {
        StepProduct F = step_product(s, 2);
        // c_fc's column blocks over this tile's rows.
        int c0 = k0 / STEP_COLUMNS, c1 = (k1 - 1) / STEP_COLUMNS;
#if STEP_LL
        // Each pair waited for where it is added.
        (void)c0, (void)c1;
        const unsigned long long* fpp = step_pairs(s) + (size_t)layer * s.parts_per_layer + F.parts_at;
        const unsigned serial = sh.serial;
        auto fc_at = [&](int k) { return sum_pairs(fpp + k, F.n, F.splits, serial); };
#else
        wait_counters(s, base + cn.fc + c0, c1 - c0 + 1, 0, 0, 0, 0, F.splits);
        const float* fp = parts + F.parts_at;
        auto fc_at = [&](int k) { return sum_strided(fp + k, F.n, F.splits); };
#endif
#if STEP_FOLD || STEP_LL
        // Every column block's attn.c_proj tail: LayerNorm 2's statistics (the fold), and with
        // the pairs the acquire that orders h's writes before mlp.c_proj's tail reads them.
        wait_counter(step_counter(s, base + cn.resid_o), cd, known, sh);
#endif
#if STEP_FOLD
        float mean, rstd;
        combined_stats(step_stats(s, 1), s.n_embd, L.ln2_eps, &mean, &rstd);
        for (int k = k0 + threadIdx.x; k < k1; k += STEP_CONSUMERS) {
            xs[k - k0] = activate(rstd * (fc_at(k) - mean * L.fold[2][k]) + L.fold[3][k], s.activation);
        }
#else
        for (int k = k0 + threadIdx.x; k < k1; k += STEP_CONSUMERS) {
            xs[k - k0] = activate(L.b[2][k] + fc_at(k), s.activation);
        }
#endif
    } else {
        // attn.c_proj: the attention's output rows k0..k1, its chunks merged.
        // The heads of this tile's rows.
#if STEP_LL >= 2
        // Each chunk's pairs waited for where they are read.
        const unsigned serial = sh.serial;
        const unsigned long long* acc = chunk_acc_pairs(s) + (size_t)layer * s.n_head * s.max_chunks * head_dim;
        const unsigned long long* ml = chunk_ml_pairs(s) + (size_t)layer * s.n_head * s.max_chunks * 2;
#else
        wait_counters(s, base + cn.attn + k0 / head_dim, (k1 - 1) / head_dim - k0 / head_dim + 1, 0, 0, 0, 0, chunks);
        const float* acc = s.chunk_acc + (size_t)layer * s.n_head * s.max_chunks * head_dim;
        const float* ml = s.chunk_ml + (size_t)layer * s.n_head * s.max_chunks * 2;
#endif
        int h0 = k0 / head_dim, nh = (k1 - 1) / head_dim - h0 + 1;
        if (nh * chunks > STEP_MERGE || nh > 64) __trap();
        for (int i = threadIdx.x; i < nh * chunks; i += STEP_CONSUMERS) {
            int hh = i / chunks, cc = i % chunks;
            size_t at = ((size_t)(h0 + hh) * s.max_chunks + cc) * 2;
#if STEP_LL >= 2
            float x[8];
            pairs8(ml + at, 1, 2, serial, x);
            sh.merge_m[i] = x[0];
            sh.merge_l[i] = x[1];
#else
            sh.merge_m[i] = ml[at];
            sh.merge_l[i] = ml[at + 1];
#endif
        }
        consumers_sync();
        if (threadIdx.x < nh) {
            int hh = threadIdx.x;
            float big = NEG_INF;
            for (int cc = 0; cc < chunks; cc++) big = fmaxf(big, sh.merge_m[hh * chunks + cc]);
            float total = 0.f;
            for (int cc = 0; cc < chunks; cc++) {
                float f = expf(sh.merge_m[hh * chunks + cc] - big);
                total += sh.merge_l[hh * chunks + cc] * f;
                sh.merge_m[hh * chunks + cc] = f;
            }
            sh.tot[hh] = total;
        }
        consumers_sync();
        for (int k = k0 + threadIdx.x; k < k1; k += STEP_CONSUMERS) {
            int hh = k / head_dim - h0, dd = k % head_dim;
            float v = 0.f;
#if STEP_LL >= 2
            // Eight chunks' pairs at once; the same adds in order.
            const unsigned long long* a = acc + (size_t)(h0 + hh) * s.max_chunks * head_dim + dd;
            for (int c0 = 0; c0 < chunks; c0 += 8) {
                float x[8];
                pairs8(a + (size_t)c0 * head_dim, head_dim, chunks - c0, serial, x);
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    if (c0 + j < chunks) v += x[j] * sh.merge_m[hh * chunks + c0 + j];
                }
            }
#else
            const float* a = acc + (size_t)(h0 + hh) * s.max_chunks * head_dim + dd;
#pragma unroll 4
            for (int cc = 0; cc < chunks; cc++) v += a[(size_t)cc * head_dim] * sh.merge_m[hh * chunks + cc];
#endif
            xs[k - k0] = v / sh.tot[hh];
        }
    }
    consumers_sync();

    int group = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int col = group * 8;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    const int piece_rows = STEP_STAGE_BYTES / (STEP_COLUMNS * (int)sizeof(T));
    for (int r0 = k0; r0 < k1; r0 += piece_rows) {
        int nr = min(piece_rows, k1 - r0);
        consume_stage(sh, ring, [&](const char* stage) {
            if (col < ncols) {
#pragma unroll 4
                for (int r = warp; r < nr; r += STEP_CONSUMERS / 32) {
                    float x = xs[r0 - k0 + r], wv[8];
                    Raw8<T> raw;
                    load_raw8((const T*)stage + (size_t)r * ncols + col, raw);
                    unpack8(raw, wv);
#pragma unroll
                    for (int j = 0; j < 8; j++) acc[j] += x * wv[j];
                }
            }
        });
    }
#pragma unroll
    for (int j = 0; j < 8; j++) sh.sums[warp][col + j] = acc[j];
    consumers_sync();
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < STEP_CONSUMERS / 32; w++) v += sh.sums[w][threadIdx.x];
    float* out = parts + P.parts_at;
#if STEP_LL
    if (kind == STEP_QKV || kind == STEP_FC) {
        if (threadIdx.x < ncols) {
            size_t at = (size_t)layer * s.parts_per_layer + P.parts_at + (size_t)sp * P.n + col0 + threadIdx.x;
            store_pair(step_pairs(s) + at, v, sh.serial);
        }
        // sh.sums is read above: the block's next task must not write it yet.
        consumers_sync();
        return;
    }
#endif
    if (threadIdx.x < ncols) out[(size_t)sp * P.n + col0 + threadIdx.x] = v;

    if (kind == STEP_QKV || kind == STEP_FC) {
        signal_counter(step_counter(s, base + (kind == STEP_QKV ? cn.qkv : cn.fc) + c));
        return;
    }
    // A residual product: the last of the column block's tiles adds them up.
    consumers_sync();
    int tail = base + (kind == STEP_PROJ ? cn.tail_o : cn.tail_p) + c;
    if (threadIdx.x == 0) sh.flag = add_acq_rel(step_counter(s, tail), 1) == P.splits - 1;
    consumers_sync();
    if (!sh.flag) return;
#if STEP_LL >= 2
    // attn.c_proj's tiles made no acquire of their own (the chunks' pairs are relaxed): the
    // acquire that orders the last tails' h before this read (long reached; usually known).
    if (kind == STEP_PROJ) wait_counter(step_counter(s, layer == 0 ? 0 : layer_counters(cn, layer - 1) + cn.resid_p), cd, known, sh);
#endif
    float r = 0.f;
    if (threadIdx.x < ncols) {
        int k = col0 + threadIdx.x;
        r = L.b[p][k] + sum_strided(out + k, P.n, P.splits);
        r += __ldcg(&s.h[k]);
        s.h[k] = r;
    }
    step_residual_slot(sh, step_stats(s, kind == STEP_PROJ ? 1 : 0), r, c, ncols);
    consumers_sync();
    if (threadIdx.x == 0) {
        // This column block's h is written (its tile count reaches splits + 1), then one more of
        // the point's column blocks (with the statistics).
        add_release(step_counter(s, tail), 1);
        add_release(step_counter(s, base + (kind == STEP_PROJ ? cn.resid_o : cn.resid_p)), 1);
    }
}

// Eight dimensions of a key (or value): this step's own from `fresh` (not in the stage), an
// older one from its stage row.
template <typename T>
__device__ __forceinline__ void key_dims8(bool own, const float* fresh, const T* row, float out[8]) {
    if (own) {
#pragma unroll
        for (int e = 0; e < 8; e++) out[e] = fresh[e];
    } else {
        Raw8<T> raw;
        load_raw8(row, raw);
        unpack8(raw, out);
    }
}

// One (head, chunk) of the attention: its softmax numerator and (max, sum), as the attention
// kernel leaves them. q, k, v are c_attn's partial sums added up here.
template <typename T>
__device__ void step_attention(const StepArgs& s, StepShared& sh, StepRing& ring, int layer, int t, int position, int chunks,
                               const int*& known) {
    const StepLayer& L = s.layers[layer];
    StepProduct Q = step_product(s, 0);
    const int head_dim = s.n_embd / s.n_head, d_model = s.n_embd;
    const int keys = chunk_keys(s, position), per_stage = stage_keys<T>(s);
    int head = t % s.n_head, c = t / s.n_head;
    int j0 = c * keys, n = min(keys, position + 1 - j0);
    bool last = c == chunks - 1;
    StepCounters cn = step_counters(s);
    int base = layer_counters(cn, layer) + cn.qkv;
    // The column blocks of this head's q, k and v.
    int q0 = head * head_dim, blocks = (q0 + head_dim - 1) / STEP_COLUMNS - q0 / STEP_COLUMNS + 1;
#if STEP_LL
    // Each pair waited for where it is added.
    const unsigned long long* qpp = step_pairs(s) + (size_t)layer * s.parts_per_layer + Q.parts_at;
    const unsigned serial = sh.serial;
    auto q_sum = [&](int col) { return sum_pairs(qpp + col, Q.n, Q.splits, serial); };
    (void)blocks;
#else
    wait_counters(s, base + q0 / STEP_COLUMNS, blocks, base + (d_model + q0) / STEP_COLUMNS,
                  (d_model + q0 + head_dim - 1) / STEP_COLUMNS - (d_model + q0) / STEP_COLUMNS + 1,
                  base + (2 * d_model + q0) / STEP_COLUMNS,
                  (2 * d_model + q0 + head_dim - 1) / STEP_COLUMNS - (2 * d_model + q0) / STEP_COLUMNS + 1, Q.splits);
    const float* qp = s.parts + (size_t)layer * s.parts_per_layer + Q.parts_at;
    auto q_sum = [&](int col) { return sum_strided(qp + col, Q.n, Q.splits); };
#endif
#if STEP_FOLD || STEP_LL
    // Every column block's tail before c_attn: LayerNorm 1's statistics (the fold), and with
    // the pairs the acquire that orders h's writes before attn.c_proj's tail reads them.
    {
        int cd = (s.n_embd + STEP_COLUMNS - 1) / STEP_COLUMNS;
        wait_counter(step_counter(s, layer == 0 ? 0 : layer_counters(cn, layer - 1) + cn.resid_p), cd, known, sh);
    }
#endif
#if STEP_FOLD
    float mean, rstd;
    combined_stats(step_stats(s, 0), s.n_embd, L.ln1_eps, &mean, &rstd);
    auto qkv_at = [&](int col) { return rstd * (q_sum(col) - mean * L.fold[0][col]) + L.fold[1][col]; };
#else
    auto qkv_at = [&](int col) { return L.b[0][col] + q_sum(col); };
#endif
    for (int e = threadIdx.x; e < head_dim; e += STEP_CONSUMERS) {
        int col = head * head_dim + e;
        sh.q[e] = qkv_at(col);
        if (last) {
            float k = qkv_at(d_model + col);
            float v = qkv_at(2 * d_model + col);
            size_t at = ((size_t)head * s.n_positions + position) * head_dim + e;
            store((T*)L.k_cache, at, k);
            store((T*)L.v_cache, at, v);
            // As the cache keeps them.
            sh.kn[e] = as_stored(k, (const T*)nullptr);
            sh.vn[e] = as_stored(v, (const T*)nullptr);
        }
    }
    consumers_sync();
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // Heads a multiple of eight wide: a key is read by `lpk` adjacent lanes, eight dimensions
    // each (16 bytes of bf16), with q's eight in registers. Others: a warp a key, a lane a
    // dimension (lpk = 0).
    int lpk = 0;
    if (head_dim % 8 == 0) {
        lpk = 1;
        while (lpk * 8 < head_dim) lpk *= 2;
    }
    int sub = lpk ? lane % lpk : lane, d0 = lpk ? sub * 8 : 0;
    bool dims = lpk ? d0 < head_dim : true;
    float q8[8];
#pragma unroll
    for (int e = 0; e < 8; e++) q8[e] = lpk && dims ? sh.q[d0 + e] : 0.f;
    const int stages = (keys + per_stage - 1) / per_stage;
    // Scores, a stage of keys at a time.
    for (int st = 0; st < stages; st++) {
        int s0 = st * per_stage, sn = min(per_stage, n - s0);
        consume_stage(sh, ring, [&](const char* stage) {
            const T* ks = (const T*)stage;
            if (lpk) {
                int per_warp = 32 / lpk;
                for (int j = warp * per_warp + lane / lpk; j - lane / lpk < sn; j += STEP_CONSUMERS / lpk) {
                    float x = 0.f;
                    if (j < sn && dims) {
                        float k8[8];
                        key_dims8(j0 + s0 + j == position, sh.kn + d0, ks + (size_t)j * head_dim + d0, k8);
#pragma unroll
                        for (int e = 0; e < 8; e++) x += q8[e] * k8[e];
                    }
                    for (int o = lpk / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
                    if (sub == 0 && j < sn) sh.sc[s0 + j] = x * L.scale;
                }
            } else {
                for (int j = warp; j < sn; j += STEP_CONSUMERS / 32) {
                    bool own = j0 + s0 + j == position;
                    float x = 0.f;
                    for (int e = lane; e < head_dim; e += 32) x += sh.q[e] * (own ? sh.kn[e] : to_f32(ks[(size_t)j * head_dim + e]));
                    x = warp_sum(x);
                    if (lane == 0) sh.sc[s0 + j] = x * L.scale;
                }
            }
        });
    }
    consumers_sync();
    float sv = threadIdx.x < n ? sh.sc[threadIdx.x] : NEG_INF;
    float m = consumers_max(sv, sh);
    float pv = threadIdx.x < n ? expf(sv - m) : 0.f;
    float l = consumers_sum(pv, sh);
    if (threadIdx.x < n) sh.sc[threadIdx.x] = pv;
    consumers_sync();
    // The values, a stage at a time: with lpk, each thread dimensions d0..d0+8 over its key
    // lane's keys; else thread (g, e) dimension e over keys g, g + groups, ...
    float a8[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    const int key_lanes = lpk ? STEP_CONSUMERS / lpk : 0, groups = STEP_CONSUMERS / head_dim;
    const int e1 = threadIdx.x % head_dim, g1 = threadIdx.x / head_dim;
    for (int st = 0; st < stages; st++) {
        int s0 = st * per_stage, sn = min(per_stage, n - s0);
        consume_stage(sh, ring, [&](const char* stage) {
            const T* vs = (const T*)stage;
            if (lpk) {
                if (!dims) return;
                for (int j = threadIdx.x / lpk; j < sn; j += key_lanes) {
                    float p = sh.sc[s0 + j], v8[8];
                    key_dims8(j0 + s0 + j == position, sh.vn + d0, vs + (size_t)j * head_dim + d0, v8);
#pragma unroll
                    for (int e = 0; e < 8; e++) a8[e] += p * v8[e];
                }
            } else if (g1 < groups) {
                for (int j = g1; j < sn; j += groups)
                    a8[0] += sh.sc[s0 + j] * (j0 + s0 + j == position ? sh.vn[e1] : to_f32(vs[(size_t)j * head_dim + e1]));
            }
        });
    }
    size_t at = ((size_t)layer * s.n_head + head) * s.max_chunks + c;
#if STEP_LL >= 2
    auto put_acc = [&](size_t i, float a) { store_pair(chunk_acc_pairs(s) + i, a, sh.serial); };
    auto put_ml = [&](size_t i, float a) { store_pair(chunk_ml_pairs(s) + i, a, sh.serial); };
#else
    auto put_acc = [&](size_t i, float a) { s.chunk_acc[i] = a; };
    auto put_ml = [&](size_t i, float a) { s.chunk_ml[i] = a; };
#endif
    if (lpk) {
        // The warp's key lanes, then the warps' (in warp order).
        for (int o = lpk; o < 32; o <<= 1) {
#pragma unroll
            for (int e = 0; e < 8; e++) a8[e] += __shfl_xor_sync(0xffffffffu, a8[e], o);
        }
        if (lane < lpk && dims) {
#pragma unroll
            for (int e = 0; e < 8; e++) sh.sums[warp][d0 + e] = a8[e];
        }
        consumers_sync();
        for (int d = threadIdx.x; d < head_dim; d += STEP_CONSUMERS) {
            float a = 0.f;
#pragma unroll
            for (int w = 0; w < STEP_CONSUMERS / 32; w++) a += sh.sums[w][d];
            put_acc(at * head_dim + d, a);
        }
    } else {
        if (g1 < groups) sh.red[g1 * head_dim + e1] = a8[0];
        consumers_sync();
        if (threadIdx.x < head_dim) {
            float a = 0.f;
            for (int g2 = 0; g2 < groups; g2++) a += sh.red[g2 * head_dim + threadIdx.x];
            put_acc(at * head_dim + threadIdx.x, a);
        }
    }
    if (threadIdx.x == 0) {
        put_ml(at * 2, m);
        put_ml(at * 2 + 1, l);
    }
    // sh.sums / sh.red are read above: the next task must not write them yet. (The signal's
    // barrier below.)
#if STEP_LL >= 2
    consumers_sync();
#else
    signal_counter(step_counter(s, layer_counters(cn, layer) + cn.attn + head));
#endif
}

// Rows of the logits; the block's first arg max so far in (bv, bi) per warp.
template <typename T>
__device__ void step_logits(const StepArgs& s, StepShared& sh, StepRing& ring, float* xs, int t, bool& normed, const int*& known,
                            float& bv, int& bi) {
    int cd = (s.n_embd + STEP_COLUMNS - 1) / STEP_COLUMNS;
    if (!normed) {
        StepCounters cn = step_counters(s);
        wait_counter(step_counter(s, layer_counters(cn, s.n_layer - 1) + cn.resid_p), cd, known, sh);
        step_layernorm_rows(s, step_stats(s, 0), xs, s.lnf_g, s.lnf_b, s.lnf_eps, 0, s.n_embd);
        consumers_sync();
        normed = true;
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int r0 = t * s.logits_rows, nr = min(s.logits_rows, s.vocab - r0);
    int d = s.n_embd;
    consume_stage(sh, ring, [&](const char* stage) {
        for (int r = warp; r < nr; r += STEP_CONSUMERS / 32) {
            const T* row = (const T*)stage + (size_t)r * d;
            float x = 0.f;
            if (d % 8 == 0) {
                for (int e = lane * 8; e < d; e += 256) {
                    Raw8<T> raw;
                    float wv[8];
                    load_raw8(row + e, raw);
                    unpack8(raw, wv);
#pragma unroll
                    for (int j = 0; j < 8; j++) x += wv[j] * xs[e + j];
                }
            } else {
                for (int e = lane; e < d; e += 32) x += to_f32(row[e]) * xs[e];
            }
            x = warp_sum(x);
            if (lane == 0) s.logits[r0 + r] = x;
            // Rows come in increasing order: only a larger value replaces (first max).
            if (x > bv || (bi == 0x7fffffff && x == bv)) {
                bv = x;
                bi = r0 + r;
            }
        }
    });
}

// Each warp's (value, index) (every lane holding it) combined into thread 0's, by the total
// order larger value, then smaller index.
__device__ void consumers_best(float& bv, int& bi, StepShared& sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // The arrays may still be read from a combination before.
    consumers_sync();
    if (lane == 0) {
        sh.best_v[warp] = bv;
        sh.best_i[warp] = bi;
    }
    consumers_sync();
    if (threadIdx.x == 0) {
        for (int w = 1; w < STEP_CONSUMERS / 32; w++) {
            if (sh.best_v[w] > bv || (sh.best_v[w] == bv && sh.best_i[w] < bi)) {
                bv = sh.best_v[w];
                bi = sh.best_i[w];
            }
        }
    }
}

// The block's arg max, then the last block's of all: the next token, the position moved on,
// and every counter back to zero for the next step.
__device__ void step_finish(const StepArgs& s, StepShared& sh, float bv, int bi) {
    consumers_best(bv, bi, sh);
    if (threadIdx.x == 0) {
        s.best[2 * blockIdx.x] = bv;
        s.best[2 * blockIdx.x + 1] = __int_as_float(bi);
    }
    consumers_sync();
    if (threadIdx.x == 0) sh.flag = add_acq_rel(step_counter(s, 1), 1) == (int)gridDim.x - 1;
    consumers_sync();
    if (!sh.flag) return;
    bv = NEG_INF;
    bi = 0x7fffffff;
    for (int b = threadIdx.x; b < gridDim.x; b += STEP_CONSUMERS) {
        float v = __ldcg(&s.best[2 * b]);
        int i = __float_as_int(__ldcg(&s.best[2 * b + 1]));
        if (v > bv || (v == bv && i < bi)) {
            bv = v;
            bi = i;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float v = __shfl_xor_sync(0xffffffffu, bv, o);
        int i = __shfl_xor_sync(0xffffffffu, bi, o);
        if (v > bv || (v == bv && i < bi)) {
            bv = v;
            bi = i;
        }
    }
    consumers_best(bv, bi, sh);
    if (threadIdx.x == 0) {
        int token = bi == 0x7fffffff ? 0 : bi;
        s.state[2] = token;
        s.state[0] = token;
        s.state[1] += 1;
#if STEP_LL
        // The next step's pairs carry the next serial (every block read this one at its start).
        *step_serial(s) = sh.serial;
#endif
    }
    // Every block has finished the step (each arrived above after its last task).
    for (int i = threadIdx.x; i < s.n_counters; i += STEP_CONSUMERS) s.counters[(size_t)i * STEP_PAD] = 0;
}

template <typename T>
__device__ void decode_step(const StepArgs& s) {
    __shared__ StepShared sh;
    extern __shared__ __align__(128) char step_dynamic[];
    char* ring = step_dynamic;
    float* xs = (float*)(step_dynamic + (size_t)STEP_STAGES * STEP_STAGE_BYTES);
    const int token = s.state[0], position = s.state[1];
    const int chunks = position / chunk_keys(s, position) + 1;
#if STEP_LL
    // Read before this block arrives at counter 1, so before the last block moves it on.
    if (threadIdx.x == 0) sh.serial = __ldcg(step_serial(s)) + 1;
#endif
    if (threadIdx.x == 0) {
        // The host's sizes against what this step needs.
        StepProduct last = step_product(s, 3);
        int head_dim = s.n_embd / s.n_head, widest = 0;
        for (int p = 0; p < 4; p++) widest = max(widest, s.rows[p]);
        if (last.parts_at + last.splits * last.n > s.parts_per_layer || layer_counters(step_counters(s), s.n_layer) > s.n_counters ||
            chunks > s.max_chunks || head_dim > 256 || s.attn_keys > 256 ||
            2 * (size_t)s.attn_keys * head_dim * sizeof(T) > STEP_STAGE_BYTES ||
            (size_t)s.logits_rows * s.n_embd * sizeof(T) > STEP_STAGE_BYTES || widest > s.xs_floats || s.n_embd > s.xs_floats)
            __trap();
        for (int i = 0; i < STEP_STAGES; i++) {
            // Bulk copies: the streaming lane's one arrival (and the bytes); cp.async: one
            // arrival per lane once its copies land.
            mbar_init(&sh.full[i], STEP_BULK ? 1 : 32);
            mbar_init(&sh.empty[i], STEP_CONSUMERS / 32);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    }
    __syncthreads();
    if (threadIdx.x >= STEP_CONSUMERS) {
        step_stream<T>(s, sh, ring, position, chunks);
        return;
    }
    StepRing r{ring, 0};
    const int* known = nullptr;
    bool normed = false;
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    step_walk(s, chunks, [&](int kind, int layer, int t) {
        if (kind == STEP_EMBED) {
            step_embed<T>(s, sh, t, token, position);
        } else if (kind == STEP_ATTN) {
            step_attention<T>(s, sh, r, layer, t, position, chunks, known);
        } else if (kind == STEP_LOGITS) {
            step_logits<T>(s, sh, r, xs, t, normed, known, bv, bi);
        } else {
            step_gemv<T>(s, sh, r, xs, kind, layer, t, position, chunks, known);
        }
    });
    step_finish(s, sh, bv, bi);
}
#else
template <typename T>
__device__ void decode_step(const StepArgs&) {
    // sm_90's bulk copies and mbarrier transactions: the host launches it only there.
    __trap();
}
#endif

// The step kernel's folded LayerNorm (STEP_FOLD), made once: per column c of w (a [k, n]
// product held by column blocks, as the step kernel reads it), G[c] = sum_k w[k, c] g[k] and
// B[c] = bias[c] + sum_k w[k, c] b[k], in k's order. A thread a column.
template <typename T>
__device__ void fold_layernorm(const T* w, const float* g, const float* b, const float* bias, int k, int n, float* G, float* B) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= n) return;
    int block = c / STEP_COLUMNS, width = min(STEP_COLUMNS, n - block * STEP_COLUMNS);
    const T* column = w + (size_t)block * STEP_COLUMNS * k + (c - block * STEP_COLUMNS);
    float gs = 0.f, bs = 0.f;
    for (int r = 0; r < k; r++) {
        float x = to_f32(column[(size_t)r * width]);
        gs += x * g[r];
        bs += x * b[r];
    }
    G[c] = gs;
    B[c] = bias[c] + bs;
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
    extern "C" __global__ void __launch_bounds__(STEP_THREADS, 1) decode_step_##SUFFIX(StepArgs s) { decode_step<T>(s); } \
    extern "C" __global__ void step_fold_layernorm_##SUFFIX(const T* w, const float* g, const float* b, const float* bias, int k, \
            int n, float* G, float* B) {                                                                              \
        fold_layernorm<T>(w, g, b, bias, k, n, G, B);                                                                 \
    }

INSTANCES(bf16, bf16)
INSTANCES(f32, float)

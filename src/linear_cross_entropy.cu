// The language model's head and its cross-entropy without the whole [tokens, vocabulary]
// logits (src/linear_cross_entropy.rs runs the products and launches these on cubecl's stream;
// NVRTC compiles them). The vocabulary is walked in chunks: for each, cuBLASLt writes the
// chunk's f32 logits, and these kernels fold them into each token's running maximum and sum of
// exponentials (forward), or turn them into the score gradients the next products take
// (backward).
// `src/linear_cross_entropy.rs` prepends:
//   ELEM  the score gradients' type, the products' operand type: 0 f32, 1 bf16, 2 f16

typedef unsigned short u16;
typedef long long i64;

// Kernel parameters, passed by value (cubecl's info words, as one grid-constant argument):
// 64-bit words in the order `src/linear_cross_entropy.rs` writes them.
struct __align__(8) Params {
    i64 rows;       // tokens
    i64 cols;       // vocabulary entries in this chunk
    i64 ld;         // the chunk's logits: elements from one row to the next
    i64 first;      // the chunk's first vocabulary entry
    i64 count_inv;  // f32 bits: 1 / the number of tokens with a target (the loss is their mean)
};

#if ELEM == 0
typedef float elem_t;
__device__ __forceinline__ void store(elem_t* p, i64 i, float x) { p[i] = x; }
#elif ELEM == 1
typedef u16 elem_t;
__device__ __forceinline__ void store(elem_t* p, i64 i, float x) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    p[i] = h;
}
#else
typedef u16 elem_t;
__device__ __forceinline__ void store(elem_t* p, i64 i, float x) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    p[i] = h;
}
#endif

#define NEG_INF (__int_as_float(0xff800000))

// (m, s) and (om, os), each a maximum and a sum of exp(x - maximum), as one such pair. An
// empty pair is (-inf, 0).
__device__ __forceinline__ void merge(float& m, float& s, float om, float os) {
    const float top = fmaxf(m, om);
    if (top == NEG_INF) return;
    s = s * expf(m - top) + os * expf(om - top);
    m = top;
}

// One warp per token (eight a block): the chunk's maximum and sum of exponentials folded into
// the running ones (`prev`, none for the first chunk), and the target's logit picked when the
// target lies in the chunk. `next` is [rows, 3]: maximum, sum, target logit. Targets below 0
// are ignored tokens.
extern "C" __global__ void __launch_bounds__(256) cross_entropy_chunk_stats(
    const float* __restrict__ logits, const int* __restrict__ targets, const float* __restrict__ prev,
    float* __restrict__ next, const __grid_constant__ Params p) {
    const int lane = threadIdx.x & 31;
    const i64 row = (i64)blockIdx.x * 8 + (threadIdx.x >> 5);
    if (row >= p.rows) return;
    const float* x = logits + row * p.ld;
    // Online: a lane's maximum so far and its sum relative to it.
    float m = NEG_INF, s = 0.0f;
    for (i64 j = lane; j < p.cols; j += 32) {
        const float v = x[j];
        if (v > m) {
            s = s * expf(m - v) + 1.0f;
            m = v;
        } else {
            s += expf(v - m);
        }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float om = __shfl_xor_sync(0xffffffffu, m, offset);
        const float os = __shfl_xor_sync(0xffffffffu, s, offset);
        merge(m, s, om, os);
    }
    if (lane != 0) return;
    const i64 target = targets[row];
    float picked = 0.0f;
    if (p.first > 0) {
        merge(m, s, prev[row * 3], prev[row * 3 + 1]);
        picked = prev[row * 3 + 2];
    }
    if (target >= p.first && target < p.first + p.cols) picked = x[target - p.first];
    next[row * 3] = m;
    next[row * 3 + 1] = s;
    next[row * 3 + 2] = picked;
}

// One block: each token's log-sum-exp (`lse`, for the backward), and the loss, the mean over
// tokens with a target of lse - the target's logit, summed in a fixed order.
extern "C" __global__ void __launch_bounds__(256) cross_entropy_finish(
    const float* __restrict__ stats, const int* __restrict__ targets, float* __restrict__ lse,
    float* __restrict__ loss, const __grid_constant__ Params p) {
    __shared__ float partial[8];
    float sum = 0.0f;
    for (i64 row = threadIdx.x; row < p.rows; row += 256) {
        const float l = stats[row * 3] + logf(stats[row * 3 + 1]);
        lse[row] = l;
        if (targets[row] >= 0) sum += l - stats[row * 3 + 2];
    }
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int w = 0; w < 8; ++w) total += partial[w];
        loss[0] = total * __int_as_float((int)p.count_inv);
    }
}

// The chunk's score gradients, d loss / d logit = (softmax - one-hot(target)) * upstream /
// count for tokens with a target and 0 for the others, written contiguous [rows, cols] in the
// products' type. Blocks walk rows (grid y) and, within a row, entries strided by the grid's
// width (grid x).
extern "C" __global__ void __launch_bounds__(256) cross_entropy_chunk_grad(
    const float* __restrict__ logits, const int* __restrict__ targets, const float* __restrict__ lse,
    const float* __restrict__ upstream, elem_t* __restrict__ dlogits, const __grid_constant__ Params p) {
    const float scale = upstream[0] * __int_as_float((int)p.count_inv);
    for (i64 row = blockIdx.y; row < p.rows; row += gridDim.y) {
        const i64 target = targets[row];
        const float coef = target >= 0 ? scale : 0.0f;
        const float l = lse[row];
        const float* x = logits + row * p.ld;
        elem_t* d = dlogits + row * p.cols;
        for (i64 j = (i64)blockIdx.x * 256 + threadIdx.x; j < p.cols; j += (i64)gridDim.x * 256) {
            const float prob = expf(x[j] - l);
            store(d, j, coef * (prob - (p.first + j == target ? 1.0f : 0.0f)));
        }
    }
}

// The optimizer's per-parameter work as three kernels (src/fused_optim.rs launches them on
// cubecl's stream; NVRTC compiles them). With burn's operations an AdamW update is about twelve
// recorded operations per parameter tensor and the global norm four more, which for the
// ~300 tensors of stage 2 is some 5000 operations of host work a step; here it is one launch
// per tensor for the update and one per gradient (plus one) for the norm.
// `src/fused_optim.rs` prepends:
//   GRAD_TYPE  0: the gradient is f32, 1: bf16, 2: f16
// Parameters and moments are f32 (mixed precision's master weights).

typedef unsigned short u16;
typedef long long i64;

// Kernel parameters, passed by value (cubecl's info words, as one grid-constant argument):
// 64-bit words in the order `src/fused_optim.rs` writes them; f32 values as their bits.
struct __align__(8) Params {
    i64 n;              // elements of this tensor (or partial sums, for sum_partials)
    i64 slot;           // sum_squares_partial: this gradient's first slot in `partials`
    i64 decay;          // 1 - lr * weight_decay (1 where the parameter is not decayed)
    i64 grad_scale;     // global-norm clipping's factor
    i64 beta1, one_minus_beta1, beta2, one_minus_beta2;
    i64 sqrt_bias_correction2;
    i64 epsilon;
    i64 step_size;      // lr / bias_correction1
    i64 copy_type;      // adamw_step: 0 none, 1 also write the new parameter in bf16 to
                        // `param_copy`, 2 in f16 (what an autocast forward would cast it to)
};

__device__ __forceinline__ float word(i64 bits) { return __int_as_float((int)bits); }

#if GRAD_TYPE == 0
typedef float grad_t;
__device__ __forceinline__ float load_grad(const grad_t* g, i64 i) { return g[i]; }
#elif GRAD_TYPE == 1
typedef u16 grad_t;
__device__ __forceinline__ float load_grad(const grad_t* g, i64 i) { return __int_as_float(((int)g[i]) << 16); }
#else
typedef u16 grad_t;
__device__ __forceinline__ float load_grad(const grad_t* g, i64 i) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(g[i]));
    return f;
}
#endif

// A thread takes UNROLL elements a grid-stride step apart and loads them all before using any,
// so that it has UNROLL of each load in flight (one at a time left the kernels at about half
// the memory's speed).
#define UNROLL 4

// `x` rounded to 16 bits as burn's cast rounds it (the same PTX conversion): bf16 where
// `type` is 1, f16 where 2.
__device__ __forceinline__ u16 round_to(float x, i64 type) {
    u16 r;
    if (type == 1) asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    else asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}

// PyTorch's AdamW (decoupled decay first, bias-corrected moments, epsilon outside the root),
// in the order src/train/optim.rs's tensor version computes it. The outputs may be the inputs
// (updated in place): each element is read before it is written, by the same thread.
extern "C" __global__ void __launch_bounds__(256) adamw_step(
    const float* param, const grad_t* __restrict__ grad, const float* exp_avg, const float* exp_avg_sq,
    float* param_out, float* exp_avg_out, float* exp_avg_sq_out, u16* __restrict__ param_copy, const __grid_constant__ Params p) {
    const float decay = word(p.decay), grad_scale = word(p.grad_scale);
    const float beta1 = word(p.beta1), one_minus_beta1 = word(p.one_minus_beta1);
    const float beta2 = word(p.beta2), one_minus_beta2 = word(p.one_minus_beta2);
    const float sqrt_bc2 = word(p.sqrt_bias_correction2), epsilon = word(p.epsilon), step_size = word(p.step_size);
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 first = (i64)blockIdx.x * blockDim.x + threadIdx.x; first < p.n; first += stride * UNROLL) {
        float w[UNROLL], g[UNROLL], m[UNROLL], v[UNROLL];
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) {
            const i64 i = first + j * stride;
            const bool inside = i < p.n;
            w[j] = inside ? param[i] : 0.0f;
            g[j] = inside ? load_grad(grad, i) : 0.0f;
            m[j] = inside ? exp_avg[i] : 0.0f;
            v[j] = inside ? exp_avg_sq[i] : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) {
            const i64 i = first + j * stride;
            if (i >= p.n) continue;
            const float gs = g[j] * grad_scale;
            const float mj = m[j] * beta1 + gs * one_minus_beta1;
            const float vj = v[j] * beta2 + gs * gs * one_minus_beta2;
            const float denom = sqrtf(vj) / sqrt_bc2 + epsilon;
            const float wj = w[j] * decay - mj / denom * step_size;
            param_out[i] = wj;
            if (p.copy_type != 0) param_copy[i] = round_to(wj, p.copy_type);
            exp_avg_out[i] = mj;
            exp_avg_sq_out[i] = vj;
        }
    }
}

// The block's sum, in a fixed order (so the norm repeats bit for bit): lanes by shuffles, then
// the warps' sums by the first warp. Every thread of the block must call it.
__device__ float block_sum(float x) {
    __shared__ float warp_sums[32];
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) warp_sums[warp] = x;
    __syncthreads();
    x = (threadIdx.x < (blockDim.x >> 5)) ? warp_sums[lane] : 0.0f;
    if (warp == 0) {
        for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
    }
    return x;
}

// One gradient's sum of squares, a partial sum per block into partials[slot + block].
extern "C" __global__ void __launch_bounds__(256) sum_squares_partial(
    const grad_t* __restrict__ grad, float* __restrict__ partials, const __grid_constant__ Params p) {
    float acc = 0.0f;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 first = (i64)blockIdx.x * blockDim.x + threadIdx.x; first < p.n; first += stride * UNROLL) {
        float g[UNROLL];
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) g[j] = first + j * stride < p.n ? load_grad(grad, first + j * stride) : 0.0f;
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) acc += g[j] * g[j];
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partials[p.slot + blockIdx.x] = acc;
}

// The n partial sums into out[0], by one block.
extern "C" __global__ void __launch_bounds__(256) sum_partials(
    const float* __restrict__ partials, float* __restrict__ out, const __grid_constant__ Params p) {
    float acc = 0.0f;
#pragma unroll 8
    for (i64 i = threadIdx.x; i < p.n; i += blockDim.x) acc += partials[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) out[0] = acc;
}

// What lies between the products of a whole prompt's prefill at batch 1 (`GraphDecoder::prefill`
// in src/graph_decode.rs; appended to src/graph_decode.cu, whose helpers it uses). The products
// are cuBLASLt's, writing f32 sums without their bias; the attention is the flash kernel
// (src/flash_attention.cu) reading q from here and keys and values from the decoder's cache.
// Weights, q, the cache and LayerNorm outputs are bf16 (the products' operands); the residual
// stream stays f32, as in the decode step.

#define ROW_THREADS 256
#define ROW_MAX_PER_THREAD 16  // widths up to ROW_THREADS x 16 = 4096

// LayerNorm of one row held by a block of ROW_THREADS threads, ROW_MAX_PER_THREAD values each
// (`v[i]` is column threadIdx.x + i x ROW_THREADS; zero past `width`), in place.
__device__ void layernorm_row(float v[ROW_MAX_PER_THREAD], int width, const float* gamma, const float* beta, float eps, float* scratch) {
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < ROW_MAX_PER_THREAD; i++) sum += v[i];
    const float mean = block_sum(sum, scratch) / width;
    float m2 = 0.f;
#pragma unroll
    for (int i = 0; i < ROW_MAX_PER_THREAD; i++) {
        const int c = threadIdx.x + i * ROW_THREADS;
        const float d = c < width ? v[i] - mean : 0.f;
        m2 += d * d;
    }
    const float rstd = rsqrtf(block_sum(m2, scratch) / width + eps);
#pragma unroll
    for (int i = 0; i < ROW_MAX_PER_THREAD; i++) {
        const int c = threadIdx.x + i * ROW_THREADS;
        v[i] = c < width ? (v[i] - mean) * rstd * gamma[c] + beta[c] : 0.f;
    }
}

__device__ void store_row(bf16* out, const float v[ROW_MAX_PER_THREAD], int width) {
#pragma unroll
    for (int i = 0; i < ROW_MAX_PER_THREAD; i++) {
        const int c = threadIdx.x + i * ROW_THREADS;
        if (c < width) out[c] = to_bf16(v[i]);
    }
}

// One block per token row. The residual stream first: with `embeds`, h = embeds + wpe (the
// prompt starts at position 0); else h += y + bias (a projection's output). Then, with
// `gamma`, xn = LayerNorm(h) in bf16 for the next product.
extern "C" __global__ void __launch_bounds__(ROW_THREADS) prefill_residual_layernorm(
    float* h, const bf16* embeds, const bf16* wpe, const float* y, const float* bias, const float* gamma,
    const float* beta, float eps, bf16* xn, int width) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    float v[ROW_MAX_PER_THREAD];
#pragma unroll
    for (int i = 0; i < ROW_MAX_PER_THREAD; i++) {
        const int c = threadIdx.x + i * ROW_THREADS;
        v[i] = 0.f;
        if (c < width) {
            const size_t at = row * width + c;
            const float x = embeds ? to_f32(embeds[at]) + to_f32(wpe[at]) : h[at] + y[at] + bias[c];
            h[at] = x;
            v[i] = x;
        }
    }
    if (!gamma) return;
    layernorm_row(v, width, gamma, beta, eps, scratch);
    store_row(xn + row * width, v, width);
}

// c_attn's output y ([tokens, 3 x width], bias not yet added) split: q to `q` ([tokens,
// width]), keys and values into the cache ([heads, n_positions, head_dim] each, the decode
// step's layout).
extern "C" __global__ void prefill_split_qkv(const float* y, const float* bias, bf16* q, bf16* k_cache, bf16* v_cache, int tokens,
                                             int width, int head_dim, int n_positions) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)tokens * 3 * width) return;
    const int col = (int)(i % (3 * width));
    const size_t t = i / (3 * width);
    const float v = y[i] + bias[col];
    const int part = col / width, c = col % width;
    if (part == 0) {
        q[t * width + c] = to_bf16(v);
    } else {
        bf16* cache = part == 1 ? k_cache : v_cache;
        cache[((size_t)(c / head_dim) * n_positions + t) * head_dim + c % head_dim] = to_bf16(v);
    }
}

// out = activation(y + bias) in bf16, over [tokens, width].
extern "C" __global__ void prefill_bias_activation(const float* y, const float* bias, bf16* out, int tokens, int width, int activation) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)tokens * width) return;
    out[i] = to_bf16(activate(y[i] + bias[i % width], activation));
}

// The residual stream's row `row` as the decode step's `h`, with its slot statistics (what
// `embed` leaves), for the logits kernel. Blocks of STAT_COLUMNS threads.
extern "C" __global__ void __launch_bounds__(STAT_COLUMNS) prefill_last_row(const float* rows, int row, float* h, float* stats, int width) {
    __shared__ float scratch[32];
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    float v = 0.f;
    if (d < width) {
        v = rows[(size_t)row * width + d];
        h[d] = v;
    }
    slot_stats(v, min((int)blockDim.x, width - (int)(blockIdx.x * blockDim.x)), stats, blockIdx.x, scratch);
}

// The vision tower's patch embedding as a product: each patch's pixels in the convolution
// weight's order (channel, row, column), rows `k_padded` long (zeros past channels x patch^2,
// so rows stay 16-byte aligned for cuBLASLt). `pixels` is [channels, size, size] f32.
extern "C" __global__ void vision_patches(const float* pixels, bf16* patches, int channels, int size, int patch, int k_padded) {
    const int side = size / patch, per_channel = patch * patch;
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)side * side * k_padded) return;
    const int p = (int)(i / k_padded), e = (int)(i % k_padded);
    float v = 0.f;
    if (e < channels * per_channel) {
        const int c = e / per_channel, ky = (e % per_channel) / patch, kx = e % patch;
        const int y = (p / side) * patch + ky, x = (p % side) * patch + kx;
        v = pixels[((size_t)c * size + y) * size + x];
    }
    patches[i] = to_bf16(v);
}

// One block per token: the class embedding (token 0) or the patch's embedding (`y`, row token
// - 1), plus the position embedding; pre_layrnorm of that is the residual stream `h`, and the
// first layer's layer_norm1 of it goes to `xn` (without `gamma1`: none, the tower runs no layer).
extern "C" __global__ void __launch_bounds__(ROW_THREADS) vision_embeddings(
    const float* y, const float* class_embedding, const float* positions, const float* gamma_pre, const float* beta_pre, float eps_pre,
    float* h, const float* gamma1, const float* beta1, float eps1, bf16* xn, int width) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    float v[ROW_MAX_PER_THREAD];
#pragma unroll
    for (int i = 0; i < ROW_MAX_PER_THREAD; i++) {
        const int c = threadIdx.x + i * ROW_THREADS;
        v[i] = c < width ? (row == 0 ? class_embedding[c] : y[(row - 1) * width + c]) + positions[row * width + c] : 0.f;
    }
    layernorm_row(v, width, gamma_pre, beta_pre, eps_pre, scratch);
#pragma unroll
    for (int i = 0; i < ROW_MAX_PER_THREAD; i++) {
        const int c = threadIdx.x + i * ROW_THREADS;
        if (c < width) h[row * width + c] = v[i];
    }
    if (!gamma1) return;
    layernorm_row(v, width, gamma1, beta1, eps1, scratch);
    store_row(xn + row * width, v, width);
}

// rows x width of `h` from `first_row` on, to `out_bf16` (the projector's input) or, without
// it, to `out_f32` (an identity projector's features).
extern "C" __global__ void vision_take_rows(const float* h, int first_row, int rows, int width, bf16* out_bf16, float* out_f32) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * width) return;
    const float v = h[(size_t)first_row * width + i];
    if (out_bf16) out_bf16[i] = to_bf16(v);
    else out_f32[i] = v;
}

// The prompt's input embeddings: token t is wte[sources[t]] for text (sources[t] >= 0), else
// image feature row -sources[t] - 1 of `features` (the projector's last sums) plus `bias`
// (null: none).
extern "C" __global__ void prefill_splice(const int* sources, const bf16* wte, const float* features, const float* bias, bf16* embeds,
                                          int tokens, int width) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)tokens * width) return;
    const int t = (int)(i / width), c = (int)(i % width);
    const int src = sources[t];
    embeds[i] = src >= 0 ? wte[(size_t)src * width + c]
                         : to_bf16(features[(size_t)(-src - 1) * width + c] + (bias ? bias[c] : 0.f));
}

//! The building blocks shared by the vision tower, the projector and the language model, and the
//! two routes every matrix product and every attention of the model goes through
//! ([`matmul`], [`attention`]), so that faster backend paths (cuBLASLt, flash attention) slot in
//! here without touching the models.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::activation;
use burn::tensor::DType;
use burn::tensor::module::attention as burn_attention;
use burn::tensor::ops::AttentionModuleOptions;

thread_local! {
    static AUTOCAST: std::cell::Cell<Option<DType>> = const { std::cell::Cell::new(None) };
}

/// Mixed precision as PyTorch's autocast does it: while the guard lives, matrix products and
/// attention on this thread compute in `dtype` (bf16) from weights and activations kept in
/// their own dtype (f32 master weights), and a linear layer's output stays in `dtype` (what
/// follows it, attention, GELU, the next product, reads it so); LayerNorm, the loss's softmax
/// and the residual stream stay in f32. The casts are differentiable, so gradients reach the
/// f32 weights.
pub fn autocast(dtype: Option<DType>) -> AutocastGuard {
    AutocastGuard(AUTOCAST.replace(dtype))
}

pub struct AutocastGuard(Option<DType>);

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        AUTOCAST.set(self.0);
    }
}

/// The dtype matrix work runs in for a tensor of `dtype`, under the current autocast.
fn compute_dtype(dtype: DType) -> Option<DType> {
    AUTOCAST.get().filter(|&c| c != dtype)
}

/// The dtype a linear layer computes in under the current autocast, whatever its weight's
/// dtype (f32 master weights, or frozen ones already cast to the compute dtype).
fn product_dtype() -> Option<DType> {
    AUTOCAST.get()
}

/// The one route for matrix products: `[m, k] x [k, n] -> [m, n]`.
pub fn matmul<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    let ([m, k], [_, n]) = (a.dims(), b.dims());
    // burn 0.21's fusion (CUDA, wgpu) may run a product with a dimension of one joined to
    // element-wise work (a bias add, a cast) on a vector kernel that is only valid for some
    // layouts: such products come out wrong or NaN (tracel-ai/burn#5122; found by
    // tests/backend_fuzz.rs). Zero padding to two keeps them off it: a zero row of `a` or column
    // of `b` adds a row or column that is sliced off, a zero inner column/row adds nothing. The
    // inner dimension counts too, because it becomes an outer one in the backward products.
    if (m == 1 || k == 1 || n == 1) && fuses::<B>(&a.device()) && !cublaslt_routes::<B>() {
        let a = if k == 1 { Tensor::cat(vec![a.clone(), a.zeros_like()], 1) } else { a };
        let b = if k == 1 { Tensor::cat(vec![b.clone(), b.zeros_like()], 0) } else { b };
        let a = if m == 1 { Tensor::cat(vec![a.clone(), a.zeros_like()], 0) } else { a };
        let b = if n == 1 { Tensor::cat(vec![b.clone(), b.zeros_like()], 1) } else { b };
        return product(a, b).slice([0..m, 0..n]);
    }
    product(a, b)
}

fn product<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    let dtype = a.dtype();
    match compute_dtype(dtype) {
        Some(c) => gemm(a.cast(c), b.cast(c)).cast(dtype),
        None => gemm(a, b),
    }
}

/// Whether `B` is one of burn's fusing backends (CUDA, wgpu; under autodiff too), whose bugs
/// [`matmul`] and [`attention`] work around. The CPU backends do not fuse: padding there would
/// only double a batch-1 decode step's products.
fn fuses<B: Backend>(device: &B::Device) -> bool {
    B::name(device).contains("fusion")
}

/// Whether products on `B` go to cuBLASLt, which needs none of burn's workarounds.
fn cublaslt_routes<B: Backend>() -> bool {
    #[cfg(feature = "cuda")]
    return crate::cublaslt::routes::<B>();
    #[cfg(not(feature = "cuda"))]
    false
}

/// The backend's product, or cuBLASLt's on CUDA when enabled (`crate::cublaslt`).
fn gemm<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    #[cfg(feature = "cuda")]
    let (a, b) = match crate::cublaslt::try_matmul(a, b) {
        Ok(product) => return product,
        Err(operands) => operands,
    };
    a.matmul(b)
}

/// `x · w + bias` over the last dimension of `x`, with `w` given as `[in, out]` (it may be a
/// transposed view of an `[out, in]` weight). Leading dimensions are flattened into one GEMM.
/// Under autocast the output is in the compute dtype, as PyTorch's autocast leaves a linear
/// layer's: what follows (attention, GELU, the next product) reads half the bytes, and a
/// residual add takes it back into the f32 stream ([`Dropout::add_to`]).
pub fn affine<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    w_in_out: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let [k, n] = w_in_out.dims();
    assert_eq!(dims[D - 1], k, "input width {} does not match weight [in {k}, out {n}]", dims[D - 1]);
    // Under autocast the weight is f32 (cast here each call) or already in the compute dtype
    // (a frozen layer's, cast once a run by `crate::train::frozen`); either way the product
    // computes in the compute dtype, whatever the input's (it may be another layer's output).
    let (x, w_in_out, bias) = match product_dtype() {
        Some(compute) => {
            #[cfg(feature = "cuda")]
            let (x, w_in_out, bias) = match crate::cublaslt::try_autocast_affine(x, w_in_out, bias, compute) {
                Ok(y) => return y,
                Err(operands) => operands,
            };
            let (x, w_in_out) = (x.cast(compute), w_in_out.cast(compute));
            match bias {
                // The product rounds once to the compute dtype, as PyTorch's does.
                None => (x, w_in_out, None),
                // PyTorch's GEMM adds the bias (cast to the compute dtype) to its f32 sums and
                // rounds once; a product in the compute dtype and then a bias add would round
                // twice. So: the operands rounded, multiplied and the bias added in f32.
                Some(b) => {
                    let (x, w_in_out, b) = (x.cast(DType::F32), w_in_out.cast(DType::F32), b.cast(compute).cast(DType::F32));
                    let _f32 = autocast(None);
                    return affine(x, w_in_out, Some(b)).cast(compute);
                }
            }
        }
        None => (x, w_in_out, bias),
    };
    let rows = dims[..D - 1].iter().product::<usize>();
    let y = matmul(x.reshape([rows, k]), w_in_out);
    let y = match bias {
        Some(b) => y + b.unsqueeze::<2>(),
        None => y,
    };
    let mut out = dims;
    out[D - 1] = n;
    y.reshape(out)
}

/// Mean cross-entropy of the rows of `logits` (`[rows, vocabulary]`) against `targets` (one
/// per row; a negative one leaves its row out), computed in f32 whatever the logits' dtype. No
/// row with a target gives 0.
pub fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, targets: &[i64]) -> Tensor<B, 1> {
    let [rows, vocab] = logits.dims();
    assert_eq!(targets.len(), rows, "{} targets for {rows} rows of logits", targets.len());
    if let Some(bad) = targets.iter().find(|&&t| t >= vocab as i64) {
        panic!("target {bad} is outside the vocabulary of {vocab}");
    }
    let device = logits.device();
    let picks: Vec<i64> = targets.iter().map(|&t| t.max(0)).collect();
    let weights: Vec<f32> = targets.iter().map(|&t| if t < 0 { 0.0 } else { 1.0 }).collect();
    let count: f32 = weights.iter().sum();
    let logits = logits.cast(DType::F32);
    let picks = Tensor::<B, 2, Int>::from_data(TensorData::new(picks, [rows, 1]), &device);
    let weights = Tensor::<B, 1>::from_data(TensorData::new(weights, [rows]), (&device, DType::F32));
    let picked = activation::log_softmax(logits, 1).gather(1, picks).reshape([rows]);
    -(picked * weights).sum() / count.max(1.0)
}

/// The one route for the language model's loss: [`cross_entropy`] of the logits
/// `hidden · weightᵀ` (`hidden` `[rows, width]`, `weight` `[vocabulary, width]`). On CUDA under
/// autocast the logits never exist whole (`crate::linear_cross_entropy`: by chunks of the
/// vocabulary, so that no buffer of the vocabulary's size per token is made).
pub fn linear_cross_entropy<B: Backend>(hidden: Tensor<B, 2>, weight: Tensor<B, 2>, targets: &[i64]) -> Tensor<B, 1> {
    #[cfg(feature = "cuda")]
    let (hidden, weight) = match compute_dtype(hidden.dtype()) {
        Some(compute) => {
            let max = crate::linear_cross_entropy::MAX_CHUNK_ELEMENTS;
            match crate::linear_cross_entropy::try_linear_cross_entropy(hidden, weight, targets, compute, max) {
                Ok(loss) => return loss,
                Err(operands) => operands,
            }
        }
        None => (hidden, weight),
    };
    cross_entropy(affine(hidden, weight.transpose(), None), targets)
}

/// The one route for attention: `softmax(q kᵀ · scale + mask) v` over
/// `[batch, heads, tokens, head_dim]`. `masked` is true where a query must not see a key.
/// `dropout` drops attention probabilities while training (as GPT-2's `attn_dropout` does).
/// CUDA takes the flash kernel where it covers the case (`crate::flash`; with dropout, on its
/// training route, in the [`SeededDropout`] form with a seed drawn on the device); otherwise
/// burn's fused attention, or without it under dropout the explicit path.
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    masked: Option<Tensor<B, 4, Bool>>,
    scale: f64,
    dropout: &Dropout,
) -> Tensor<B, 4> {
    let drop = match dropout.is_active::<B>(&q.device()) {
        true => AttentionDropout::Random(dropout.prob),
        false => AttentionDropout::None,
    };
    attention_with(q, k, v, masked, scale, drop)
}

/// [`attention`] of a fused projection `qkv` (`[batch, tokens, 3 · width]`: queries, keys and
/// values side by side, as GPT-2's `c_attn` makes them) split into `heads` heads, the heads'
/// outputs merged back to `[batch, tokens, width]`. While training on CUDA one recorded
/// operation (`crate::flash::try_attention_from_qkv`); otherwise the split, [`attention`] and
/// the merge.
pub fn attention_from_qkv<B: Backend>(qkv: Tensor<B, 3>, heads: usize, masked: Option<Tensor<B, 4, Bool>>, scale: f64, dropout: &Dropout) -> Tensor<B, 3> {
    #[cfg(feature = "cuda")]
    let (qkv, masked) = {
        let drop = match dropout.is_active::<B>(&qkv.device()) {
            true => AttentionDropout::Random(dropout.prob),
            false => AttentionDropout::None,
        };
        let compute = compute_dtype(qkv.dtype());
        match crate::flash::try_attention_from_qkv(qkv, heads, masked, scale, drop, compute) {
            Ok(y) => return y,
            Err(operands) => operands,
        }
    };
    let [b, t, width3] = qkv.dims();
    let width = width3 / 3;
    let part = |i: usize| split_heads(qkv.clone().slice([0..b, 0..t, i * width..(i + 1) * width]), heads);
    merge_heads(attention(part(0), part(1), part(2), masked, scale, dropout))
}

/// [`attention`] with exactly the probabilities `dropout` names dropped, whatever the backend
/// and whether or not gradients are recorded: the flash kernel's dropout written out, so that
/// backends can be checked against each other with dropout on.
pub fn attention_with_seeded_dropout<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    masked: Option<Tensor<B, 4, Bool>>,
    scale: f64,
    dropout: SeededDropout,
) -> Tensor<B, 4> {
    attention_with(q, k, v, masked, scale, AttentionDropout::Seeded(dropout))
}

/// Which probabilities an attention drops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttentionDropout {
    None,
    /// Each with this probability, at random.
    Random(f64),
    /// Those the hash says.
    Seeded(SeededDropout),
}

fn attention_with<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    masked: Option<Tensor<B, 4, Bool>>,
    scale: f64,
    dropout: AttentionDropout,
) -> Tensor<B, 4> {
    let [b, h, t, head_dim] = q.dims();
    if head_dim == 1 && fuses::<B>(&q.device()) {
        // An inner dimension of one makes `q kᵀ` an outer product, which burn 0.21's fusion may
        // get wrong (see `matmul`); a zero column in q, k and v changes no score and adds an
        // output column that is sliced off.
        let pad = |x: Tensor<B, 4>| Tensor::cat(vec![x.clone(), x.zeros_like()], 3);
        return attention_with(pad(q), pad(k), pad(v), masked, scale, dropout).slice([0..b, 0..h, 0..t, 0..1]);
    }
    let dtype = q.dtype();
    if let Some(c) = compute_dtype(dtype) {
        let _full = autocast(None);
        return attention_with(q.cast(c), k.cast(c), v.cast(c), masked, scale, dropout).cast(dtype);
    }
    #[cfg(feature = "cuda")]
    let (q, k, v, masked) = match crate::flash::try_attention(q, k, v, masked, scale, dropout) {
        Ok(out) => return out,
        Err(operands) => operands,
    };
    let scores = || {
        let scores = q.clone().matmul(k.clone().swap_dims(2, 3)) * scale;
        let scores = match masked.clone() {
            Some(masked) => scores.mask_fill(masked, f32::NEG_INFINITY),
            None => scores,
        };
        activation::softmax(scores, 3)
    };
    match dropout {
        AttentionDropout::None => {
            let options = AttentionModuleOptions { scale: Some(scale), softcap: None, is_causal: false };
            // burn 0.21's attention on CUDA in bf16 read the second sequence of a batch wrongly
            // (off by 2.2 at a scale of 1.8) when given GPT-2's q, k, v: one-head views of the
            // fused projection's output; the same values laid out row-major pass (found by
            // tests/backend_fuzz.rs, its gpt2 property; model-import/results/
            // bf16-attention-layout-2026-12-02/). Reshaping through `[b · h, t, d]` gives that
            // layout: a copy only where the view is not already one.
            let row_major = |x: Tensor<B, 4>| {
                let [b, h, t, d] = x.dims();
                x.reshape([b * h, t, d]).reshape([b, h, t, d])
            };
            let (q, k, v) = match fuses::<B>(&q.device()) {
                true => (row_major(q), row_major(k), row_major(v)),
                false => (q, k, v),
            };
            burn_attention(q, k, v, masked, None, options)
        }
        AttentionDropout::Random(prob) => Dropout { prob }.forward(scores()).matmul(v),
        AttentionDropout::Seeded(drop) => {
            let [_, _, tk, _] = k.dims();
            let probabilities = scores();
            let kept = drop.kept::<B>([b, h, t, tk], &q.device()).float().cast(probabilities.dtype());
            (probabilities * kept / (1.0 - drop.prob)).matmul(v)
        }
    }
}

/// Attention dropout as the flash kernel draws it (`src/flash_attention.cu`, which computes the
/// same hash): the probability of query `query` and key `key` in the (batch · heads) slice `bh`
/// is kept when the hash of them and `seed` is at least `prob · 2³²`, so a kernel's backward and
/// a reference written with tensors drop the same probabilities without a stored mask.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeededDropout {
    pub prob: f64,
    pub seed: [u32; 2],
}

impl SeededDropout {
    /// Hashes below this are dropped.
    pub fn drop_below(prob: f64) -> u32 {
        (prob * 4_294_967_296.0).round().clamp(0.0, u32::MAX as f64) as u32
    }

    pub fn keeps(&self, bh: u32, query: u32, key: u32) -> bool {
        let row = mix32(mix32(self.seed[0] ^ mix32(bh ^ self.seed[1])).wrapping_add(query));
        mix32(row ^ key.wrapping_mul(0x9e37_79b9)) >= Self::drop_below(self.prob)
    }

    /// Whether element `index` (row-major) of a tensor survives: the residual dropout kernel's
    /// rule (`crate::fused_ops::try_residual_dropout`, `src/fused_ops.cu`'s `kept`).
    pub fn keeps_element(&self, index: u64) -> bool {
        let (lo, hi) = (index as u32, (index >> 32) as u32);
        let h = mix32(mix32(self.seed[0] ^ lo) ^ mix32(self.seed[1].wrapping_add(hi.wrapping_mul(0x9e37_79b9))));
        h >= Self::drop_below(self.prob)
    }

    /// Which of `[batch, heads, queries, keys]` probabilities are kept.
    pub fn kept<B: Backend>(&self, [b, h, tq, tk]: [usize; 4], device: &B::Device) -> Tensor<B, 4, Bool> {
        let mut keep = Vec::with_capacity(b * h * tq * tk);
        for bh in 0..b * h {
            for query in 0..tq {
                keep.extend((0..tk).map(|key| self.keeps(bh as u32, query as u32, key as u32)));
            }
        }
        Tensor::from_data(TensorData::new(keep, [b, h, tq, tk]), device)
    }
}

/// lowbias32 (Chris Wellons' integer hash): a bijection of 32-bit words whose every output bit
/// depends on every input bit.
fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// Activation functions by their transformers names (`ACT2FN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`, CLIP's.
    QuickGelu,
    /// Exact erf GELU (`gelu`, `nn.GELU()`), llm-jp's and the projector's.
    Gelu,
    /// Tanh approximation (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`), GPT-2's default.
    GeluTanh,
    Relu,
    Silu,
}

impl Activation {
    pub fn parse(name: &str) -> Result<Self, String> {
        Ok(match name {
            "quick_gelu" => Self::QuickGelu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            _ => {
                return Err(
                    "one of quick_gelu, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu".into()
                )
            }
        })
    }

    pub fn forward<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        #[cfg(feature = "cuda")]
        let x = match self {
            Self::Gelu => crate::fused_ops::try_gelu(x, crate::fused_ops::Gelu::Erf),
            Self::QuickGelu => crate::fused_ops::try_gelu(x, crate::fused_ops::Gelu::Quick),
            _ => Err(x),
        };
        #[cfg(feature = "cuda")]
        let x = match x {
            Ok(y) => return y,
            Err(x) => x,
        };
        match self {
            Self::QuickGelu => x.clone() * activation::sigmoid(x * 1.702),
            Self::Gelu => gelu_erf(x),
            Self::GeluTanh => activation::gelu_approximate(x),
            Self::Relu => activation::relu(x),
            Self::Silu => activation::silu(x),
        }
    }
}

/// Exact GELU, `x · Φ(x)` with `Φ(x) = (1 + erf(x/√2)) / 2`, written out in tensor ops so that
/// autodiff differentiates it exactly. burn 0.21's own `gelu` has an exact forward, but its
/// default `gelu_backward` (used by ndarray, wgpu and CUDA; flex overrides it) is the derivative
/// of the tanh approximation: gradients off by up to ~1e-3 relative, found by the backend fuzzer.
pub fn gelu_erf<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let cdf = (x.clone() * std::f64::consts::FRAC_1_SQRT_2).erf().add_scalar(1.0).mul_scalar(0.5);
    x * cdf
}

/// PyTorch's `nn.Linear`: weight stored `[out, in]`, as in the checkpoint.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Linear<B> {
    /// PyTorch's default initialisation (uniform in ±1/sqrt(in)); imports overwrite it.
    pub fn new(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Self {
        let bound = 1.0 / (d_in as f64).sqrt();
        let dist = burn::tensor::Distribution::Uniform(-bound, bound);
        Self {
            weight: Param::from_tensor(Tensor::random([d_out, d_in], dist, device)),
            bias: bias.then(|| Param::from_tensor(Tensor::random([d_out], dist, device))),
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        affine(x, self.weight.val().transpose(), self.bias.as_ref().map(|b| b.val()))
    }

    /// `layers` applied to the same input as one product: their outputs side by side.
    pub fn forward_stacked<const D: usize>(layers: &[&Self], x: Tensor<B, D>) -> Tensor<B, D> {
        // In the first weight's dtype: a frozen layer's may be cast already (`train::frozen`)
        // where a trained one beside it is f32.
        let dtype = layers.first().expect("at least one layer").weight.val().dtype();
        let weight = Tensor::cat(layers.iter().map(|l| in_dtype(l.weight.val(), dtype)).collect(), 0);
        let bias = layers.iter().any(|l| l.bias.is_some()).then(|| {
            let zeros = |l: &Self| Tensor::<B, 1>::zeros([l.weight.dims()[0]], &x.device()).cast(dtype);
            let part = |l: &Self| l.bias.as_ref().map_or_else(|| zeros(l), |b| in_dtype(b.val(), dtype));
            Tensor::cat(layers.iter().map(|l| part(l)).collect(), 0)
        });
        affine(x, weight.transpose(), bias)
    }
}

/// `t` in `dtype` (itself when it is already).
fn in_dtype<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype { t } else { t.cast(dtype) }
}

/// GPT-2's `Conv1D`: a linear layer whose weight is stored `[in, out]`, optionally with a LoRA
/// update beside it.
#[derive(Module, Debug)]
pub struct Conv1D<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Param<Tensor<B, 1>>,
    pub lora: Option<LoraAdapter<B>>,
}

impl<B: Backend> Conv1D<B> {
    /// GPT-2's initialisation: normal(0, 0.02) weights, zero bias.
    pub fn new(d_in: usize, d_out: usize, device: &B::Device) -> Self {
        let dist = burn::tensor::Distribution::Normal(0.0, 0.02);
        Self {
            weight: Param::from_tensor(Tensor::random([d_in, d_out], dist, device)),
            bias: Param::from_tensor(Tensor::zeros([d_out], device)),
            lora: None,
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match &self.lora {
            None => affine(x, self.weight.val(), Some(self.bias.val())),
            Some(lora) => affine(x.clone(), self.weight.val(), Some(self.bias.val())) + lora.forward(x),
        }
    }

    /// Folds the LoRA update into the weight (`W + (B A)ᵀ · alpha / r`) and drops the adapter.
    pub fn merge_lora(mut self) -> Self {
        if let Some(lora) = self.lora.take() {
            let merged = self.weight.val() + lora.delta_in_out();
            self.weight = Param::from_tensor(merged.detach());
        }
        self
    }
}

/// A LoRA adapter: `x -> dropout(x) Aᵀ Bᵀ · alpha / r`, in PEFT's layouts (`lora_A` `[r, in]`,
/// `lora_B` `[out, r]`) and initialisation (A as `nn.Linear`'s default, B zero, so training
/// starts from the base model's function).
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    pub lora_a: Param<Tensor<B, 2>>,
    pub lora_b: Param<Tensor<B, 2>>,
    pub scaling: f64,
    pub dropout: Dropout,
}

impl<B: Backend> LoraAdapter<B> {
    pub fn new(d_in: usize, d_out: usize, r: usize, alpha: f64, dropout: f64, device: &B::Device) -> Self {
        let bound = 1.0 / (d_in as f64).sqrt();
        Self {
            lora_a: Param::from_tensor(Tensor::random([r, d_in], burn::tensor::Distribution::Uniform(-bound, bound), device)),
            lora_b: Param::from_tensor(Tensor::zeros([d_out, r], device)),
            scaling: alpha / r as f64,
            dropout: Dropout { prob: dropout },
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let h = affine(self.dropout.forward(x), self.lora_a.val().transpose(), None);
        affine(h, self.lora_b.val().transpose(), None) * self.scaling
    }

    /// The update as an `[in, out]` matrix.
    pub fn delta_in_out(&self) -> Tensor<B, 2> {
        matmul(self.lora_a.val().transpose(), self.lora_b.val().transpose()) * self.scaling
    }
}

/// PyTorch's `nn.LayerNorm` over the last dimension (biased variance, eps inside the root),
/// with PyTorch's parameter names.
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub bias: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> LayerNorm<B> {
    pub fn new(d: usize, eps: f64, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([d], device)),
            bias: Param::from_tensor(Tensor::zeros([d], device)),
            eps,
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        self.forward_in(x, dtype)
    }

    /// The output as a linear layer reads it: under autocast in the compute dtype, the value
    /// autocast's cast on the way into the product gives (on CUDA the kernel writes it so, with
    /// no f32 copy and no cast pass); as [`Self::forward`] otherwise.
    pub fn forward_to_product<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = compute_dtype(self.weight.val().dtype()).unwrap_or(x.dtype());
        self.forward_in(x, dtype)
    }

    fn forward_in<const D: usize>(&self, x: Tensor<B, D>, out: DType) -> Tensor<B, D> {
        #[cfg(feature = "cuda")]
        let x = match crate::fused_ops::try_layer_norm(x, self.weight.val(), self.bias.val(), self.eps, out) {
            Ok(y) => return y,
            Err((x, _, _)) => x,
        };
        let (var, mean) = x.clone().var_mean_bias(D - 1);
        let x = (x - mean) / (var + self.eps).sqrt();
        let y = x * self.weight.val().unsqueeze() + self.bias.val().unsqueeze();
        if y.dtype() == out { y } else { y.cast(out) }
    }
}

/// PyTorch's `nn.Embedding`: a `[num, dim]` table.
#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
}

impl<B: Backend> Embedding<B> {
    pub fn new(num: usize, dim: usize, std: f64, device: &B::Device) -> Self {
        let dist = burn::tensor::Distribution::Normal(0.0, std);
        Self { weight: Param::from_tensor(Tensor::random([num, dim], dist, device)) }
    }

    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        #[cfg(feature = "cuda")]
        let (weight, ids) = match crate::fused_ops::try_embedding(self.weight.val(), ids) {
            Ok(y) => return y,
            Err(operands) => operands,
        };
        #[cfg(not(feature = "cuda"))]
        let weight = self.weight.val();
        burn::tensor::module::embedding(weight, ids)
    }
}

/// Dropout that is active only while gradients are being recorded (training on an autodiff
/// backend), as `model.train()` / `model.eval()` do in PyTorch.
#[derive(Module, Debug, Clone)]
pub struct Dropout {
    pub prob: f64,
}

impl Dropout {
    pub fn is_active<B: Backend>(&self, device: &B::Device) -> bool {
        self.prob > 0.0 && B::ad_enabled(device)
    }

    pub fn forward<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if !self.is_active::<B>(&x.device()) {
            return x;
        }
        let keep = x.random_like(burn::tensor::Distribution::Bernoulli(1.0 - self.prob));
        x * keep / (1.0 - self.prob)
    }

    /// `residual + self.forward(h)`: a residual connection whose branch is dropped out, as
    /// GPT-2's blocks end. On the autodiff CUDA backends one kernel each way (the mask drawn
    /// from a hash, not stored; `crate::fused_ops::try_residual_dropout`).
    /// The output is in the residual's dtype (`h` may be a linear layer's output in autocast's
    /// compute dtype).
    pub fn add_to<B: Backend, const D: usize>(&self, residual: Tensor<B, D>, h: Tensor<B, D>) -> Tensor<B, D> {
        if !self.is_active::<B>(&h.device()) {
            return add_residual(residual, h);
        }
        #[cfg(feature = "cuda")]
        let (residual, h) = match crate::fused_ops::try_residual_dropout(residual, h, self.prob, None) {
            Ok(y) => return y,
            Err(operands) => operands,
        };
        add_residual(residual, self.forward(h))
    }
}

/// `residual + h` in the residual's dtype: `h` may be a linear layer's output in autocast's
/// compute dtype, the residual stream stays in its own (f32), as PyTorch's type promotion
/// keeps it.
pub fn add_residual<B: Backend, const D: usize>(residual: Tensor<B, D>, h: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "cuda")]
    let (residual, h) = match crate::fused_ops::try_residual_add(residual, h) {
        Ok(y) => return y,
        Err(operands) => operands,
    };
    let dtype = residual.dtype();
    residual + h.cast(dtype)
}

/// Whether any parameter of `module` is trained (requires a gradient).
pub fn has_trainable<B: Backend, M: burn::module::Module<B>>(module: &M) -> bool {
    struct AnyTrainable(bool);
    impl<B: Backend> burn::module::ModuleVisitor<B> for AnyTrainable {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0 |= param.is_require_grad();
        }
    }
    let mut any = AnyTrainable(false);
    module.visit(&mut any);
    any.0
}

/// Splits `[batch, tokens, heads * head_dim]` into `[batch, heads, tokens, head_dim]`.
pub fn split_heads<B: Backend>(x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [b, t, d] = x.dims();
    x.reshape([b, t, heads, d / heads]).swap_dims(1, 2)
}

/// The inverse of [`split_heads`].
pub fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, t, hd] = x.dims();
    x.swap_dims(1, 2).reshape([b, t, h * hd])
}


#[cfg(test)]
mod tests {
    use super::SeededDropout;

    /// A linear layer under autocast on a backend without the fused route (flex): the operands
    /// rounded to bf16, their products summed and the bf16 bias added in f32, the sum rounded
    /// once, as PyTorch's bf16 GEMM with its bias epilogue does. Rounding the product and then
    /// the sum with the bias (what this route did before) changes about a quarter of them here.
    /// Every rounding in the reference is the backend's own cast: flex's f32 -> bf16 cast goes
    /// through `half`'s `from_f64`, which rounds down about one value in 10^4 that lies just
    /// above a tie (VoidStarKat/half-rs#151), and one such operand moves a whole row of sums.
    #[cfg(feature = "flex")]
    #[test]
    fn autocast_affine_rounds_once() {
        use super::{affine, autocast};
        use burn::backend::Flex;
        use burn::tensor::{DType, Distribution, Tensor, TensorData};
        let device = Default::default();
        let (rows, k, n) = (64, 96, 80);
        let x = Tensor::<Flex, 2>::random([rows, k], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<Flex, 2>::random([k, n], Distribution::Normal(0.0, 0.1), &device);
        let b = Tensor::<Flex, 1>::random([n], Distribution::Normal(0.0, 1.0), &device);
        let y = {
            let _bf16 = autocast(Some(DType::BF16));
            affine(x.clone(), w.clone(), Some(b.clone()))
        };
        assert_eq!(y.dtype(), DType::BF16, "a linear layer's output under autocast");
        let values = |t: TensorData| t.convert::<f32>().to_vec::<f32>().unwrap();
        let rounded = |t: TensorData| {
            let flat = values(t);
            let len = flat.len();
            values(Tensor::<Flex, 1>::from_data(TensorData::new(flat, [len]), &device).cast(DType::BF16).into_data())
        };
        let (xs, ws, bs) = (rounded(x.into_data()), rounded(w.into_data()), rounded(b.into_data()));
        let sums: Vec<f32> = (0..rows * n)
            .map(|at| {
                let (i, j) = (at / n, at % n);
                let sum: f64 = (0..k).map(|l| xs[i * k + l] as f64 * ws[l * n + j] as f64).sum();
                (sum + bs[j] as f64) as f32
            })
            .collect();
        let wants = rounded(TensorData::new(sums, [rows * n]));
        let mut exact = 0;
        for (at, (&got, &want)) in values(y.into_data()).iter().zip(&wants).enumerate() {
            // An f32 sum in another order may land on the other side of a tie.
            assert!((got - want).abs() <= want.abs() / 128.0 + 1e-6, "[{}, {}]: {got}, rounded once {want}", at / n, at % n);
            exact += (got == want) as usize;
        }
        assert!(exact as f64 >= 0.99 * (rows * n) as f64, "only {exact} of {} outputs are the once-rounded value", rows * n);
    }

    /// The hash drops about `prob` of the probabilities, independently of where they are: the
    /// kept share over a whole slice, and along one row and one column, is near 1 - prob; another
    /// seed drops other ones; prob 0 drops none.
    #[test]
    fn seeded_dropout_drops_its_share() {
        let (queries, keys) = (256u32, 256u32);
        for prob in [0.1, 0.5] {
            let drop = SeededDropout { prob, seed: [12345, 678] };
            let share = |cells: &mut dyn Iterator<Item = (u32, u32)>| {
                let (mut kept, mut all) = (0usize, 0usize);
                for (query, key) in cells {
                    kept += drop.keeps(3, query, key) as usize;
                    all += 1;
                }
                kept as f64 / all as f64
            };
            let whole = share(&mut (0..queries).flat_map(|q| (0..keys).map(move |k| (q, k))));
            assert!((whole - (1.0 - prob)).abs() < 0.01, "prob {prob}: kept {whole} of the slice");
            let row = share(&mut (0..4096).map(|k| (7, k)));
            let column = share(&mut (0..4096).map(|q| (q, 7)));
            for (what, kept) in [("row", row), ("column", column)] {
                assert!((kept - (1.0 - prob)).abs() < 0.03, "prob {prob}: kept {kept} of a {what}");
            }
            let other = SeededDropout { seed: [12346, 678], ..drop };
            let differ = (0..keys).filter(|&k| drop.keeps(0, 0, k) != other.keeps(0, 0, k)).count();
            assert!(differ > keys as usize / 10, "prob {prob}: seeds 12345 and 12346 differ in only {differ} of {keys}");
        }
        let none = SeededDropout { prob: 0.0, seed: [1, 2] };
        assert!((0..1000).all(|k| none.keeps(0, 1, k)));
        // The residual dropout's per-element rule: its share over a run of indices, also past
        // 2^32 (the high word enters the hash), and another seed drops other elements.
        for prob in [0.1, 0.5] {
            let drop = SeededDropout { prob, seed: [12345, 678] };
            for start in [0u64, 1 << 32] {
                let kept = (start..start + 100_000).filter(|&i| drop.keeps_element(i)).count() as f64 / 100_000.0;
                assert!((kept - (1.0 - prob)).abs() < 0.01, "prob {prob}: kept {kept} of elements from {start}");
            }
            let differ = (0..1000u64).filter(|&i| drop.keeps_element(i) != drop.keeps_element(i + (1 << 32))).count();
            assert!(differ > 50, "prob {prob}: elements 2^32 apart agree in all but {differ} of 1000");
            let other = SeededDropout { seed: [12345, 679], ..drop };
            let differ = (0..1000u64).filter(|&i| drop.keeps_element(i) != other.keeps_element(i)).count();
            assert!(differ > 50, "prob {prob}: seeds differing in the second word differ in only {differ} of 1000");
        }
    }
}

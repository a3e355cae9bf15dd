//! Backend differential fuzzing: the same computation, on random configs, weights and inputs,
//! on a reference backend and a candidate, compared with a tolerance set by the candidate's
//! dtype. proptest draws the cases and shrinks a failing one to a minimal case, which is
//! printed as JSON with the command that replays it.
//!
//! Legs (one test each):
//! - `cpu_flex_f32_vs_ndarray_f64`: flex against ndarray in f64 (so flex's own errors show);
//! - `wgpu_f32_vs_flex`: wgpu (lavapipe on a machine without a GPU) against flex;
//! - `cuda_*` (ignored unless asked for: they need an NVIDIA GPU): CUDA in f32, in bf16, and
//!   f32 weights with bf16 matrix work (the training autocast), against flex;
//! - `cpu_flex_autocast_bf16_vs_flex` (ignored; for diagnosis): bf16 matrix work on flex against
//!   f32 flex, so that a CUDA autocast failure replayed here shows what bf16 rounding alone does;
//! - `cpu_flex_bf16_vs_ndarray` (ignored; for diagnosis, run alone): the same for the CUDA bf16
//!   leg, everything in bf16 on flex against ndarray in f32.
//!
//! Settings (environment):
//! - `LLAVA_JP_FUZZ_CASES`: cases per computation (default: the leg's CI count);
//! - `LLAVA_JP_FUZZ_SEED`: the case generator's seed, a number or `random` (default 0, so CI
//!   runs the same cases every time);
//! - `LLAVA_JP_FUZZ_REPLAY`: `{"computation": .., "case": ..}` as a failure prints it: runs that
//!   one case only;
//! - `LLAVA_JP_FUZZ_ONLY`: computations to run, by key (`image,matmul,attention,attention_grad,attention_dropout,
//!   projector,clip,pieces,gpt2,decode,llava,gradients`; default all), so that one process per computation can run them in
//!   parallel;
//! - `LLAVA_JP_FUZZ_SECONDS`: stop starting new cases after this long per computation (the
//!   number actually run is printed), for a device with a time limit.
//! - `LLAVA_JP_FUZZ_DUMP`: a failing output is printed whole, reference and candidate.
//!
//! On the GPU machine: `model-import/scripts/gpu_backend_fuzz.sh` runs the CUDA and wgpu legs.
use std::cell::RefCell;
use std::fmt::Debug;

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Bool, DType, TensorData};
use burn_store::{ModuleSnapshot, TensorSnapshot};
use llava_jp::config::{ClipVisionConfig, Gpt2Config, LlavaConfig};
use llava_jp::data::image::{AspectMode, ImageProcessor};
use llava_jp::model::nn::{attention, attention_with_seeded_dropout, split_heads, Dropout, SeededDropout};
use llava_jp::model::projector::{Projector, ProjectorKind};
use llava_jp::model::{gpt2::attention_mask, ClipVisionModel, Gpt2LmHeadModel, LlavaModel, Sample, IGNORE_INDEX, IMAGE_TOKEN_INDEX};
use llava_jp::parity::to_f32;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------
// Deterministic data: every weight and input comes from the case's seed, so a case replays.

/// SplitMix64: small, fast, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, salt: &str) -> Self {
        // FNV-1a of the salt, so that each tensor has its own stream whatever the order.
        let h = salt.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        Rng(seed ^ h)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn symmetric(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn values(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.symmetric() * scale).collect()
    }
}

fn float_dtype<B: Backend>(device: &B::Device) -> DType {
    Tensor::<B, 1>::zeros([1], device).dtype()
}

fn tensor<B: Backend, const D: usize>(values: Vec<f32>, shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(values, shape).convert_dtype(float_dtype::<B>(device)), device)
}

/// Replaces every float parameter of `module` with values drawn from `seed` and its path:
/// LayerNorm weights near 1, other vectors small, matrices scaled by their fan-in, so that
/// activations stay of order one through the layers.
fn randomize<B: Backend, M: ModuleSnapshot<B>>(module: &mut M, seed: u64, device: &B::Device) {
    let dtype = float_dtype::<B>(device);
    let snapshots: Vec<TensorSnapshot> = module
        .collect(None, None, false)
        .into_iter()
        .map(|s| {
            if !s.dtype.is_float() {
                return s;
            }
            let path = s.full_path();
            let dims = s.shape.to_vec();
            let n: usize = dims.iter().product();
            let mut rng = Rng::new(seed, &path);
            let is_norm = path.contains("norm") || path.contains("ln_");
            let values = if dims.len() == 1 && is_norm && path.ends_with("weight") {
                rng.values(n, 0.2).into_iter().map(|v| 1.0 + v).collect()
            } else if dims.len() == 1 {
                rng.values(n, 0.1)
            } else {
                let fan = n / dims.iter().copied().max().unwrap_or(1).max(1);
                rng.values(n, (3.0 / fan.max(1) as f32).sqrt())
            };
            TensorSnapshot::from_data(
                TensorData::new(values, dims).convert_dtype(dtype),
                s.path_stack.clone().unwrap_or_default(),
                s.container_stack.clone().unwrap_or_default(),
                s.tensor_id.expect("a module parameter has an id"),
            )
        })
        .collect();
    let result = module.apply(snapshots, None, None, false);
    assert!(result.errors.is_empty() && result.missing.is_empty(), "randomizing the module's weights: {:?} {:?}", result.errors, result.missing);
}

// ---------------------------------------------------------------------------------------------
// Properties: each computes named outputs on one backend; the harness compares two backends.

type Outputs = Vec<(String, Vec<f32>)>;

trait Property {
    const NAME: &'static str;
    /// A short name for `LLAVA_JP_FUZZ_ONLY`.
    const KEY: &'static str;
    type Case: Debug + Clone + Serialize + DeserializeOwned;
    fn strategy() -> BoxedStrategy<Self::Case>;
    /// Cases per run for a leg with a default of `base` (properties that cost more take fewer).
    fn cases(base: u32) -> u32 {
        base
    }
    fn outputs<B: Backend>(case: &Self::Case, device: &B::Device) -> Result<Outputs, String>;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct GemmCase {
    seed: u64,
    m: usize,
    k: usize,
    n: usize,
    /// The right operand as the transposed view of an `[n, k]` tensor (as `Linear` passes its
    /// weight), or stored `[k, n]` (as GPT-2's Conv1D does).
    transposed: bool,
}

/// The one matrix-product route (`nn::matmul`), on both weight layouts, with small and
/// degenerate (1-wide) dimensions drawn often.
struct GemmProperty;

impl Property for GemmProperty {
    const NAME: &'static str = "matmul";
    const KEY: &'static str = "matmul";
    type Case = GemmCase;

    fn strategy() -> BoxedStrategy<GemmCase> {
        let dim = || prop_oneof![1..=4usize, 1..=130usize];
        (any::<u64>(), dim(), dim(), dim(), any::<bool>()).prop_map(|(seed, m, k, n, transposed)| GemmCase { seed, m, k, n, transposed }).boxed()
    }

    fn outputs<B: Backend>(c: &GemmCase, device: &B::Device) -> Result<Outputs, String> {
        let mut rng = Rng::new(c.seed, "gemm");
        let a = tensor::<B, 2>(rng.values(c.m * c.k, 1.0), [c.m, c.k], device);
        let b = if c.transposed {
            tensor::<B, 2>(rng.values(c.n * c.k, 1.0), [c.n, c.k], device).transpose()
        } else {
            tensor::<B, 2>(rng.values(c.k * c.n, 1.0), [c.k, c.n], device)
        };
        Ok(vec![("product".into(), to_f32(llava_jp::model::nn::matmul(a, b)))])
    }
}

/// `masked`: none, GPT-2's causal mask over random left or right padding, or random (a query
/// always sees its own position, so no row is empty).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
enum MaskKind {
    None,
    CausalPadded,
    /// Causal, the keys valid up to a length drawn per batch row, as the training collator pads
    /// on the right: queries past the length see the valid keys and themselves only, so a
    /// flash kernel's block of them meets hidden tiles between seen ones.
    CausalRightPadded,
    Random,
}

/// How q, k and v lie in memory: each its own tensor, or heads split out of one packed
/// projection `[batch, tokens, 3 * heads * head_dim]` as GPT-2's attention makes them (strided
/// views of one buffer, whose batch stride is not the head's).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
enum QkvLayout {
    #[default]
    Separate,
    Packed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct AttentionCase {
    seed: u64,
    batch: usize,
    heads: usize,
    queries: usize,
    past: usize,
    head_dim: usize,
    mask: MaskKind,
    /// The scale is this over √head_dim (1 is the usual), so scores stay of the size a model's
    /// are: at 8x the usual, bf16's rounding of the scores alone moves the softmax by 6e-2.
    scale_factor: f64,
    #[serde(default)]
    layout: QkvLayout,
}

struct AttentionProperty;

impl Property for AttentionProperty {
    const NAME: &'static str = "attention";
    const KEY: &'static str = "attention";
    type Case = AttentionCase;

    fn strategy() -> BoxedStrategy<AttentionCase> {
        let mask = prop_oneof![Just(MaskKind::None), Just(MaskKind::CausalPadded), Just(MaskKind::CausalRightPadded), Just(MaskKind::Random)];
        // Head widths that are multiples of 16 and lengths past one 64-wide tile reach CUDA's
        // flash kernel (`src/flash.rs`) on the bf16 legs; the rest stay on burn's attention.
        let head_dim = prop_oneof![1..=64usize, prop::sample::select(vec![16usize, 32, 64, 128])];
        let queries = prop_oneof![3 => 1..=12usize, 1 => 60..=140usize];
        let past = prop_oneof![3 => 0..=12usize, 1 => 50..=140usize];
        let layout = prop_oneof![Just(QkvLayout::Separate), Just(QkvLayout::Packed)];
        (any::<u64>(), 1..=3usize, 1..=4usize, queries, past, head_dim, mask, 0.1f64..2.0, layout)
            .prop_map(|(seed, batch, heads, queries, past, head_dim, mask, scale_factor, layout)| AttentionCase {
                seed,
                batch,
                heads,
                queries,
                past,
                head_dim,
                mask,
                scale_factor,
                layout,
            })
            .boxed()
    }

    fn outputs<B: Backend>(c: &AttentionCase, device: &B::Device) -> Result<Outputs, String> {
        let (q, k, v, masked, scale, _) = c.inputs::<B>(device);
        Ok(vec![("output".into(), to_f32(attention(q, k, v, masked, scale, &Dropout { prob: 0.0 })))])
    }
}

impl AttentionCase {
    /// Queries, keys, values, the mask, the scale, and a random weighting of the output (for
    /// a loss whose gradient is not uniform).
    #[allow(clippy::type_complexity)]
    fn inputs<B: Backend>(&self, device: &B::Device) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, Option<Tensor<B, 4, Bool>>, f64, Tensor<B, 4>) {
        let c = self;
        let keys = c.queries + c.past;
        let mut rng = Rng::new(c.seed, "qkv");
        let (q, k, v) = match c.layout {
            QkvLayout::Separate => (
                tensor::<B, 4>(rng.values(c.batch * c.heads * c.queries * c.head_dim, 2.0), [c.batch, c.heads, c.queries, c.head_dim], device),
                tensor::<B, 4>(rng.values(c.batch * c.heads * keys * c.head_dim, 2.0), [c.batch, c.heads, keys, c.head_dim], device),
                tensor::<B, 4>(rng.values(c.batch * c.heads * keys * c.head_dim, 1.0), [c.batch, c.heads, keys, c.head_dim], device),
            ),
            QkvLayout::Packed => {
                // The queries are the last `queries` of the keys' tokens, as in a prefill after
                // `past` cached ones.
                let d = c.heads * c.head_dim;
                let packed = tensor::<B, 3>(rng.values(c.batch * keys * 3 * d, 1.5), [c.batch, keys, 3 * d], device);
                let part = |i: usize, tokens: std::ops::Range<usize>| split_heads(packed.clone().slice([0..c.batch, tokens, i * d..(i + 1) * d]), c.heads);
                (part(0, c.past..keys), part(1, 0..keys), part(2, 0..keys))
            }
        };
        let masked = match c.mask {
            MaskKind::None => None,
            MaskKind::CausalPadded | MaskKind::CausalRightPadded => {
                let right = matches!(c.mask, MaskKind::CausalRightPadded);
                let valid: Vec<bool> = (0..c.batch).flat_map(|_| {
                    let pad = rng.below(keys);
                    // Left: the first `pad` keys are padding; right: all but the first `pad + 1`.
                    (0..keys).map(move |j| if right { j <= pad } else { j >= pad })
                }).collect();
                Some(attention_mask(Tensor::<B, 2, Bool>::from_data(TensorData::new(valid, [c.batch, keys]), device), c.queries, c.heads))
            }
            MaskKind::Random => {
                let mut bits = Vec::with_capacity(c.batch * c.heads * c.queries * keys);
                for _ in 0..c.batch * c.heads {
                    for i in 0..c.queries {
                        for j in 0..keys {
                            bits.push(j != i + c.past && rng.below(2) == 0);
                        }
                    }
                }
                Some(Tensor::<B, 4, Bool>::from_data(TensorData::new(bits, [c.batch, c.heads, c.queries, keys]), device))
            }
        };
        let scale = c.scale_factor / (c.head_dim as f64).sqrt();
        let mut rng = Rng::new(c.seed, "output weights");
        let weights = tensor::<B, 4>(rng.values(c.batch * c.heads * c.queries * c.head_dim, 1.0), [c.batch, c.heads, c.queries, c.head_dim], device);
        (q, k, v, masked, scale, weights)
    }
}

/// Attention's backward on its own: the gradients of a weighted sum of the output with respect
/// to queries, keys and values (on the bf16 CUDA legs, CUDA's flash backward kernels when
/// the route is `flash`, the default; burn's otherwise).
struct AttentionGradientProperty;

impl Property for AttentionGradientProperty {
    const NAME: &'static str = "attention gradients";
    const KEY: &'static str = "attention_grad";
    type Case = AttentionCase;

    fn strategy() -> BoxedStrategy<AttentionCase> {
        AttentionProperty::strategy()
    }

    fn outputs<B: Backend>(c: &AttentionCase, device: &B::Device) -> Result<Outputs, String> {
        let (q, k, v, masked, scale, weights) = c.inputs::<Autodiff<B>>(device);
        let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
        let out = attention(q.clone(), k.clone(), v.clone(), masked, scale, &Dropout { prob: 0.0 });
        let grads = (out * weights).sum().backward();
        let grad = |name: &str, t: &Tensor<Autodiff<B>, 4>| (format!("grad {name}"), to_f32(t.grad(&grads).expect("a gradient")));
        Ok(vec![grad("q", &q), grad("k", &k), grad("v", &v)])
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct AttentionDropoutCase {
    attention: AttentionCase,
    prob: f64,
    seed: [u32; 2],
}

/// Attention with dropout, forward and backward: the output and the gradients of a weighted
/// sum of it, with the probabilities [`SeededDropout`] names dropped (by CUDA's flash kernels on
/// the bf16 legs on the default route; written out with tensors elsewhere), so
/// a kernel that drops other probabilities, or forgets them in its backward, fails.
struct AttentionDropoutProperty;

impl Property for AttentionDropoutProperty {
    const NAME: &'static str = "attention with dropout";
    const KEY: &'static str = "attention_dropout";
    type Case = AttentionDropoutCase;

    fn strategy() -> BoxedStrategy<AttentionDropoutCase> {
        (AttentionProperty::strategy(), 0.05f64..0.6, any::<[u32; 2]>())
            .prop_map(|(attention, prob, seed)| AttentionDropoutCase { attention, prob, seed })
            .boxed()
    }

    fn outputs<B: Backend>(c: &AttentionDropoutCase, device: &B::Device) -> Result<Outputs, String> {
        let (q, k, v, masked, scale, weights) = c.attention.inputs::<Autodiff<B>>(device);
        let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
        let dropout = SeededDropout { prob: c.prob, seed: c.seed };
        let out = attention_with_seeded_dropout(q.clone(), k.clone(), v.clone(), masked, scale, dropout);
        let grads = (out.clone() * weights).sum().backward();
        let grad = |name: &str, t: &Tensor<Autodiff<B>, 4>| (format!("grad {name}"), to_f32(t.grad(&grads).expect("a gradient")));
        Ok(vec![("output".into(), to_f32(out.inner())), grad("q", &q), grad("k", &k), grad("v", &v)])
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ClipCase {
    seed: u64,
    images: usize,
    patch: usize,
    grid: usize,
    heads: usize,
    head_dim: usize,
    mlp_ratio: usize,
    layers: usize,
    act: String,
}

impl ClipCase {
    fn config(&self) -> ClipVisionConfig {
        let hidden = self.heads * self.head_dim;
        ClipVisionConfig::from_json(
            serde_json::json!({"hidden_size": hidden, "intermediate_size": hidden * self.mlp_ratio, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "image_size": self.patch * self.grid, "patch_size": self.patch, "hidden_act": self.act}),
            "fuzz case",
        )
        .expect("a valid CLIP config")
    }

    fn pixels<B: Backend>(&self, device: &B::Device) -> Tensor<B, 4> {
        let s = self.patch * self.grid;
        tensor(Rng::new(self.seed, "pixels").values(self.images * 3 * s * s, 2.0), [self.images, 3, s, s], device)
    }
}

fn clip_strategy() -> impl Strategy<Value = ClipCase> {
    let act = prop_oneof![Just("quick_gelu".to_string()), Just("gelu".to_string())];
    (any::<u64>(), 1..=3usize, 1..=7usize, 1..=4usize, 1..=4usize, 1..=16usize, 1..=4usize, 1..=3usize, act).prop_map(
        |(seed, images, patch, grid, heads, head_dim, mlp_ratio, layers, act)| ClipCase { seed, images, patch, grid, heads, head_dim, mlp_ratio, layers, act },
    )
}

/// The vision tower: patch embedding, every encoder layer, the pooled output.
struct ClipProperty;

impl Property for ClipProperty {
    const NAME: &'static str = "clip";
    const KEY: &'static str = "clip";
    type Case = ClipCase;

    fn strategy() -> BoxedStrategy<ClipCase> {
        clip_strategy().boxed()
    }

    fn outputs<B: Backend>(c: &ClipCase, device: &B::Device) -> Result<Outputs, String> {
        let mut tower = ClipVisionModel::<B>::new(&c.config(), device);
        randomize(&mut tower, c.seed, device);
        let out = tower.forward(c.pixels(device), c.layers);
        let mut outputs: Outputs = out.hidden_states.into_iter().enumerate().map(|(i, h)| (format!("hidden_states[{i}]"), to_f32(h))).collect();
        outputs.push(("pooler_output".into(), to_f32(out.pooler_output.expect("every layer ran"))));
        Ok(outputs)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ProjectorCase {
    seed: u64,
    kind: String,
    d_vision: usize,
    d_text: usize,
    images: usize,
    tokens: usize,
}

struct ProjectorProperty;

impl Property for ProjectorProperty {
    const NAME: &'static str = "projector";
    const KEY: &'static str = "projector";
    type Case = ProjectorCase;

    fn strategy() -> BoxedStrategy<ProjectorCase> {
        let kind = prop_oneof![Just("linear".to_string()), Just("mlp2x_gelu".to_string()), Just("mlp3x_gelu".to_string())];
        (any::<u64>(), kind, 1..=96usize, 1..=96usize, 1..=3usize, 1..=17usize)
            .prop_map(|(seed, kind, d_vision, d_text, images, tokens)| ProjectorCase { seed, kind, d_vision, d_text, images, tokens })
            .boxed()
    }

    fn outputs<B: Backend>(c: &ProjectorCase, device: &B::Device) -> Result<Outputs, String> {
        let mut projector = Projector::<B>::new(ProjectorKind::parse(&c.kind)?, c.d_vision, c.d_text, device);
        randomize(&mut projector, c.seed, device);
        let x = tensor::<B, 3>(Rng::new(c.seed, "features").values(c.images * c.tokens * c.d_vision, 3.0), [c.images, c.tokens, c.d_vision], device);
        Ok(vec![("output".into(), to_f32(projector.forward(x)))])
    }
}

/// A transformer block's pieces between its products, alone: LayerNorm, the activation and the
/// residual add, at any width (narrow and odd ones too), so that a block-level failure can be
/// told apart from these.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BlockPiecesCase {
    seed: u64,
    batch: usize,
    tokens: usize,
    width: usize,
    act: String,
}

struct BlockPiecesProperty;

impl Property for BlockPiecesProperty {
    const NAME: &'static str = "block pieces";
    const KEY: &'static str = "pieces";
    type Case = BlockPiecesCase;

    fn strategy() -> BoxedStrategy<BlockPiecesCase> {
        let act = prop_oneof![Just("gelu".to_string()), Just("gelu_new".to_string()), Just("quick_gelu".to_string()), Just("relu".to_string())];
        (any::<u64>(), 1..=3usize, 1..=12usize, 1..=64usize, act)
            .prop_map(|(seed, batch, tokens, width, act)| BlockPiecesCase { seed, batch, tokens, width, act })
            .boxed()
    }

    fn outputs<B: Backend>(c: &BlockPiecesCase, device: &B::Device) -> Result<Outputs, String> {
        let mut ln = llava_jp::model::nn::LayerNorm::<B>::new(c.width, 1e-5, device);
        randomize(&mut ln, c.seed, device);
        let shape = [c.batch, c.tokens, c.width];
        // A ramp across the features plus noise a quarter of its step, each row shifted: the
        // variance stays away from zero, so that bf16 storage alone cannot turn LayerNorm's
        // rounding into O(1) changes (two nearly equal features would).
        let (mut noise, mut shift) = (Rng::new(c.seed, "x"), Rng::new(c.seed, "row shift"));
        let mut values = Vec::with_capacity(c.batch * c.tokens * c.width);
        for _ in 0..c.batch * c.tokens {
            let offset = shift.symmetric() * 3.0;
            values.extend((0..c.width).map(|j| offset + (j as f32 - (c.width - 1) as f32 / 2.0) * 0.5 + noise.symmetric() * 0.125));
        }
        let x = tensor::<B, 3>(values, shape, device);
        let normed = ln.forward(x.clone());
        let activated = llava_jp::model::nn::Activation::parse(&c.act)?.forward(x.clone());
        Ok(vec![
            ("layernorm".into(), to_f32(normed.clone())),
            ("activation".into(), to_f32(activated)),
            ("residual".into(), to_f32(x + normed)),
        ])
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Gpt2Case {
    seed: u64,
    heads: usize,
    head_dim: usize,
    layers: usize,
    vocab: usize,
    act: String,
    tied: bool,
    pad_left: bool,
    lengths: Vec<usize>,
    /// Tokens decoded one at a time after the prompt (the KV-cache property).
    steps: usize,
}

impl Gpt2Case {
    fn config(&self) -> Gpt2Config {
        let config: Gpt2Config = serde_json::from_value(serde_json::json!({
            "vocab_size": self.vocab, "n_positions": 64, "n_embd": self.heads * self.head_dim, "n_layer": self.layers, "n_head": self.heads,
            "activation_function": self.act, "tie_word_embeddings": self.tied,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0
        }))
        .expect("a GPT-2 config");
        config.validate("fuzz case").expect("a valid GPT-2 config");
        config
    }

    /// Token ids `[batch, width + steps]`, padded on the case's side, their positions and validity.
    fn batch(&self) -> (Vec<i64>, Vec<i64>, Vec<bool>, usize) {
        let width = *self.lengths.iter().max().unwrap();
        let total = width + self.steps;
        let mut rng = Rng::new(self.seed, "ids");
        let (mut ids, mut positions, mut valid) = (vec![], vec![], vec![]);
        for &len in &self.lengths {
            let pad = width - len;
            for t in 0..total {
                let real = if self.pad_left { t >= pad } else { t < len || t >= width };
                ids.push(rng.below(self.vocab) as i64);
                valid.push(real);
                // Positions count real tokens only (as generation does with left padding).
                let before = if self.pad_left { t.saturating_sub(pad) } else if t < width { t } else { len + t - width };
                positions.push(before as i64);
            }
        }
        (ids, positions, valid, width)
    }

    /// The model with the case's weights, and the batch on `device`: ids, positions, validity
    /// `[batch, width + steps]`, and the prompt width.
    #[allow(clippy::type_complexity)]
    fn model_and_batch<B: Backend>(&self, device: &B::Device) -> (Gpt2LmHeadModel<B>, Tensor<B, 2, Int>, Tensor<B, 2, Int>, Tensor<B, 2, Bool>, usize) {
        let mut model = Gpt2LmHeadModel::<B>::new(&self.config(), device);
        randomize(&mut model, self.seed, device);
        let (ids, positions, valid, width) = self.batch();
        let shape = [self.lengths.len(), width + self.steps];
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, shape), device);
        let positions = Tensor::<B, 2, Int>::from_data(TensorData::new(positions, shape), device);
        let valid = Tensor::<B, 2, Bool>::from_data(TensorData::new(valid, shape), device);
        (model, ids, positions, valid, width)
    }
}

fn gpt2_strategy() -> impl Strategy<Value = Gpt2Case> {
    let act = prop_oneof![Just("gelu".to_string()), Just("gelu_new".to_string()), Just("relu".to_string())];
    (any::<u64>(), 1..=4usize, 1..=16usize, 1..=3usize, 2..=300usize, act, any::<bool>(), any::<bool>(), prop::collection::vec(1..=12usize, 1..=3), 1..=3usize).prop_map(
        |(seed, heads, head_dim, layers, vocab, act, tied, pad_left, lengths, steps)| Gpt2Case { seed, heads, head_dim, layers, vocab, act, tied, pad_left, lengths, steps },
    )
}

/// GPT-2 blocks and the LM head over a padded batch (the prompt part of the case).
struct Gpt2Property;

impl Property for Gpt2Property {
    const NAME: &'static str = "gpt2";
    const KEY: &'static str = "gpt2";
    type Case = Gpt2Case;

    fn strategy() -> BoxedStrategy<Gpt2Case> {
        gpt2_strategy().boxed()
    }

    /// Each stage of the forward as its own output, in order, so that a failure names the first
    /// stage that differs (each backend runs on from its own previous stage). The stages are
    /// `Gpt2LmHeadModel::forward`'s, written out; the last, the logits, is checked against
    /// `forward` itself on the same backend.
    fn outputs<B: Backend>(c: &Gpt2Case, device: &B::Device) -> Result<Outputs, String> {
        let (model, ids, positions, valid, _) = c.model_and_batch::<B>(device);
        let gpt = &model.transformer;
        let t = ids.dims()[1];
        let masked = attention_mask(valid.clone(), t, gpt.n_head());
        let mut outputs: Outputs = vec![("attention mask".into(), to_f32(masked.clone().float()))];
        let mut x = gpt.wte.forward(ids.clone()) + gpt.wpe.forward(positions.clone());
        outputs.push(("embeddings".into(), to_f32(x.clone())));
        for (i, block) in gpt.h.iter().enumerate() {
            let normed = block.ln_1.forward(x.clone());
            outputs.push((format!("block {i} ln_1"), to_f32(normed.clone())));
            outputs.push((format!("block {i} attention"), to_f32(block.attn.forward(normed, masked.clone(), None))));
            x = block.forward(x, masked.clone(), None);
            outputs.push((format!("block {i} output"), to_f32(x.clone())));
        }
        let staged = model.logits(gpt.ln_f.forward(x));
        let logits = to_f32(model.forward(ids, positions, valid, None));
        let (err, scale) = max_error(&to_f32(staged), &logits);
        let tolerance = TOLERANCE.get();
        if err > tolerance.atol + tolerance.rtol * scale {
            return Err(format!("the staged forward's logits differ from forward's by {err:.3e} (scale {scale:.3e}) on this backend"));
        }
        outputs.push(("logits".into(), logits));
        Ok(outputs)
    }
}

/// Prefill with the KV cache, then decode `steps` tokens one at a time: each step's logits,
/// which must also equal the uncached forward's at that position on the same backend.
struct DecodeProperty;

impl Property for DecodeProperty {
    const NAME: &'static str = "kv-cached decode";
    const KEY: &'static str = "decode";
    type Case = Gpt2Case;

    fn strategy() -> BoxedStrategy<Gpt2Case> {
        gpt2_strategy().boxed()
    }

    fn outputs<B: Backend>(c: &Gpt2Case, device: &B::Device) -> Result<Outputs, String> {
        let (model, ids, positions, valid, width) = c.model_and_batch::<B>(device);
        let b = c.lengths.len();
        let full = model.forward(ids.clone(), positions.clone(), valid.clone(), None);
        let mut cache = llava_jp::model::gpt2::KvCache::new(c.layers);
        let cut = |x: Tensor<B, 2, Int>, r: std::ops::Range<usize>| x.slice([0..b, r]);
        model.forward(cut(ids.clone(), 0..width), cut(positions.clone(), 0..width), valid.clone().slice([0..b, 0..width]), Some(&mut cache));
        let mut outputs = Outputs::new();
        let vocab = c.vocab;
        for s in 0..c.steps {
            let at = width + s;
            let step = model.forward(cut(ids.clone(), at..at + 1), cut(positions.clone(), at..at + 1), valid.clone().slice([0..b, at..at + 1]), Some(&mut cache));
            let step = to_f32(step);
            let uncached = to_f32(full.clone().slice([0..b, at..at + 1, 0..vocab]));
            let (err, scale) = max_error(&step, &uncached);
            let t = TOLERANCE.get();
            if err > t.atol + t.rtol * scale {
                return Err(format!("decode step {s}: cached logits differ from the uncached forward by {err:.3e} (scale {scale:.3e}) on this backend, more than its tolerance {t:?}"));
            }
            outputs.push((format!("step {s} logits"), step));
        }
        Ok(outputs)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SampleSpec {
    text: usize,
    images: usize,
    labelled: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LlavaCase {
    seed: u64,
    clip: ClipCase,
    /// `mm_vision_select_layer`: -1 .. -layers.
    select_layer: i64,
    cls_patch: bool,
    projector: String,
    gpt_heads: usize,
    gpt_head_dim: usize,
    gpt_layers: usize,
    vocab: usize,
    pad_left: bool,
    max_length: usize,
    samples: Vec<SampleSpec>,
}

impl LlavaCase {
    fn config(&self) -> LlavaConfig {
        let clip = self.clip.config();
        let mut config: LlavaConfig = serde_json::from_value(serde_json::json!({
            "model_type": "llava", "vocab_size": self.vocab, "n_positions": 128, "n_embd": self.gpt_heads * self.gpt_head_dim,
            "n_layer": self.gpt_layers, "n_head": self.gpt_heads, "activation_function": "gelu",
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "mm_vision_tower": "fuzz-clip", "mm_projector_type": self.projector, "mm_vision_select_layer": self.select_layer,
            "mm_vision_select_feature": if self.cls_patch { "cls_patch" } else { "patch" },
            "tokenizer_model_max_length": self.max_length, "tokenizer_padding_side": if self.pad_left { "left" } else { "right" },
            "vision_config": serde_json::to_value(&clip).unwrap()
        }))
        .expect("a LLaVA config");
        config.resolve("fuzz case").expect("a valid LLaVA config");
        config
    }

    /// Samples with image placeholders at random places and random unlabelled spans, and the
    /// pixels of all their images in order.
    fn inputs<B: Backend>(&self, device: &B::Device) -> (Vec<Sample>, Option<Tensor<B, 4>>) {
        let mut rng = Rng::new(self.seed, "samples");
        let samples = self
            .samples
            .iter()
            .map(|s| {
                let mut ids: Vec<i64> = (0..s.text).map(|_| rng.below(self.vocab) as i64).collect();
                for _ in 0..s.images {
                    let at = rng.below(ids.len() + 1);
                    ids.insert(at, IMAGE_TOKEN_INDEX);
                }
                let labels = s.labelled.then(|| ids.iter().map(|&id| if id == IMAGE_TOKEN_INDEX || rng.below(3) == 0 { IGNORE_INDEX } else { id }).collect());
                Sample { input_ids: ids, labels }
            })
            .collect();
        let images: usize = self.samples.iter().map(|s| s.images).sum();
        let clip = ClipCase { images, ..self.clip.clone() };
        (samples, (images > 0).then(|| clip.pixels(device)))
    }

    fn model<B: Backend>(&self, device: &B::Device) -> LlavaModel<B> {
        let mut model = LlavaModel::<B>::new(&self.config(), device);
        randomize(&mut model, self.seed, device);
        model
    }
}

fn llava_strategy() -> impl Strategy<Value = LlavaCase> {
    let clip = (any::<u64>(), 1..=4usize, 1..=3usize, 1..=2usize, 1..=8usize, 1..=2usize)
        .prop_map(|(seed, patch, grid, heads, head_dim, layers)| ClipCase { seed, images: 1, patch, grid, heads, head_dim, mlp_ratio: 2, layers, act: "quick_gelu".into() });
    let projector = prop_oneof![Just("linear".to_string()), Just("mlp2x_gelu".to_string())];
    let sample = (1..=10usize, 0..=2usize, any::<bool>()).prop_map(|(text, images, labelled)| SampleSpec { text, images, labelled });
    (any::<u64>(), clip, 1..=2i64, any::<bool>(), projector, 1..=3usize, 1..=12usize, 1..=2usize, 2..=200usize, any::<bool>(), 6..=64usize, prop::collection::vec(sample, 1..=3))
        .prop_map(|(seed, clip, select, cls_patch, projector, gpt_heads, gpt_head_dim, gpt_layers, vocab, pad_left, max_length, mut samples)| {
            // At least one labelled sample with a label, so the loss has something to average.
            samples[0].labelled = true;
            samples[0].text = samples[0].text.max(2);
            let select_layer = -(select.min(clip.layers as i64));
            LlavaCase { seed, clip, select_layer, cls_patch, projector, gpt_heads, gpt_head_dim, gpt_layers, vocab, pad_left, max_length, samples }
        })
}

/// The whole training forward: tower, projector, splicing, padding, truncation, GPT-2, loss.
struct LlavaProperty;

impl Property for LlavaProperty {
    const NAME: &'static str = "llava forward and loss";
    const KEY: &'static str = "llava";
    type Case = LlavaCase;

    fn strategy() -> BoxedStrategy<LlavaCase> {
        llava_strategy().boxed()
    }

    fn cases(base: u32) -> u32 {
        base.div_ceil(2)
    }

    fn outputs<B: Backend>(c: &LlavaCase, device: &B::Device) -> Result<Outputs, String> {
        let model = c.model::<B>(device);
        let (samples, pixels) = c.inputs::<B>(device);
        let out = model.forward(&samples, pixels);
        Ok(vec![("logits".into(), to_f32(out.logits)), ("loss".into(), to_f32(out.loss.expect("labelled samples")))])
    }
}

/// The gradients of one training step: the loss's gradient for every parameter (tower,
/// projector and language model), through autodiff on the backend under test.
struct GradientProperty;

impl Property for GradientProperty {
    const NAME: &'static str = "training-step gradients";
    const KEY: &'static str = "gradients";
    type Case = LlavaCase;

    fn strategy() -> BoxedStrategy<LlavaCase> {
        llava_strategy().boxed()
    }

    fn cases(base: u32) -> u32 {
        base.div_ceil(2)
    }

    fn outputs<B: Backend>(c: &LlavaCase, device: &B::Device) -> Result<Outputs, String> {
        let model = c.model::<Autodiff<B>>(device);
        let (samples, pixels) = c.inputs::<Autodiff<B>>(device);
        let loss = model.forward(&samples, pixels).loss.expect("labelled samples");
        let grads = loss.backward();
        let mut outputs = Outputs::new();
        for s in model.collect(None, None, false) {
            let (Some(id), true) = (s.tensor_id, s.dtype.is_float()) else { continue };
            // A parameter the loss does not reach (a tower layer after the selected one) has none.
            if let Some(g) = grad_of(&model, id, &grads) {
                outputs.push((format!("grad {}", s.full_path()), g));
            }
        }
        Ok(outputs)
    }
}

/// The gradient of parameter `id`, found by walking the module (gradients are keyed by the
/// parameter's tensor, which only the module holds).
fn grad_of<B: Backend>(model: &LlavaModel<Autodiff<B>>, id: burn::module::ParamId, grads: &<Autodiff<B> as AutodiffBackend>::Gradients) -> Option<Vec<f32>> {
    struct Find<'a, B: Backend> {
        id: burn::module::ParamId,
        grads: &'a <Autodiff<B> as AutodiffBackend>::Gradients,
        found: Option<Vec<f32>>,
    }
    impl<B: Backend> burn::module::ModuleVisitor<Autodiff<B>> for Find<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<Autodiff<B>, D>>) {
            if param.id == self.id {
                self.found = param.val().grad(self.grads).map(to_f32);
            }
        }
    }
    let mut find = Find::<B> { id, grads, found: None };
    model.visit(&mut find);
    find.found
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ImageCase {
    seed: u64,
    width: usize,
    height: usize,
    size: usize,
    pad: bool,
    constant: bool,
}

/// Image preprocessing runs on the host (the same code whatever the backend), so what is
/// compared across backends is the pixel tensor it becomes; the host result is also checked
/// against what must hold for any picture: the shape, the normalised range, and a picture of
/// one colour (square, or not padded) giving that colour everywhere.
struct ImageProperty;

impl Property for ImageProperty {
    const NAME: &'static str = "image preprocessing";
    const KEY: &'static str = "image";
    type Case = ImageCase;

    fn strategy() -> BoxedStrategy<ImageCase> {
        (any::<u64>(), 1..=80usize, 1..=80usize, 1..=48usize, any::<bool>(), any::<bool>())
            .prop_map(|(seed, width, height, size, pad, constant)| ImageCase { seed, width, height, size, pad, constant })
            .boxed()
    }

    fn outputs<B: Backend>(c: &ImageCase, device: &B::Device) -> Result<Outputs, String> {
        let mut rng = Rng::new(c.seed, "image");
        let colour = [rng.below(256) as u8, rng.below(256) as u8, rng.below(256) as u8];
        let img = image::RgbImage::from_fn(c.width as u32, c.height as u32, |_, _| {
            if c.constant {
                image::Rgb(colour)
            } else {
                image::Rgb([rng.below(256) as u8, rng.below(256) as u8, rng.below(256) as u8])
            }
        });
        let processor = ImageProcessor::clip(c.size, if c.pad { AspectMode::Pad } else { AspectMode::Square });
        let pixels = processor.preprocess(&img);
        let n = c.size * c.size;
        if pixels.len() != 3 * n {
            return Err(format!("{} values for a {0}x{0} picture: expected {}", pixels.len(), 3 * n));
        }
        for ch in 0..3 {
            let (lo, hi) = ((0.0 - processor.mean[ch]) / processor.std[ch], (1.0 - processor.mean[ch]) / processor.std[ch]);
            let want = |v: u8| (v as f32 / 255.0 - processor.mean[ch]) / processor.std[ch];
            for &p in &pixels[ch * n..(ch + 1) * n] {
                if !(lo - 1e-5..=hi + 1e-5).contains(&p) {
                    return Err(format!("channel {ch}: {p} outside the normalised range [{lo}, {hi}]"));
                }
                // Padding a picture that is not square puts an edge into it, which the resize blends.
                let uniform = c.constant && (!c.pad || c.width == c.height);
                if uniform && (p - want(colour[ch])).abs() > 1e-4 {
                    return Err(format!("channel {ch}: {p} in a picture of one colour {colour:?} (expected {})", want(colour[ch])));
                }
            }
        }
        let t = tensor::<B, 4>(pixels, [1, 3, c.size, c.size], device);
        Ok(vec![("pixel_values".into(), to_f32(t))])
    }
}

// ---------------------------------------------------------------------------------------------
// The harness.

/// `max |a - b|` and `max |b|`.
fn max_error(a: &[f32], b: &[f32]) -> (f32, f32) {
    let err = a.iter().zip(b).map(|(x, y)| if x.is_nan() != y.is_nan() { f32::INFINITY } else if x.is_nan() { 0.0 } else { (x - y).abs() }).fold(0.0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).filter(|y| y.is_finite()).fold(0.0f32, f32::max);
    (err, scale)
}

thread_local! {
    /// The tolerance of the backend computing now, for checks within one backend.
    static TOLERANCE: std::cell::Cell<Tolerance> = const { std::cell::Cell::new(F32) };
}

/// A candidate passes when `max |c - r| <= atol + rtol * max |r|` for every output.
#[derive(Debug, Clone, Copy)]
struct Tolerance {
    atol: f32,
    rtol: f32,
}

struct Leg {
    name: &'static str,
    /// Cases per computation when `LLAVA_JP_FUZZ_CASES` is not set.
    cases: u32,
    tolerance: Tolerance,
    /// The candidate's matrix work in this dtype (f32 weights), as training's autocast does.
    autocast: Option<DType>,
    /// The candidate rounds matrix work below f32 (bf16, or TF32 for cubecl's f32 matmul): a
    /// failing case is set aside as ill-conditioned when bf16 matrix work on the reference
    /// backend misses the autocast tolerance on it too (a LayerNorm over two or three features
    /// with a tiny variance turns rounding into O(1) changes, on any backend).
    reduced_precision: bool,
}

/// The worst error seen per computation: `(cases, worst max|c - r|, its scale, worst ratio to the tolerance, output)`.
#[derive(Default)]
struct Worst {
    rows: Vec<(String, u32, f32, f32, f32, String)>,
}

fn compare(name: &str, reference: &Outputs, candidate: &Outputs, tolerance: Tolerance) -> Result<(f32, f32, f32, String), String> {
    let names = |o: &Outputs| o.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    if names(reference) != names(candidate) {
        return Err(format!("{name}: the backends computed different outputs: {:?} vs {:?}", names(reference), names(candidate)));
    }
    let mut worst = (0.0f32, 0.0f32, 0.0f32, String::new());
    for ((output, r), (_, c)) in reference.iter().zip(candidate) {
        if r.len() != c.len() {
            return Err(format!("{output}: {} values on the reference, {} on the candidate", r.len(), c.len()));
        }
        if let Some(i) = c.iter().position(|v| !v.is_finite()) {
            if r[i].is_finite() {
                return Err(format!("{output}: value {i} is {} on the candidate, {} on the reference", c[i], r[i]));
            }
        }
        let (err, scale) = max_error(c, r);
        let ratio = err / (tolerance.atol + tolerance.rtol * scale);
        if ratio > worst.2 || worst.3.is_empty() {
            worst = (err, scale, ratio, output.clone());
        }
        if ratio > 1.0 {
            let at = (0..c.len()).find(|&i| max_error(&c[i..=i], &r[i..=i]).0 == err).unwrap_or(0);
            if std::env::var_os("LLAVA_JP_FUZZ_DUMP").is_some() {
                println!("{output}, reference: {r:?}\n{output}, candidate: {c:?}");
            }
            return Err(format!(
                "{output}: max |candidate - reference| = {err:.3e} > {:.1e} + {:.1e} * max |reference| ({scale:.3e}), at value {at} of {} (candidate {}, reference {})",
                tolerance.atol,
                tolerance.rtol,
                c.len(),
                c[at],
                r[at]
            ));
        }
    }
    Ok(worst)
}

fn env_cases(default: u32) -> u32 {
    std::env::var("LLAVA_JP_FUZZ_CASES").ok().map(|v| v.parse().expect("LLAVA_JP_FUZZ_CASES: a number of cases")).unwrap_or(default)
}

/// Every computation, in the order a leg runs them: the one list the runner and the
/// `LLAVA_JP_FUZZ_ONLY` check read (applies macro `$m` to the property types).
macro_rules! every_property {
    ($m:ident) => {
        $m!(ImageProperty, GemmProperty, AttentionProperty, AttentionGradientProperty, AttentionDropoutProperty, ProjectorProperty, ClipProperty, BlockPiecesProperty, Gpt2Property, DecodeProperty, LlavaProperty, GradientProperty)
    };
}

fn selected<P: Property>() -> bool {
    match std::env::var("LLAVA_JP_FUZZ_ONLY") {
        Ok(keys) => {
            let keys: Vec<&str> = keys.split(',').map(str::trim).collect();
            macro_rules! keys {
                ($($p:ident),*) => { [$(<$p as Property>::KEY),*] };
            }
            let known = every_property!(keys);
            if let Some(bad) = keys.iter().find(|k| !known.contains(k)) {
                panic!("LLAVA_JP_FUZZ_ONLY: unknown computation `{bad}`; expected some of {known:?}");
            }
            keys.contains(&P::KEY)
        }
        Err(_) => true,
    }
}

fn time_budget() -> Option<std::time::Duration> {
    std::env::var("LLAVA_JP_FUZZ_SECONDS").ok().map(|v| std::time::Duration::from_secs_f64(v.parse().expect("LLAVA_JP_FUZZ_SECONDS: a number of seconds")))
}

fn generator_seed() -> u64 {
    match std::env::var("LLAVA_JP_FUZZ_SEED").as_deref() {
        Ok("random") => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
        Ok(s) => s.parse().expect("LLAVA_JP_FUZZ_SEED: a number or `random`"),
        Err(_) => 0,
    }
}

fn run_property<P: Property, R: Backend, C: Backend>(leg: &Leg, r: &R::Device, c: &C::Device, worst: &mut Worst) {
    let check = |case: &P::Case| -> Result<(f32, f32, f32, String), String> {
        TOLERANCE.set(F32);
        let reference = P::outputs::<R>(case, r).map_err(|e| format!("reference: {e}"))?;
        TOLERANCE.set(leg.tolerance);
        let candidate = {
            let _guard = llava_jp::model::nn::autocast(leg.autocast);
            P::outputs::<C>(case, c).map_err(|e| format!("candidate: {e}"))?
        };
        compare(P::NAME, &reference, &candidate, leg.tolerance)
    };
    // Whether bf16 matrix work alone, on the reference backend, misses the autocast tolerance.
    let ill_conditioned = |case: &P::Case| -> Option<String> {
        TOLERANCE.set(F32);
        let exact = P::outputs::<R>(case, r).ok()?;
        TOLERANCE.set(AUTOCAST_BF16);
        let rounded = {
            let _guard = llava_jp::model::nn::autocast(Some(DType::BF16));
            P::outputs::<R>(case, r).ok()?
        };
        compare(P::NAME, &exact, &rounded, AUTOCAST_BF16).err()
    };
    let replay_command = |case: &P::Case| {
        let json = serde_json::json!({"computation": P::NAME, "case": case});
        format!("LLAVA_JP_FUZZ_REPLAY='{json}' cargo test --release --test backend_fuzz -- {} --exact --include-ignored --nocapture", leg.name)
    };

    if let Ok(replay) = std::env::var("LLAVA_JP_FUZZ_REPLAY") {
        let replay: serde_json::Value = serde_json::from_str(&replay).expect("LLAVA_JP_FUZZ_REPLAY: JSON as a failure prints it");
        if replay["computation"] != P::NAME {
            return;
        }
        let case: P::Case = serde_json::from_value(replay["case"].clone()).expect("LLAVA_JP_FUZZ_REPLAY: a case of this computation");
        println!("replaying {}: {case:?}", P::NAME);
        match check(&case) {
            Ok((err, scale, ratio, output)) => println!("passes: worst {output}: {err:.3e} (scale {scale:.3e}, {ratio:.2} of the tolerance)"),
            Err(e) => match ill_conditioned(&case).filter(|_| leg.reduced_precision) {
                Some(why) => println!("fails ({e}), but the case is ill-conditioned: bf16 matrix work on the reference backend misses too ({why})"),
                None => panic!("{}: {e}", P::NAME),
            },
        }
        return;
    }

    if !selected::<P>() {
        return;
    }
    let cases = P::cases(env_cases(leg.cases));
    let (started, budget) = (std::time::Instant::now(), time_budget());
    let seed = generator_seed();
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..8 + P::NAME.len().min(24)].copy_from_slice(&P::NAME.as_bytes()[..P::NAME.len().min(24)]);
    let config = Config { cases, failure_persistence: None, max_shrink_iters: 512, max_shrink_time: 120_000, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes));
    let failed = std::cell::Cell::new(false);
    let seen = RefCell::new((0u32, 0.0f32, 0.0f32, 0.0f32, String::new()));
    let set_aside = std::cell::Cell::new(0u32);
    let result = runner.run(&P::strategy(), |case| {
        // Past the time budget the remaining cases are drawn but not run (nor counted); a
        // failure's shrinking runs to the end whatever the time.
        if budget.is_some_and(|b| started.elapsed() > b) && seen.borrow().0 > 0 && !failed.get() {
            return Ok(());
        }
        // A panic on a backend is a failure like any other (and marks the run as failing, so
        // that shrinking goes on past the time budget).
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&case))).unwrap_or_else(|panic| {
            let message = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(format!("panicked: {}", message.unwrap_or_default()))
        });
        let outcome = match outcome {
            Err(e) if !e.starts_with("panicked") && leg.reduced_precision => match ill_conditioned(&case) {
                Some(why) => {
                    set_aside.set(set_aside.get() + 1);
                    return Err(TestCaseError::reject(format!("ill-conditioned: {why}")));
                }
                None => Err(e),
            },
            outcome => outcome,
        };
        let (err, scale, ratio, output) = outcome.map_err(|e| {
            failed.set(true);
            TestCaseError::fail(e)
        })?;
        let mut s = seen.borrow_mut();
        s.0 += 1;
        if ratio >= s.3 {
            *s = (s.0, err, scale, ratio, output);
        }
        Ok(())
    });
    match result {
        Ok(()) => {
            let (n, err, scale, ratio, output) = seen.into_inner();
            let aside = match set_aside.get() {
                0 => String::new(),
                k => format!("; {k} ill-conditioned failing cases set aside"),
            };
            println!("{:<24} {n:>4} cases in {:>5.0} s  worst {err:.3e} (scale {scale:.2e}, {:>5.1}% of the tolerance) in {output}{aside}", P::NAME, started.elapsed().as_secs_f64(), ratio * 100.0);
            worst.rows.push((P::NAME.into(), n, err, scale, ratio, output));
        }
        Err(TestError::Fail(reason, case)) => panic!(
            "{} on {}: {reason}\nminimal case (generator seed {seed}): {}\nreplay: {}",
            P::NAME,
            leg.name,
            serde_json::to_string(&case).unwrap(),
            replay_command(&case)
        ),
        Err(TestError::Abort(reason)) => panic!("{}: the fuzzer gave up: {reason}", P::NAME),
    }
}

/// Every computation of the leg, reference `R` against candidate `C`.
fn run_leg<R: Backend, C: Backend>(leg: Leg, r: R::Device, c: C::Device) {
    println!("{}: {:?}, generator seed {}", leg.name, leg.tolerance, generator_seed());
    let mut worst = Worst::default();
    macro_rules! run {
        ($($p:ident),*) => { $(run_property::<$p, R, C>(&leg, &r, &c, &mut worst);)* };
    }
    every_property!(run);
    if std::env::var("LLAVA_JP_FUZZ_REPLAY").is_err() && std::env::var("LLAVA_JP_FUZZ_ONLY").is_err() {
        macro_rules! count {
            ($($p:ident),*) => { [$(stringify!($p)),*].len() };
        }
        assert_eq!(worst.rows.len(), every_property!(count), "every computation ran");
    }
}

const F32: Tolerance = Tolerance { atol: 1e-4, rtol: 2e-4 };
/// Everything in bf16.
const BF16: Tolerance = Tolerance { atol: 5e-2, rtol: 5e-2 };
/// f32 weights, bf16 matrix work.
const AUTOCAST_BF16: Tolerance = Tolerance { atol: 3e-2, rtol: 3e-2 };

#[cfg(feature = "ndarray")]
#[test]
fn cpu_flex_f32_vs_ndarray_f64() {
    use burn::backend::ndarray::NdArrayDevice;
    let leg = Leg { name: "cpu_flex_f32_vs_ndarray_f64", cases: 24, tolerance: F32, autocast: None, reduced_precision: false };
    run_leg::<burn::backend::NdArray<f64>, burn::backend::Flex>(leg, NdArrayDevice::Cpu, burn::backend::flex::FlexDevice);
}

/// bf16 rounding alone, with no other backend involved: flex with the training autocast against
/// flex in f32, at the CUDA autocast leg's tolerance. Replaying a CUDA autocast failure here tells
/// whether the case is one that bf16 matrix work cannot meet anywhere (a narrow LayerNorm with
/// a tiny variance magnifies rounding) or one the CUDA backend gets wrong.
#[test]
#[ignore = "diagnosis: replays CUDA autocast failures on the CPU"]
fn cpu_flex_autocast_bf16_vs_flex() {
    let leg = Leg { name: "cpu_flex_autocast_bf16_vs_flex", cases: 24, tolerance: AUTOCAST_BF16, autocast: Some(DType::BF16), reduced_precision: false };
    run_leg::<burn::backend::Flex, burn::backend::Flex>(leg, burn::backend::flex::FlexDevice, burn::backend::flex::FlexDevice);
}

/// bf16 storage everywhere (weights, activations, LayerNorm), on the CPU: flex in bf16 against
/// ndarray in f32, at the CUDA bf16 leg's tolerance. Replaying a CUDA bf16 failure here tells
/// whether bf16 storage alone misses on that case (narrow widths magnify rounding) or the CUDA
/// backend gets it wrong. It sets flex's float type for the whole process, so it runs alone.
#[cfg(feature = "ndarray")]
#[test]
#[ignore = "diagnosis: replays CUDA bf16 failures on the CPU; run alone (--exact)"]
fn cpu_flex_bf16_vs_ndarray() {
    use burn::backend::flex::FlexDevice;
    use burn::backend::ndarray::NdArrayDevice;
    assert!(
        std::env::args().any(|a| a == "--exact"),
        "cpu_flex_bf16_vs_ndarray sets flex's float type to bf16 for the whole test process: run it alone, `-- cpu_flex_bf16_vs_ndarray --exact --include-ignored`"
    );
    burn::tensor::set_default_dtypes::<burn::backend::Flex>(&FlexDevice, DType::BF16, DType::I32).expect("flex in bf16 before its first tensor");
    let leg = Leg { name: "cpu_flex_bf16_vs_ndarray", cases: 24, tolerance: BF16, autocast: None, reduced_precision: false };
    run_leg::<burn::backend::NdArray<f32>, burn::backend::Flex>(leg, NdArrayDevice::Cpu, FlexDevice);
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_f32_vs_flex() {
    use burn::backend::wgpu::WgpuDevice;
    // Few cases: every new shape compiles new shaders, which lavapipe does slowly (12 cases per
    // computation took 19 minutes on the 2-core CI machine; the GPU script runs many more).
    let leg = Leg { name: "wgpu_f32_vs_flex", cases: 4, tolerance: F32, autocast: None, reduced_precision: false };
    run_leg::<burn::backend::Flex, burn::backend::Wgpu<f32>>(leg, burn::backend::flex::FlexDevice, WgpuDevice::default());
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs an NVIDIA GPU: model-import/scripts/gpu_backend_fuzz.sh"]
fn cuda_f32_vs_flex() {
    use burn::backend::cuda::CudaDevice;
    // cubecl's f32 matmul may use TF32 tensor cores (10-bit mantissa).
    let leg = Leg { name: "cuda_f32_vs_flex", cases: 64, tolerance: Tolerance { atol: 2e-3, rtol: 5e-3 }, autocast: None, reduced_precision: true };
    run_leg::<burn::backend::Flex, burn::backend::Cuda<f32>>(leg, burn::backend::flex::FlexDevice, CudaDevice::default());
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs an NVIDIA GPU: model-import/scripts/gpu_backend_fuzz.sh"]
fn cuda_bf16_vs_flex() {
    use burn::backend::cuda::CudaDevice;
    let leg = Leg { name: "cuda_bf16_vs_flex", cases: 64, tolerance: BF16, autocast: None, reduced_precision: true };
    run_leg::<burn::backend::Flex, burn::backend::Cuda<half::bf16>>(leg, burn::backend::flex::FlexDevice, CudaDevice::default());
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs an NVIDIA GPU: model-import/scripts/gpu_backend_fuzz.sh"]
fn cuda_autocast_bf16_vs_flex() {
    use burn::backend::cuda::CudaDevice;
    let leg = Leg { name: "cuda_autocast_bf16_vs_flex", cases: 64, tolerance: AUTOCAST_BF16, autocast: Some(DType::BF16), reduced_precision: true };
    run_leg::<burn::backend::Flex, burn::backend::Cuda<f32>>(leg, burn::backend::flex::FlexDevice, CudaDevice::default());
}

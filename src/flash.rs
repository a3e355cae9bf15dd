//! Flash attention on CUDA: [`crate::model::nn::attention`]'s route for bf16 / f16 on burn's
//! fused CUDA backend. burn 0.21's attention writes the `[batch, heads, queries, keys]` scores to
//! memory and walks them several times (24x slower than PyTorch's SDPA on an H200); the kernel
//! here (`src/flash_attention.cu`) keeps them on chip.
//!
//! The kernel is CUDA C++ handed to cubecl as a compiled-kernel task of its own, so cubecl
//! compiles it with NVRTC, keeps its PTX in the kernel cache, and launches it on its own stream in
//! order with every other kernel: no second stream to order against, unlike [`crate::cublaslt`].
//! That makes this module the template for further hand-written CUDA kernels.
//!
//! Covered: queries, keys and values of one dtype (bf16 or f16) with a head width that is a
//! multiple of 16 up to 128, any strides, and any boolean mask (broadcast views included), on
//! `Cuda<bf16>` / `Cuda<f16>` / autocast `Cuda<f32>` and on their autodiff backends, on GPUs
//! with compute capability 8.0 or more, where the
//! backward recomputes the scores from the forward's log-sum-exp: one kernel per block of keys
//! forms dK and dV and adds each tile's dQ share into an f32 accumulator (FlashAttention-2's
//! scheme), or (`LLAVA_JP_FLASH_BACKWARD=split`) two kernels, dQ apart, recompute them twice.
//! Attention dropout is in the kernels, as [`SeededDropout`] describes it (a hash
//! of a seed drawn on the device and each probability's place decides), so the backward drops
//! the same probabilities without a stored mask.
//!
//! Status (H200, 2026-12-02): the backend fuzzer's attention, attention-gradient and
//! attention-with-dropout properties pass on the bf16 and autocast legs (worst 31% of their
//! tolerances). Speed at batch 8 x 1024, causal, head width 128: forward 0.94 ms against burn's
//! 2.07 ms (PyTorch's SDPA: 0.088 ms), forward and backward 3.0 ms against burn's 4.75 ms (SDPA:
//! 0.55 ms), 3.1 ms with dropout 0.1 (SDPA: 0.63 ms); CLIP's 8 x 577 x 64 forward 0.25 ms
//! against burn's 0.92 ms. A full-size stage-2 step takes 0.58 s instead of 0.77 s and peaks at
//! 69.5 GiB instead of 89 (the GPU is then busy 59% of the step: the rest is host work). So the
//! route is on everywhere by default ([`Route::Training`]). Since 2026-12-04 the tiles come by
//! asynchronous copies and the fused-`qkv` route writes token-major output and `qkv`'s gradient
//! in place (`model-import/results/bf16-activations-2026-12-04/`: 43 ms of a stage-2 step, 68
//! before). Since 2026-12-05 a tile map skips fully hidden tiles and tests no mask on fully
//! visible ones (H100: forward 0.31 ms, forward and backward 1.23 ms at 8 x 1024;
//! `model-import/results/kernel-variants-2026-12-05/`); what is left is double-buffered tiles,
//! larger query tiles, a backward that does not spill, and Hopper's wgmma, which SDPA's kernels
//! use.

use std::sync::OnceLock;

use crate::backend::autodiff_cuda_backends;
use burn::backend::ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use burn_cubecl::cubecl::cuda::{CudaCompiler, CudaRuntime};
use burn_cubecl::cubecl::prelude::{
    AddressType, CompiledKernel, CubeCount, CubeDim, ExecutionMode, KernelDefinition, KernelId, KernelMetadata, KernelOptions, Scope,
    StorageType,
};
use burn_cubecl::cubecl::server::{KernelArguments, MetadataBindingInfo};
use burn_cubecl::cubecl::{CompilationError, Compiler, CubeTask};
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{FusionRuntime, FusionTensor};

use crate::cublaslt::downcast;
use crate::cuda_kernel::{autodiff_cuda, on_autodiff_cuda, Setting};
use crate::model::nn::{AttentionDropout, SeededDropout};

type Inner = CubeBackend<CudaRuntime, f32, i32, u8>;
type Runtime = FusionCubeRuntime<CudaRuntime>;
/// The float and bool primitive of `Cuda<_>`.
type Primitive = FusionTensor<Runtime>;

pub(crate) const SOURCE: &str = include_str!("flash_attention.cu");

/// The kernels' CUDA source: [`SOURCE`], or the file `LLAVA_JP_FLASH_SOURCE` names, so that a
/// variant of `src/flash_attention.cu` (same entry points and arguments) is tested and timed on
/// the GPU machine without another build. Read once per process.
pub(crate) fn source() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| crate::cuda_kernel::source_or_file("LLAVA_JP_FLASH_SOURCE", SOURCE).unwrap_or_else(|e| panic!("{e}")))
}

/// Rows (queries or keys) per block and threads per block: `TILE` and the launch bounds in the
/// source.
const BLOCK: usize = 64;
const THREADS: u32 = 128;

/// Which attentions take the flash kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// None: burn's attention everywhere.
    Burn,
    /// Attention no gradient flows through (inference, a frozen vision tower while training).
    Inference,
    /// Training's too, through the backward kernels, dropout included.
    Training,
}

/// `LLAVA_JP_ATTENTION`'s spellings, in [`ROUTES`]' order (`flash-train`: the training route's
/// name before it became the default).
static ROUTE: Setting = Setting::new("LLAVA_JP_ATTENTION", &["flash|flash-train", "flash-inference", "burn"]);
const ROUTES: [Route; 3] = [Route::Training, Route::Inference, Route::Burn];

/// The route: `LLAVA_JP_ATTENTION` = `flash` (the default: [`Route::Training`]),
/// `flash-inference` ([`Route::Inference`]) or `burn`, unless [`set_route`] said otherwise.
pub fn route() -> Route {
    ROUTES[ROUTE.index()]
}

/// Sets the route for the whole process (benchmarks compare them).
pub fn set_route(route: Route) {
    ROUTE.set(ROUTES.iter().position(|r| *r == route).expect("a listed route"));
}

type Rejected<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, Option<Tensor<B, 4, Bool>>);

/// `softmax(q kᵀ · scale, hidden where masked) v`, with `dropout`, by the flash kernel when `B`
/// and the operands are ones it covers (see the module's notes; random dropout only on the
/// training route); the operands come back untouched otherwise.
pub fn try_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    masked: Option<Tensor<B, 4, Bool>>,
    scale: f64,
    dropout: AttentionDropout,
) -> Result<Tensor<B, 4>, Rejected<B>> {
    let ([b, h, tq, d], [_, _, tk, _]) = (q.dims(), k.dims());
    let dtype = q.dtype();
    // The type test first, so that other backends never read the route's variable.
    let fused = std::any::TypeId::of::<B::FloatTensorPrimitive>() == std::any::TypeId::of::<Primitive>();
    if !fused && !autodiff_cuda::<B>() {
        return Err((q, k, v, masked));
    }
    let covered = route() != Route::Burn
        && matches!(dtype, DType::BF16 | DType::F16)
        && k.dtype() == dtype
        && v.dtype() == dtype
        && d % 16 == 0
        && (16..=128).contains(&d)
        && tq > 0
        && tk > 0
        && (1..=65535).contains(&(b * h)) // one grid row per (batch, head)
        && k.dims() == [b, h, tk, d]
        && v.dims() == [b, h, tk, d]
        && masked.as_ref().is_none_or(|m| m.dims() == [b, h, tq, tk])
        && covers_dropout(dropout)
        && tensor_cores(&q.device());
    if !covered {
        return Err((q, k, v, masked));
    }
    let dropout = kernel_dropout::<B>(dropout, &q.device());
    if fused {
        let prim = |t: Tensor<B, 4>| downcast::<_, Primitive>(t.into_primitive().tensor()).ok().unwrap();
        let mask = masked.map(|m| downcast::<_, Primitive>(m.into_primitive()).ok().unwrap());
        let out = register_forward(prim(q), prim(k), prim(v), mask, dropout, scale, Layout::HeadMajor).0;
        let out = downcast::<Primitive, B::FloatTensorPrimitive>(out).ok().unwrap();
        return Ok(Tensor::from_primitive(TensorPrimitive::Float(out)));
    }
    autodiff_attention(q, k, v, masked, dropout, scale)
}

/// Dropout as the kernels take it: the probability and the seed's two words on the device.
type KernelDropout = Option<(f64, Primitive)>;

/// Whether the kernels take `dropout` (random dropout only on the training route).
fn covers_dropout(dropout: AttentionDropout) -> bool {
    match dropout {
        AttentionDropout::None => true,
        AttentionDropout::Random(prob) => route() == Route::Training && (0.0..1.0).contains(&prob),
        AttentionDropout::Seeded(d) => (0.0..1.0).contains(&d.prob),
    }
}

/// `dropout` as the kernels take it. The seed is two 32-bit words on the device: drawn there
/// from the backend's generator (seeded runs repeat, and no value comes back to the host), or
/// as given. A probability of 0 is no dropout (and registers no seed the kernels would not
/// read).
fn kernel_dropout<B: Backend>(dropout: AttentionDropout, device: &B::Device) -> KernelDropout {
    let seed_words = |words: [u32; 2]| Tensor::<B, 1, Int>::from_data(TensorData::new(words.map(|w| w as i32).to_vec(), [2]), device);
    let dropout = match dropout {
        AttentionDropout::Random(prob) if prob > 0.0 => {
            Some((prob, Tensor::<B, 1, Int>::random([2], burn::tensor::Distribution::Uniform(0.0, 2_147_483_647.0), device)))
        }
        AttentionDropout::Seeded(d) if d.prob > 0.0 => Some((d.prob, seed_words(d.seed))),
        _ => None,
    };
    dropout.map(|(prob, seed)| (prob, downcast::<_, Primitive>(seed.into_primitive()).ok().unwrap()))
}

/// GPT-2's attention from its fused projection, under autodiff on the training route, as one
/// recorded operation: `qkv` `[batch, tokens, 3 · width]` (queries, keys and values side by
/// side, as `c_attn` writes them) is cast to `compute` (autocast; `None` keeps `qkv`'s dtype),
/// split into `heads` heads, attended by the flash kernels, and the heads' outputs are merged
/// back to `[batch, tokens, width]` in `qkv`'s dtype. Written with burn's operations that is
/// ~16 recorded operations (three slices, the head splits, four casts, the kernel, the merge),
/// each with its backward; here the backward is the flash backward kernels, done once. The
/// kernels write the output with a query's heads side by side and the gradients of q, k and v
/// side by side in one `[batch, tokens, 3 · width]` buffer (`Layout::TokenMajor`), so no copy
/// merges them. `qkv` and the mask come back untouched where the kernels do not cover
/// the case (see [`try_attention`]), and when `LLAVA_JP_FUSED_OPS=0`.
pub fn try_attention_from_qkv<B: Backend>(
    qkv: Tensor<B, 3>,
    heads: usize,
    masked: Option<Tensor<B, 4, Bool>>,
    scale: f64,
    dropout: AttentionDropout,
    compute: Option<DType>,
) -> Result<Tensor<B, 3>, (Tensor<B, 3>, Option<Tensor<B, 4, Bool>>)> {
    let [b, t, width3] = qkv.dims();
    let kernel_dtype = compute.unwrap_or(qkv.dtype());
    let head_dim = width3 / 3 / heads.max(1);
    let covered = autodiff_cuda::<B>()
        && route() == Route::Training
        && crate::fused_ops::enabled()
        && matches!(kernel_dtype, DType::BF16 | DType::F16)
        && matches!(qkv.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && heads > 0
        && width3 == 3 * heads * head_dim
        && head_dim % 16 == 0
        && (16..=128).contains(&head_dim)
        && b * t > 0
        && (1..=65535).contains(&(b * heads))
        && masked.as_ref().is_none_or(|m| m.dims() == [b, heads, t, t])
        && covers_dropout(dropout)
        && tensor_cores(&qkv.device());
    if !covered {
        return Err((qkv, masked));
    }
    let dropout = kernel_dropout::<B>(dropout, &qkv.device());
    let mask = masked.map(|m| downcast::<_, Primitive>(m.into_primitive()).ok().unwrap());
    let op = autodiff::QkvAttention { heads, scale, dropout, mask, compute: kernel_dtype };
    match on_autodiff_cuda::<B, 1, _>(op, [qkv.into_primitive().tensor()]) {
        Ok(y) => Ok(Tensor::from_primitive(TensorPrimitive::Float(y))),
        Err(_) => unreachable!("autodiff_cuda::<B>() was checked above"),
    }
}

/// Whether the device has the tensor-core instructions the kernels use (`mma.sync` m16n8k16 with
/// bf16, compute capability 8.0 and up); older GPUs keep burn's attention. Asked once per device.
pub(crate) fn tensor_cores<D: 'static>(device: &D) -> bool {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static ANSWERS: OnceLock<Mutex<HashMap<usize, bool>>> = OnceLock::new();
    let Some(index) = (device as &dyn std::any::Any).downcast_ref::<burn::backend::cuda::CudaDevice>().map(|d| d.index) else {
        return false;
    };
    let mut answers = ANSWERS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    *answers.entry(index).or_insert_with(|| {
        cudarc::driver::CudaContext::new(index).and_then(|c| c.compute_capability()).is_ok_and(|(major, _)| major >= 8)
    })
}

/// On the autodiff CUDA backends: the flash forward, and its backward when an operand is tracked
/// and the route is [`Route::Training`].
fn autodiff_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    masked: Option<Tensor<B, 4, Bool>>,
    dropout: KernelDropout,
    scale: f64,
) -> Result<Tensor<B, 4>, Rejected<B>> {
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::{Autodiff, Cuda};
    use burn::tensor::{bf16, f16};
    macro_rules! route {
        ($($inner:ty, $strategy:ty);*) => {$(
            if std::any::TypeId::of::<B>() == std::any::TypeId::of::<Autodiff<$inner, $strategy>>() {
                type P = burn::tensor::ops::FloatTensor<Autodiff<$inner, $strategy>>;
                let prim = |t: Tensor<B, 4>| downcast::<_, P>(t.into_primitive().tensor()).ok().unwrap();
                let (pq, pk, pv) = (prim(q), prim(k), prim(v));
                if (pq.is_tracked() || pk.is_tracked() || pv.is_tracked()) && route() != Route::Training {
                    let back = |p: P| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(downcast::<P, B::FloatTensorPrimitive>(p).ok().unwrap()));
                    return Err((back(pq), back(pk), back(pv), masked));
                }
                let mask = masked.map(|m| downcast::<_, Primitive>(m.into_primitive()).ok().unwrap());
                let out = autodiff::attention::<$inner, $strategy>(pq, pk, pv, mask, dropout, scale);
                let out = downcast::<P, B::FloatTensorPrimitive>(out).ok().unwrap();
                return Ok(Tensor::from_primitive(TensorPrimitive::Float(out)));
            }
        )*};
    }
    autodiff_cuda_backends!(route);
    Err((q, k, v, masked))
}

/// Which kernel of `SOURCE` a launch runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kernel {
    Forward,
    /// The split backward: dQ, then dK and dV, each recomputing the scores.
    BackwardDq,
    BackwardDkDv,
    /// The fused backward: dK and dV, and dQ added into an f32 accumulator that `DqZero`
    /// clears before and `DqStore` rounds into dQ after.
    Backward,
    DqZero,
    DqStore,
    /// rowsum(dO * O) per query row, for either backward.
    Delta,
    /// What each 64 x 64 tile of the mask sees, once per launch, for the kernels above.
    TileMap,
}

impl Kernel {
    fn entry(self) -> &'static str {
        match self {
            Kernel::Forward => "flash_attention_forward",
            Kernel::BackwardDq => "flash_attention_backward_dq",
            Kernel::BackwardDkDv => "flash_attention_backward_dkdv",
            Kernel::Backward => "flash_attention_backward",
            Kernel::DqZero => "flash_attention_dq_zero",
            Kernel::DqStore => "flash_attention_dq_store",
            Kernel::Delta => "flash_attention_delta",
            Kernel::TileMap => "flash_attention_tile_map",
        }
    }

    /// The dynamic shared memory a block takes, in bytes (`FUSED_SHARED_BYTES` in the source:
    /// the key, value, query and dO tiles, dSᵀ, the mask tile, and three per-query vectors);
    /// the other kernels' is static.
    fn dynamic_shared_bytes(self, head_dim: usize) -> usize {
        const MASK_ROW: usize = BLOCK + 16;
        match self {
            Kernel::Backward => 4 * BLOCK * (head_dim + 8) * 2 + BLOCK * (BLOCK + 8) * 2 + BLOCK * MASK_ROW + 3 * BLOCK * 4,
            _ => 0,
        }
    }
}

/// The kernels of the attention's backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backward {
    /// One kernel per block of keys: dK, dV, and dQ by atomics (the default).
    Fused,
    /// dQ and dK dV apart, each recomputing the scores.
    Split,
}

static BACKWARD: Setting = Setting::new("LLAVA_JP_FLASH_BACKWARD", &["fused", "split"]);
const BACKWARDS: [Backward; 2] = [Backward::Fused, Backward::Split];

/// The backward's kernels: `LLAVA_JP_FLASH_BACKWARD` = `fused` (the default) or `split`,
/// unless [`set_backward`] said otherwise.
pub fn backward() -> Backward {
    BACKWARDS[BACKWARD.index()]
}

/// Sets the backward's kernels for the whole process (tests and benchmarks compare them).
pub fn set_backward(kernels: Backward) {
    BACKWARD.set(BACKWARDS.iter().position(|k| *k == kernels).expect("a listed backward"));
}

/// How the kernels lay out what they write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// The forward's output `[batch, heads, queries, D]`; the backward's dq, dk, dv apart, each
    /// `[batch, heads, tokens, D]`.
    HeadMajor,
    /// What a fused `qkv` projection makes and its output projection reads: the forward's
    /// output `[batch, queries, heads, D]` (a query's heads side by side), the backward's one
    /// `[batch, tokens, 3, heads, D]` (dq, dk, dv side by side: `qkv`'s gradient; queries and
    /// keys the same tokens). No copy merges heads or gradients.
    TokenMajor,
}

/// The strides over `[batch, head, position]` of an output laid out as `[batch, heads,
/// tokens, d]` (head-major) or `[batch, tokens, parts, heads, d]` (token-major, `parts`
/// outputs side by side).
fn out_strides(layout: Layout, [heads, tokens, d]: [usize; 3], parts: usize) -> [usize; 3] {
    match layout {
        Layout::HeadMajor => [heads * tokens * d, tokens * d, d],
        Layout::TokenMajor => [tokens * parts * heads * d, d, parts * heads * d],
    }
}

/// Queues the forward on the fused backend's stream as a custom operation: the output (shaped
/// as `layout` says) and the rows' log-sum-exp (f32 `[batch, heads, queries]`, for the
/// backward).
fn register_forward(q: Primitive, k: Primitive, v: Primitive, mask: Option<Primitive>, dropout: KernelDropout, scale: f64, layout: Layout) -> (Primitive, Primitive) {
    let client = q.client.clone();
    let [b, h, tq, d]: [usize; 4] = q.shape.to_vec().try_into().expect("4-d queries");
    let shape = match layout {
        Layout::HeadMajor => Shape::new([b, h, tq, d]),
        Layout::TokenMajor => Shape::new([b, tq, h, d]),
    };
    let dtype = q.dtype;
    let (drop_prob, seed) = split(dropout);
    let mut inputs = vec![&q, &k, &v];
    inputs.extend(mask.as_ref());
    inputs.extend(seed.as_ref());
    let streams = OperationStreams::with_inputs(inputs);
    let out = TensorIr::uninit(client.create_empty_handle(), shape, dtype);
    let lse = TensorIr::uninit(client.create_empty_handle(), Shape::new([b, h, tq]), DType::F32);
    let with_mask = mask.is_some();
    let mut irs = vec![q.into_ir(), k.into_ir(), v.into_ir()];
    irs.extend(mask.map(|m| m.into_ir()));
    irs.extend(seed.map(|s| s.into_ir()));
    let desc = CustomOpIr::new("flash_attention_forward", &irs, &[out, lse]);
    let op = FlashForward { desc: desc.clone(), with_mask, drop_prob, scale, layout };
    let mut outputs = client.register(streams, OperationIr::Custom(desc), op);
    let lse = outputs.pop().expect("two outputs");
    (outputs.pop().expect("two outputs"), lse)
}

/// What the backward gives, as [`Layout`] says.
enum Grads {
    HeadMajor(Primitive, Primitive, Primitive),
    /// `[batch, tokens, 3 · heads · d]`.
    TokenMajor(Primitive),
}

/// Queues the backward: the gradients of q, k and v (laid out as `layout` says) from the
/// forward's operands, output (`[batch, heads, queries, d]`, perhaps a view) and log-sum-exp
/// and the output's gradient.
#[allow(clippy::too_many_arguments)]
fn register_backward(
    q: Primitive,
    k: Primitive,
    v: Primitive,
    mask: Option<Primitive>,
    dropout: KernelDropout,
    out: Primitive,
    lse: Primitive,
    grad: Primitive,
    scale: f64,
    layout: Layout,
) -> Grads {
    type Fused = burn::backend::Cuda<f32>;
    let tensor = |p: Primitive| Tensor::<Fused, 4>::from_primitive(TensorPrimitive::Float(p));
    let [b, h, tq, _] = tensor(out.clone()).dims();
    let grad = if grad.dtype == out.dtype { grad } else { tensor(grad).cast(out.dtype).into_primitive().tensor() };

    let client = q.client.clone();
    let dtype = q.dtype;
    let (q_shape, k_shape) = (q.shape.clone(), k.shape.clone());
    let (drop_prob, seed) = split(dropout);
    let mut inputs = vec![&q, &k, &v, &grad, &lse, &out];
    inputs.extend(mask.as_ref());
    inputs.extend(seed.as_ref());
    let streams = OperationStreams::with_inputs(inputs);
    let outputs = match layout {
        Layout::HeadMajor => vec![q_shape, k_shape.clone(), k_shape],
        Layout::TokenMajor => {
            assert_eq!(q_shape, k_shape, "a qkv projection's queries and keys are the same tokens");
            vec![Shape::new([b, tq, 3 * h * q_shape[3]])]
        }
    };
    let outputs: Vec<TensorIr> = outputs.into_iter().map(|shape| TensorIr::uninit(client.create_empty_handle(), shape, dtype)).collect();
    let with_mask = mask.is_some();
    let mut irs = vec![q.into_ir(), k.into_ir(), v.into_ir(), grad.into_ir(), lse.into_ir(), out.into_ir()];
    irs.extend(mask.map(|m| m.into_ir()));
    irs.extend(seed.map(|s| s.into_ir()));
    let desc = CustomOpIr::new("flash_attention_backward", &irs, &outputs);
    // Chosen now, not when the fused stream runs the operation.
    let op = FlashBackward { desc: desc.clone(), with_mask, drop_prob, scale, layout, kernels: backward() };
    let mut outputs = client.register(streams, OperationIr::Custom(desc), op).into_iter();
    let mut next = || outputs.next().expect("the backward's outputs");
    match layout {
        Layout::HeadMajor => Grads::HeadMajor(next(), next(), next()),
        Layout::TokenMajor => Grads::TokenMajor(next()),
    }
}

/// The dropout probability (0 without) and the seed, apart.
fn split(dropout: KernelDropout) -> (f64, Option<Primitive>) {
    dropout.map_or((0.0, None), |(prob, seed)| (prob, Some(seed)))
}

#[derive(Debug)]
struct FlashForward {
    desc: CustomOpIr,
    with_mask: bool,
    /// With dropout (more than 0), the seed is the input after the mask.
    drop_prob: f64,
    scale: f64,
    layout: Layout,
}

impl Operation<Runtime> for FlashForward {
    fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
        let inputs = &self.desc.inputs;
        let q = handles.get_float_tensor::<Inner>(&inputs[0]);
        let k = handles.get_float_tensor::<Inner>(&inputs[1]);
        let v = handles.get_float_tensor::<Inner>(&inputs[2]);
        let mask = self.with_mask.then(|| handles.get_bool_tensor::<Inner>(&inputs[3]));
        let seed = (self.drop_prob > 0.0).then(|| handles.get_int_tensor::<Inner>(&inputs[3 + self.with_mask as usize]));
        let [b, h, tq, d]: [usize; 4] = q.meta.shape().to_vec().try_into().expect("4-d queries");
        let out = match self.layout {
            Layout::HeadMajor => empty(&q, [b, h, tq, d], q.dtype),
            Layout::TokenMajor => empty(&q, [b, tq, h, d], q.dtype),
        };
        let lse = empty(&q, [b, h, tq], DType::F32);
        let dropout = seed.as_ref().map(|s| (self.drop_prob, s));
        let mut operands = Operands { q: &q, k: &k, v: &v, mask: mask.as_ref(), map: None, dropout, grad: None, scale: self.scale };
        let map = tile_map(&operands);
        operands.map = map.as_ref();
        launch(Kernel::Forward, &operands, vec![&out, &lse], tq, out_strides(self.layout, [h, tq, d], 1));
        handles.register_float_tensor::<Inner>(&self.desc.outputs[0].id, out);
        handles.register_float_tensor::<Inner>(&self.desc.outputs[1].id, lse);
    }
}

#[derive(Debug)]
struct FlashBackward {
    desc: CustomOpIr,
    with_mask: bool,
    drop_prob: f64,
    scale: f64,
    layout: Layout,
    kernels: Backward,
}

impl Operation<Runtime> for FlashBackward {
    fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
        let inputs = &self.desc.inputs;
        let mut get = |i: usize| handles.get_float_tensor::<Inner>(&inputs[i]);
        let (q, k, v, grad) = (get(0), get(1), get(2), get(3));
        let lse = contiguous(get(4));
        // The output, read by delta's kernel with its dimensions contiguous.
        let out = get(5);
        let out = if out.meta.strides()[3] == 1 { out } else { into_contiguous(out) };
        let mask = self.with_mask.then(|| handles.get_bool_tensor::<Inner>(&inputs[6]));
        let seed = (self.drop_prob > 0.0).then(|| handles.get_int_tensor::<Inner>(&inputs[6 + self.with_mask as usize]));
        let [b, h, tq, d]: [usize; 4] = q.meta.shape().to_vec().try_into().expect("4-d queries");
        let tk = k.meta.shape()[2];
        let dropout = seed.as_ref().map(|s| (self.drop_prob, s));
        let mut operands = Operands { q: &q, k: &k, v: &v, mask: mask.as_ref(), map: None, dropout, grad: Some(&grad), scale: self.scale };
        let map = tile_map(&operands);
        operands.map = map.as_ref();
        // dq, dk, dv (token-major: views of one buffer, `whole`) and the strides of each over
        // [batch, head, position].
        let (grads, whole, dq_strides, dkdv_strides) = match self.layout {
            Layout::HeadMajor => {
                let grads = vec![empty(&q, [b, h, tq, d], q.dtype), empty(&q, [b, h, tk, d], q.dtype), empty(&q, [b, h, tk, d], q.dtype)];
                (grads, None, out_strides(self.layout, [h, tq, d], 1), out_strides(self.layout, [h, tk, d], 1))
            }
            Layout::TokenMajor => {
                // One buffer; dk and dv start one and two widths into each token's row.
                let dqkv = empty(&q, [b, tq, 3 * h * d], q.dtype);
                let part = |i: usize| {
                    let mut view = dqkv.clone();
                    view.handle = view.handle.offset_start((i * h * d * q.dtype.size()) as u64);
                    view
                };
                let strides = out_strides(self.layout, [h, tq, d], 3);
                (vec![part(0), part(1), part(2)], Some(dqkv.clone()), strides, strides)
            }
        };
        let [dq, dk, dv] = [&grads[0], &grads[1], &grads[2]];
        // delta = rowsum(dO * O), which every score gradient subtracts (burn's multiply and
        // sum wrote the f32 products out and read them back: ~0.19 ms a layer at stage 1).
        let delta = empty(&q, [b, h, tq], DType::F32);
        let o = out.meta.strides();
        launch(Kernel::Delta, &operands, vec![&out, &delta], tq, [o[0], o[1], o[2]]);
        if self.kernels == Backward::Fused {
            let dq_acc = empty(&q, [b, h, tq, d], DType::F32);
            launch(Kernel::DqZero, &operands, vec![&dq_acc], tq, dq_strides);
            launch(Kernel::Backward, &operands, vec![&lse, &delta, &dq_acc, dk, dv], tk, dkdv_strides);
            launch(Kernel::DqStore, &operands, vec![&dq_acc, dq], tq, dq_strides);
        } else {
            launch(Kernel::BackwardDq, &operands, vec![&lse, &delta, dq], tq, dq_strides);
            launch(Kernel::BackwardDkDv, &operands, vec![&lse, &delta, dk, dv], tk, dkdv_strides);
        }
        match whole {
            None => {
                for (output, tensor) in self.desc.outputs.iter().zip(grads) {
                    handles.register_float_tensor::<Inner>(&output.id, tensor);
                }
            }
            Some(dqkv) => handles.register_float_tensor::<Inner>(&self.desc.outputs[0].id, dqkv),
        }
    }
}

type Cube = CubeTensor<CudaRuntime>;

/// Row-major (contiguous) strides of `shape`.
fn row_major<const N: usize>(shape: [usize; N]) -> [usize; N] {
    let mut strides = [1; N];
    for i in (0..N.saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// A new contiguous tensor on `like`'s device.
pub(crate) fn empty<const N: usize>(like: &Cube, shape: [usize; N], dtype: DType) -> Cube {
    let handle = like.client.empty(shape.iter().product::<usize>() * dtype.size());
    CubeTensor::new(like.client.clone(), handle, burn_std::Metadata::new(Shape::new(shape), row_major(shape)), like.device.clone(), dtype)
}

/// The per-row f32 vectors (`[batch, heads, queries]`) are read as contiguous.
fn contiguous(tensor: Cube) -> Cube {
    let shape: [usize; 3] = tensor.meta.shape().to_vec().try_into().expect("[batch, heads, queries]");
    if tensor.meta.strides().iter().eq(row_major(shape).iter()) { tensor } else { into_contiguous(tensor) }
}

/// What every kernel reads: the forward's operands, the mask, the dropout's probability and
/// seed, the output's gradient (backward).
struct Operands<'a> {
    q: &'a Cube,
    k: &'a Cube,
    v: &'a Cube,
    mask: Option<&'a Cube>,
    /// The mask's tile map (`tile_map`), where there is a mask.
    map: Option<&'a Cube>,
    dropout: Option<(f64, &'a Cube)>,
    grad: Option<&'a Cube>,
    scale: f64,
}

/// What each 64 x 64 tile of `ops`' mask sees (none, some or all of its keys: one byte each,
/// per batch, and per head unless the mask is the same for every head), so that the kernels
/// stage and test only the tiles that see some keys and not others (`flash_attention_tile_map`).
fn tile_map(ops: &Operands) -> Option<Cube> {
    let mask = ops.mask?;
    let shape = ops.q.meta.shape();
    let (b, h, tq, tk) = (shape[0], shape[1], shape[2], ops.k.meta.shape()[2]);
    let heads = if mask.meta.strides()[1] == 0 { 1 } else { h };
    let tiles = tq.div_ceil(BLOCK) * tk.div_ceil(BLOCK);
    let map = empty(ops.q, [b * heads * tiles], DType::U8);
    // The forward's operands (the kernel takes no output gradient), no map yet.
    let forward = Operands { q: ops.q, k: ops.k, v: ops.v, mask: ops.mask, map: None, dropout: ops.dropout, grad: None, scale: ops.scale };
    launch_grid(Kernel::TileMap, &forward, vec![&map], CubeCount::Static(tiles as u32, (b * heads) as u32, 1), [0; 3]);
    Some(map)
}

/// Launches `kernel` with the operands' buffers followed by `outputs` (the kernel's own
/// argument order; those of `q`'s shape laid out by `out_strides` over [batch, head,
/// position]), one block per 64 of `rows` per (batch, head).
fn launch(kernel: Kernel, ops: &Operands, outputs: Vec<&Cube>, rows: usize, out_strides: [usize; 3]) {
    let shape = ops.q.meta.shape();
    let count = CubeCount::Static(rows.div_ceil(BLOCK) as u32, (shape[0] * shape[1]) as u32, 1);
    launch_grid(kernel, ops, outputs, count, out_strides)
}

/// [`launch`] on a grid of the caller's.
fn launch_grid(kernel: Kernel, ops: &Operands, outputs: Vec<&Cube>, count: CubeCount, out_strides: [usize; 3]) {
    let shape = ops.q.meta.shape();
    let (b, h, tq, d, tk) = (shape[0], shape[1], shape[2], shape[3], ops.k.meta.shape()[2]);
    let strides = |t: Option<&Cube>| -> [u64; 4] {
        t.map_or([0; 4], |t| {
            let s = t.meta.strides();
            [s[0] as u64, s[1] as u64, s[2] as u64, s[3] as u64]
        })
    };
    let mut info = vec![b as u64, h as u64, tq as u64, tk as u64];
    for t in [Some(ops.q), Some(ops.k), Some(ops.v), ops.mask, ops.grad] {
        info.extend(strides(t));
    }
    info.push(((ops.scale * std::f64::consts::LOG2_E) as f32).to_bits() as u64);
    info.push((ops.scale as f32).to_bits() as u64);
    let drop_prob = ops.dropout.map_or(0.0, |(prob, seed)| {
        assert_eq!(seed.dtype.size(), 4, "the dropout seed is read as two 32-bit words");
        prob
    });
    info.push(SeededDropout::drop_below(drop_prob) as u64);
    info.push(((1.0 / (1.0 - drop_prob)) as f32).to_bits() as u64);
    info.extend(out_strides.map(|s| s as u64));
    info.push(ops.map.is_some() as u64);
    // Without a mask, tile map or dropout the kernel never reads that argument; any live buffer
    // fills the slot.
    let mut buffers = vec![ops.q, ops.k, ops.v, ops.mask.unwrap_or(ops.q), ops.dropout.map_or(ops.q, |(_, seed)| seed), ops.map.unwrap_or(ops.q)];
    buffers.extend(ops.grad);
    buffers.extend(outputs);
    let mut args = KernelArguments::new();
    args.buffers = buffers.into_iter().map(|t| t.handle.clone().binding()).collect();
    // All of it static: cubecl would pass a dynamic part as one more buffer argument.
    let words = info.len();
    args.info = MetadataBindingInfo::new(info, words);
    let task = FlashTask {
        kernel,
        head_dim: d,
        bf16: ops.q.dtype == DType::BF16,
        mask_bytes: ops.mask.map_or(0, |m| m.dtype.size()),
        dropout: ops.dropout.is_some(),
    };
    ops.q.client.launch(Box::new(task), count, args);
}

/// One kernel of `SOURCE` for one head width, operand type, mask type and dropout or not: the
/// source behind four `#define`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlashTask {
    kernel: Kernel,
    head_dim: usize,
    bf16: bool,
    mask_bytes: usize,
    dropout: bool,
}

impl FlashTask {
    fn source(&self) -> String {
        let (d, bf16, mask, dropout) = (self.head_dim, self.bf16 as u8, self.mask_bytes, self.dropout as u8);
        let tuning = tuning_defines();
        format!("#define HEAD_DIM {d}\n#define IS_BF16 {bf16}\n#define MASK_BYTES {mask}\n#define DROPOUT {dropout}\n{tuning}{}", source())
    }
}

/// The knobs of `src/flash_attention.cu` that `LLAVA_JP_FLASH_DEFINES` may set (each an
/// `#ifndef` there with its default); the source's other defines describe the operands' layout.
/// `TILE_MAP=0` turns the kernels' use of the tile map off (the map is still built).
const TUNING_KNOBS: [&str; 5] = ["DQ_KEYS", "DKDV_QUERIES", "BACKWARD_MIN_BLOCKS", "FORWARD_MIN_BLOCKS", "TILE_MAP"];

/// `LLAVA_JP_FLASH_DEFINES="NAME=VALUE ..."`: tuning knobs ([`TUNING_KNOBS`]) set for the
/// process, as `#define` lines, so that variants are timed on the GPU machine without another
/// build.
fn tuning_defines() -> &'static str {
    static DEFINES: OnceLock<String> = OnceLock::new();
    DEFINES.get_or_init(|| {
        parse_tuning_defines(&std::env::var("LLAVA_JP_FLASH_DEFINES").unwrap_or_default()).unwrap_or_else(|e| panic!("LLAVA_JP_FLASH_DEFINES: {e}"))
    })
}

/// `#define` lines of space-separated `NAME=NUMBER` pairs, each name a tuning knob.
fn parse_tuning_defines(value: &str) -> Result<String, String> {
    value
        .split_whitespace()
        .map(|pair| match pair.split_once('=') {
            Some((name, v)) if TUNING_KNOBS.contains(&name) && v.parse::<u32>().is_ok() => Ok(format!("#define {name} {v}\n")),
            _ => Err(format!("{pair:?} is not NAME=NUMBER with NAME one of {TUNING_KNOBS:?}")),
        })
        .collect()
}

/// FNV-1a of the kernel source and its tuning: part of the kernel's id, so that an edited
/// source is never served from cubecl's on-disk PTX cache.
fn source_hash() -> u64 {
    static HASH: OnceLock<u64> = OnceLock::new();
    *HASH.get_or_init(|| fnv1a(&format!("{}{}", tuning_defines(), source())))
}

/// FNV-1a, 64 bits: what a hand-written kernel's id carries of its source.
pub(crate) fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

impl KernelMetadata for FlashTask {
    /// The entry point, for cubecl's profile.
    fn name(&self) -> &'static str {
        self.kernel.entry()
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((*self, source_hash())).cube_dim(CubeDim::new_1d(THREADS))
    }

    fn address_type(&self) -> StorageType {
        AddressType::U64.unsigned_type()
    }
}

impl CubeTask<CudaCompiler> for FlashTask {
    fn compile(
        &self,
        compiler: &mut CudaCompiler,
        options: &<CudaCompiler as Compiler>::CompilationOptions,
        mode: ExecutionMode,
        address_type: StorageType,
    ) -> Result<CompiledKernel<CudaCompiler>, CompilationError> {
        let shared = self.kernel.dynamic_shared_bytes(self.head_dim);
        compile_source(compiler, options, mode, address_type, self.kernel.entry(), self.source(), THREADS, shared)
    }
}

/// A kernel of our own CUDA C++ `source` (entry point `entry`, `threads` per block,
/// `dynamic_shared` bytes of dynamic shared memory) as cubecl's compiler hands kernels on:
/// NVRTC compiles the source, and cubecl wants its own representation beside it, an empty
/// kernel's, from which it reads the dynamic shared memory to launch with (and to allow past
/// 48 KiB).
pub(crate) fn compile_source(
    compiler: &mut CudaCompiler,
    options: &<CudaCompiler as Compiler>::CompilationOptions,
    mode: ExecutionMode,
    address_type: StorageType,
    entry: &str,
    source: String,
    threads: u32,
    dynamic_shared: usize,
) -> Result<CompiledKernel<CudaCompiler>, CompilationError> {
    let empty = KernelDefinition {
        buffers: vec![],
        tensor_maps: vec![],
        scalars: vec![],
        cube_dim: CubeDim::new_1d(threads),
        body: Scope::root(false),
        options: KernelOptions { kernel_name: entry.into(), debug_symbols: false, cluster_dim: None },
    };
    let mut repr = compiler.compile(empty, options, mode, address_type)?;
    if dynamic_shared > 0 {
        // One byte array: cubecl launches with the end of the last shared memory it lists.
        let bytes = cubecl_cpp::shared::Item::new(cubecl_cpp::shared::Elem::U8, 1, false);
        repr.body.shared_memories.push(cubecl_cpp::shared::SharedMemory::new_array(0, bytes, dynamic_shared, 16));
    }
    Ok(CompiledKernel {
        entrypoint_name: entry.into(),
        debug_name: Some("llava_jp custom CUDA kernel"),
        source,
        repr: Some(repr),
        cube_dim: CubeDim::new_1d(threads),
        debug_info: None,
    })
}

/// Training: the attention as an autodiff operation whose backward is the two flash backward
/// kernels. The state keeps the operands, the output and the log-sum-exp (no scores).
mod autodiff {
    use super::{register_backward, register_forward, Grads, KernelDropout, Layout, Primitive};
    use crate::cuda_kernel::AutodiffCudaOp;
    use crate::model::nn::split_heads;
    use burn::prelude::Tensor;
    use burn::tensor::{DType, TensorPrimitive};
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::Autodiff;
    use burn::prelude::Backend;
    use burn::tensor::ops::FloatTensor;

    #[derive(Debug)]
    struct FlashAttentionBackward;

    #[derive(Debug, Clone)]
    pub(super) struct State {
        q: Primitive,
        k: Primitive,
        v: Primitive,
        mask: Option<Primitive>,
        dropout: KernelDropout,
        out: Primitive,
        lse: Primitive,
        scale: f64,
    }

    impl<B: Backend<FloatTensorPrimitive = Primitive>> Backward<B, 3> for FlashAttentionBackward {
        type State = State;

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let grad = grads.consume::<B>(&ops.node);
            let s = ops.state;
            let Grads::HeadMajor(dq, dk, dv) = register_backward(s.q, s.k, s.v, s.mask, s.dropout, s.out, s.lse, grad, s.scale, Layout::HeadMajor) else {
                unreachable!("asked for head-major gradients")
            };
            for (parent, grad) in ops.parents.into_iter().zip([dq, dk, dv]) {
                if let Some(node) = parent {
                    grads.register::<B>(node.id, grad);
                }
            }
        }
    }

    /// Flash attention on `Autodiff<B, C>`.
    pub(super) fn attention<B, C>(
        q: FloatTensor<Autodiff<B, C>>,
        k: FloatTensor<Autodiff<B, C>>,
        v: FloatTensor<Autodiff<B, C>>,
        mask: Option<Primitive>,
        dropout: KernelDropout,
        scale: f64,
    ) -> FloatTensor<Autodiff<B, C>>
    where
        B: Backend<FloatTensorPrimitive = Primitive>,
        C: CheckpointStrategy,
    {
        match FlashAttentionBackward.prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, lse) = register_forward(q.primitive.clone(), k.primitive.clone(), v.primitive.clone(), mask.clone(), dropout.clone(), scale, Layout::HeadMajor);
                let state = State { q: q.primitive, k: k.primitive, v: v.primitive, mask, dropout, out: out.clone(), lse, scale };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(register_forward(q.primitive, k.primitive, v.primitive, mask, dropout, scale, Layout::HeadMajor).0),
        }
    }

    /// [`super::try_attention_from_qkv`]'s operation: one input, `qkv`.
    #[derive(Debug)]
    pub(super) struct QkvAttention {
        pub heads: usize,
        pub scale: f64,
        pub dropout: KernelDropout,
        pub mask: Option<Primitive>,
        /// The kernels' dtype.
        pub compute: DType,
    }

    #[derive(Debug, Clone)]
    pub(super) struct QkvState {
        attention: State,
        /// `qkv`'s dtype, which its gradient takes.
        dtype: DType,
        heads: usize,
    }

    #[derive(Debug)]
    struct QkvAttentionBackward;

    type Fused = burn::backend::Cuda<f32>;

    fn tensor<const D: usize>(p: Primitive) -> Tensor<Fused, D> {
        Tensor::from_primitive(TensorPrimitive::Float(p))
    }

    fn primitive<const D: usize>(t: Tensor<Fused, D>) -> Primitive {
        t.into_primitive().tensor()
    }

    impl<B: Backend<FloatTensorPrimitive = Primitive>> Backward<B, 1> for QkvAttentionBackward {
        type State = QkvState;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let dy = grads.consume::<B>(&ops.node);
            let QkvState { attention: s, dtype, heads } = ops.state;
            if let [Some(node)] = ops.parents {
                let dout = primitive(split_heads(tensor::<3>(dy).cast(s.out.dtype), heads));
                let Grads::TokenMajor(dqkv) = register_backward(s.q, s.k, s.v, s.mask, s.dropout, s.out, s.lse, dout, s.scale, Layout::TokenMajor) else {
                    unreachable!("asked for token-major gradients")
                };
                grads.register::<B>(node.id, primitive(tensor::<3>(dqkv).cast(dtype)));
            }
        }
    }

    impl AutodiffCudaOp<1> for QkvAttention {
        fn run<I, C>(self, [qkv]: [FloatTensor<Autodiff<I, C>>; 1]) -> FloatTensor<Autodiff<I, C>>
        where
            I: Backend<FloatTensorPrimitive = Primitive>,
            C: CheckpointStrategy,
        {
            let dtype = qkv.primitive.dtype;
            let qkv_c = tensor::<3>(qkv.primitive.clone()).cast(self.compute);
            let [b, t, width3] = qkv_c.dims();
            let width = width3 / 3;
            let part = |i: usize| primitive(split_heads(qkv_c.clone().slice([0..b, 0..t, i * width..(i + 1) * width]), self.heads));
            let (q, k, v) = (part(0), part(1), part(2));
            // Token-major: the output `[b, t, heads, d]` is `[b, t, width]` as it lies.
            let forward = || register_forward(q.clone(), k.clone(), v.clone(), self.mask.clone(), self.dropout.clone(), self.scale, Layout::TokenMajor);
            let merged = |out: Primitive| primitive(tensor::<4>(out).reshape([b, t, width]).cast(dtype));
            match QkvAttentionBackward.prepare::<C>([qkv.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let (out, lse) = forward();
                    let y = merged(out.clone());
                    // The backward reads the output head-major (a view).
                    let out = primitive(tensor::<4>(out).swap_dims(1, 2));
                    let attention = State { q, k, v, mask: self.mask, dropout: self.dropout, out, lse, scale: self.scale };
                    prep.finish(QkvState { attention, dtype, heads: self.heads }, y)
                }
                OpsKind::UnTracked(prep) => prep.finish(merged(forward().0)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel's task compiles without a GPU: cubecl's representation is an empty kernel
    /// holding the kernel's dynamic shared memory (the fused backward's, 51968 bytes at head
    /// width 64 by `FUSED_SHARED_BYTES` in the source; none for the others), and the source
    /// carries the variant's defines and the entry point.
    #[test]
    fn tasks_compile_to_our_source() {
        let all = [Kernel::Forward, Kernel::BackwardDq, Kernel::BackwardDkDv, Kernel::Backward, Kernel::DqZero, Kernel::DqStore, Kernel::Delta, Kernel::TileMap];
        for kernel in all {
            let task = FlashTask { kernel, head_dim: 64, bf16: true, mask_bytes: 1, dropout: true };
            let compiled = task
                .compile(&mut CudaCompiler::default(), &Default::default(), ExecutionMode::Checked, task.address_type())
                .expect("compiles");
            assert_eq!(compiled.entrypoint_name, kernel.entry());
            let dynamic = if kernel == Kernel::Backward { 51968 } else { 0 };
            assert_eq!(compiled.repr.expect("a representation").shared_memory_size(), dynamic, "{kernel:?}");
            assert!(compiled.source.starts_with("#define HEAD_DIM 64\n#define IS_BF16 1\n#define MASK_BYTES 1\n#define DROPOUT 1\n"));
            // (The forward asks for a minimum of blocks per SM too: `__launch_bounds__(128, FORWARD_MIN_BLOCKS)`.)
            assert!(compiled.source.contains(&format!("__launch_bounds__({THREADS}")));
            assert!(compiled.source.contains(&format!("#define BLOCK_THREADS {THREADS}\n")));
            assert!(compiled.source.contains(&format!(") {}(", kernel.entry())));
            assert_ne!(task.id(), FlashTask { head_dim: 128, ..task }.id());
            assert_ne!(task.id(), FlashTask { dropout: false, ..task }.id());
        }
    }

    /// Every knob the variable may set is one the source defaults (`#ifndef`), so that none is
    /// refused or ignored (`TILE_MAP` was once missing from the list); layout defines are refused.
    #[test]
    fn tuning_knobs_are_the_sources() {
        for knob in TUNING_KNOBS {
            assert!(SOURCE.contains(&format!("#ifndef {knob}\n")), "{knob} has no default in flash_attention.cu");
        }
        assert_eq!(parse_tuning_defines(" TILE_MAP=0  DQ_KEYS=64").as_deref(), Ok("#define TILE_MAP 0\n#define DQ_KEYS 64\n"));
        assert_eq!(parse_tuning_defines("").as_deref(), Ok(""));
        for bad in ["HEAD_DIM=64", "TILE_MAP", "TILE_MAP=off", "DQ_KEYS=-1"] {
            let e = parse_tuning_defines(bad).expect_err(bad);
            assert!(e.contains(&format!("{bad:?}")) && e.contains("TILE_MAP"), "{e}");
        }
    }
}

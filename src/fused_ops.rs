//! Model operations as kernels of our own on burn's fused CUDA backend (`src/fused_ops.cu`),
//! forward and, under autodiff, backward: LayerNorm, exact GELU, CLIP's quick GELU, and the
//! residual add, with dropout or without, that ends each block's halves. burn records LayerNorm
//! as ~10 operations forward and ~20 backward, GELU as 5 and ~12, dropout and its residual add
//! as 4 and ~3; recording operations is what bounds a training step
//! (`model-import/results/fused-optim-2026-12-03/`: the host spent 0.14 s recording the forward
//! and 0.22 s the backward of a 0.39 s full-size stage-2 step). Here each is one operation each
//! way. The quick GELU and the plain residual add are one fused kernel of burn's too, but one
//! that ran at a sixth of the memory's speed (~70 µs for the tower's ~10 µs of bytes). The model
//! ([`crate::model::nn`]'s `LayerNorm`, `Activation`, `Dropout::add_to`, `add_residual`) calls
//! here first and keeps burn's operations for every other backend and dtype, and when
//! `LLAVA_JP_FUSED_OPS=0` (which also turns off [`crate::cublaslt::try_autocast_affine`], the
//! linear layers' fused operation).
//!
//! Launched like [`crate::flash`]'s kernels: custom operations of burn's fusion stream,
//! compiled by NVRTC through cubecl, queued on cubecl's stream.

use burn::backend::ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};
use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::cubecl::prelude::CubeCount;
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::FusionRuntime;

use crate::cublaslt::downcast;
use crate::cuda_kernel::{autodiff_cuda, cast, contiguous, float_code, from_primitive, fused_cuda, on_autodiff_cuda, to_primitive, Cube, Fused, KernelSource, Primitive, SourceKernel, Switch};
use crate::flash::{empty, tensor_cores};
use crate::model::nn::SeededDropout;

type Inner = CubeBackend<CudaRuntime, f32, i32, u8>;
type Runtime = FusionCubeRuntime<CudaRuntime>;

/// Specialised on two element types (`CODE`, [`code`]).
static SOURCE: KernelSource = KernelSource::new("CODE", include_str!("fused_ops.cu"));
/// Threads per block (the launch bounds in the source); a warp per row, so eight rows a block.
/// The chunk totals (`column_sum_total`, `layer_norm_backward_params_sum`) count on its eight
/// warps too.
const THREADS: u32 = 256;
const ROWS_PER_BLOCK: usize = 8;
/// Rows up to this wide take the block-per-row LayerNorm kernels (`WIDE_PER` elements a
/// thread in the source).
const WIDE_ROWS: usize = THREADS as usize * 8;
/// Rows a block of the weight / bias gradients' partial sums covers (more when there would
/// be more than [`MAX_CHUNKS`] blocks).
const ROWS_PER_CHUNK: usize = 64;
const MAX_CHUNKS: usize = 512;
/// The element-wise kernels' grid (they stride over what it does not cover), and the elements
/// a thread takes at once (`UNROLL` in the source).
const MAX_ELEMENTWISE_BLOCKS: usize = 1 << 16;
const ELEMENTS_PER_THREAD: usize = 8;

static SWITCH: Switch = Switch::new("LLAVA_JP_FUSED_OPS");

/// Whether the kernels take the operations they cover: yes unless `LLAVA_JP_FUSED_OPS=0` or
/// [`set_enabled`] said otherwise.
pub fn enabled() -> bool {
    SWITCH.on()
}

/// Turns the kernels on or off for the whole process (tests and benchmarks compare the two).
pub fn set_enabled(on: bool) {
    SWITCH.set(on);
}

type Rejected<B, const D: usize> = (Tensor<B, D>, Tensor<B, 1>, Tensor<B, 1>);

/// PyTorch's `layer_norm` over the last dimension (biased variance, `eps` inside the root) by
/// the kernels, written in `out` (rounded once: what autocast's cast of an f32 output before a
/// product gives), where `B` and the operands are ones they cover (burn's CUDA backend, under
/// autodiff or not; f32, or bf16 / f16 on compute capability 8.0 and up; weight and bias of
/// the input's dtype and width); the operands come back untouched otherwise.
pub fn try_layer_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    bias: Tensor<B, 1>,
    eps: f64,
    out: DType,
) -> Result<Tensor<B, D>, Rejected<B, D>> {
    let fused = fused_cuda::<B>();
    if !fused && !autodiff_cuda::<B>() {
        return Err((x, weight, bias));
    }
    let dtype = x.dtype();
    let d = x.dims()[D - 1];
    let covered = enabled()
        && float_code(dtype).is_some()
        && float_code(out).is_some()
        && weight.dtype() == dtype
        && bias.dtype() == dtype
        && weight.dims() == [d]
        && bias.dims() == [d]
        && x.shape().num_elements() > 0
        && ((dtype == DType::F32 && out == DType::F32) || tensor_cores(&x.device()));
    if !covered {
        return Err((x, weight, bias));
    }
    if fused {
        return Ok(from_primitive(register_forward(to_primitive(x), to_primitive(weight), to_primitive(bias), eps, out).0));
    }
    let inputs = [x.into_primitive().tensor(), weight.into_primitive().tensor(), bias.into_primitive().tensor()];
    match on_autodiff_cuda::<B, 3, _>(autodiff::LayerNorm { eps, out }, inputs) {
        Ok(y) => Ok(Tensor::from_primitive(TensorPrimitive::Float(y))),
        Err(_) => unreachable!("autodiff_cuda::<B>() was checked above"),
    }
}

/// Whether the element-wise kernels cover `x` on `B` (as [`try_layer_norm`]'s do).
fn covers_elementwise<B: Backend, const D: usize>(x: &Tensor<B, D>) -> bool {
    (fused_cuda::<B>() || autodiff_cuda::<B>())
        && enabled()
        && float_code(x.dtype()).is_some()
        && x.shape().num_elements() > 0
        && (x.dtype() == DType::F32 || tensor_cores(&x.device()))
}

/// The activations with kernels of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gelu {
    /// Exact GELU, `x · Φ(x)` ([`crate::model::nn::gelu_erf`]): llm-jp's and the projector's.
    Erf,
    /// CLIP's `x · sigmoid(1.702 x)`, rounded after each of its three operations as PyTorch's
    /// are in a 16-bit type.
    Quick,
}

impl Gelu {
    /// The kernels forward and backward.
    fn kernels(self) -> (Kernel, Kernel) {
        match self {
            Gelu::Erf => (Kernel::GeluForward, Kernel::GeluBackward),
            Gelu::Quick => (Kernel::QuickGeluForward, Kernel::QuickGeluBackward),
        }
    }
}

/// `gelu` of `x` by a kernel each way, where the kernels cover `x` (burn's CUDA backend, under
/// autodiff or not; f32, or bf16 / f16 on compute capability 8.0 and up); `x` comes back
/// untouched otherwise.
pub fn try_gelu<B: Backend, const D: usize>(x: Tensor<B, D>, gelu: Gelu) -> Result<Tensor<B, D>, Tensor<B, D>> {
    if !covers_elementwise(&x) {
        return Err(x);
    }
    if fused_cuda::<B>() {
        return Ok(from_primitive(gelu_forward(to_primitive(x), gelu)));
    }
    match on_autodiff_cuda::<B, 1, _>(autodiff::Activation { gelu }, [x.into_primitive().tensor()]) {
        Ok(y) => Ok(Tensor::from_primitive(TensorPrimitive::Float(y))),
        Err(_) => unreachable!("covers_elementwise checked the backend"),
    }
}

/// `x + h` in `x`'s dtype (`h` may be in another: under autocast a linear layer's output is in
/// the compute dtype, the residual stream in f32) by one kernel, where the kernels cover both
/// (as [`try_gelu`]'s do) and they have one shape; the backward hands each its gradient in its
/// dtype. The operands come back untouched otherwise.
pub fn try_residual_add<B: Backend, const D: usize>(x: Tensor<B, D>, h: Tensor<B, D>) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    if !covers_elementwise(&x) || !covers_elementwise(&h) || h.dims() != x.dims() {
        return Err((x, h));
    }
    if fused_cuda::<B>() {
        return Ok(from_primitive(residual_add(to_primitive(x), to_primitive(h))));
    }
    match on_autodiff_cuda::<B, 2, _>(autodiff::ResidualAdd, [x.into_primitive().tensor(), h.into_primitive().tensor()]) {
        Ok(y) => Ok(Tensor::from_primitive(TensorPrimitive::Float(y))),
        Err(_) => unreachable!("covers_elementwise checked the backend"),
    }
}

/// `x + dropout(h)` while training, in one kernel each way: `h`'s elements dropped with
/// probability `dropout.prob` (the rest scaled by `1 / (1 - prob)`), which ones decided by a
/// hash of the seed and the element's index ([`SeededDropout::keeps_element`]), so that the
/// backward needs no stored mask. `seed` `None` draws it on the device from the backend's
/// generator (seeded runs repeat). Only on the autodiff CUDA backends (dropout is off without
/// gradients), for `x` and `h` of one shape and `0 < prob < 1`; the output and `x`'s gradient
/// in `x`'s dtype, `h`'s gradient in `h`'s (under autocast a linear layer's output is in the
/// compute dtype, the residual stream in f32). The operands come back untouched otherwise.
pub fn try_residual_dropout<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    h: Tensor<B, D>,
    prob: f64,
    seed: Option<[u32; 2]>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    if !autodiff_cuda::<B>() || !covers_elementwise(&x) || !covers_elementwise(&h) || h.dims() != x.dims() || !(prob > 0.0 && prob < 1.0) {
        return Err((x, h));
    }
    let device = x.device();
    let seed = match seed {
        Some(words) => Tensor::<B, 1, Int>::from_data(TensorData::new(words.map(|w| w as i32).to_vec(), [2]), &device),
        None => Tensor::<B, 1, Int>::random([2], burn::tensor::Distribution::Uniform(0.0, 2_147_483_647.0), &device),
    };
    let seed = downcast::<_, Primitive>(seed.into_primitive()).ok().unwrap();
    match on_autodiff_cuda::<B, 2, _>(autodiff::ResidualDropout { prob, seed }, [x.into_primitive().tensor(), h.into_primitive().tensor()]) {
        Ok(y) => Ok(Tensor::from_primitive(TensorPrimitive::Float(y))),
        Err(_) => unreachable!("autodiff_cuda::<B>() was checked above"),
    }
}

/// PyTorch's `nn.Embedding` lookup (`weight` `[rows, d]` picked by `ids` `[batch, seq]`: burn's
/// `embedding`) with a backward of its own on the autodiff CUDA backends, where `weight` is
/// f32, bf16 or f16 and the ids i32 or i64 (read as i32): the rows' gradients added by one kernel each way instead
/// of burn's `select_add` (see `embedding_backward` in the source). The operands come back
/// untouched otherwise.
pub fn try_embedding<B: Backend>(weight: Tensor<B, 2>, ids: Tensor<B, 2, Int>) -> Result<Tensor<B, 3>, (Tensor<B, 2>, Tensor<B, 2, Int>)> {
    let int_ids = matches!(ids.dtype(), DType::I32 | DType::I64);
    if !autodiff_cuda::<B>() || !enabled() || float_code(weight.dtype()).is_none() || !int_ids || weight.dims()[0] > i32::MAX as usize || weight.dims()[1] == 0 {
        return Err((weight, ids));
    }
    let ids = match ids.dtype() {
        DType::I32 => ids,
        _ => ids.cast(burn::tensor::IntDType::I32),
    };
    // Autodiff keeps its inner backend's integer tensors: the fused backend's, one primitive
    // type for floats and ints.
    let ids = downcast::<_, Primitive>(ids.into_primitive()).ok().expect("an autodiff CUDA backend's int tensor");
    match on_autodiff_cuda::<B, 1, _>(autodiff::Embedding { ids }, [weight.into_primitive().tensor()]) {
        Ok(y) => Ok(Tensor::from_primitive(TensorPrimitive::Float(y))),
        Err(_) => unreachable!("autodiff_cuda::<B>() was checked above"),
    }
}

/// Queues the embedding's backward: `[table_rows, d]` f32, row `i` the sum of `dy`'s rows
/// (`dy` `[..., d]`) whose id is `i`.
fn embedding_backward(dy: Primitive, ids: Primitive, table_rows: usize) -> Primitive {
    let client = dy.client.clone();
    let d = dy.shape[dy.shape.num_dims() - 1];
    let streams = OperationStreams::with_inputs([&dy, &ids]);
    let output = TensorIr::uninit(client.create_empty_handle(), Shape::new([table_rows, d]), DType::F32);
    let desc = CustomOpIr::new("embedding_backward", &[dy.into_ir(), ids.into_ir()], &[output]);
    client.register(streams, OperationIr::Custom(desc.clone()), EmbeddingBackward { desc }).output()
}

#[derive(Debug)]
struct EmbeddingBackward {
    desc: CustomOpIr,
}

impl Operation<Runtime> for EmbeddingBackward {
    fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
        let dy = contiguous(handles.get_float_tensor::<Inner>(&self.desc.inputs[0]));
        let ids = contiguous(handles.get_int_tensor::<Inner>(&self.desc.inputs[1]));
        let (rows, d) = rows_and_width(&dy);
        assert_eq!(ids.meta.num_elements(), rows, "embedding backward: {} ids for {rows} gradient rows", ids.meta.num_elements());
        let table_rows = self.desc.outputs[0].shape[0];
        let out = empty(&dy, [table_rows, d], DType::F32);
        let params = words(rows, d, 0.0, 0, table_rows);
        let code = code(dy.dtype, dy.dtype);
        let zero_blocks = (table_rows * d).div_ceil(THREADS as usize).clamp(1, MAX_ELEMENTWISE_BLOCKS) as u32;
        launch(Kernel::EmbeddingBackwardZero, code, vec![&out], params.clone(), CubeCount::Static(zero_blocks, 1, 1));
        if rows > 0 {
            let row_blocks = rows.min(MAX_ELEMENTWISE_BLOCKS) as u32;
            launch(Kernel::EmbeddingBackward, code, vec![&dy, &ids, &out], params, CubeCount::Static(row_blocks, 1, 1));
        }
        handles.register_float_tensor::<Inner>(&self.desc.outputs[0].id, out);
    }
}

fn gelu_forward(x: Primitive, gelu: Gelu) -> Primitive {
    let dtype = x.dtype;
    elementwise(gelu.kernels().0, vec![x], dtype, dtype, None, 0.0)
}

fn residual_add(x: Primitive, h: Primitive) -> Primitive {
    let (out, other) = (x.dtype, h.dtype);
    elementwise(Kernel::ResidualAdd, vec![x, h], other, out, None, 0.0)
}

/// Queues an element-wise kernel over `floats` (one shape; the first in the kernel's element
/// type, a residual add's branch in `other`), with the dropout seed after them when given. The
/// output has the first operand's shape and dtype `out`.
fn elementwise(kernel: Kernel, floats: Vec<Primitive>, other: DType, out: DType, seed: Option<Primitive>, prob: f64) -> Primitive {
    let code = code(floats[0].dtype, other);
    let client = floats[0].client.clone();
    let shape = floats[0].shape.clone();
    let mut inputs: Vec<&Primitive> = floats.iter().collect();
    inputs.extend(seed.as_ref());
    let streams = OperationStreams::with_inputs(inputs);
    let output = TensorIr::uninit(client.create_empty_handle(), shape, out);
    let irs: Vec<TensorIr> = floats.iter().chain(seed.as_ref()).map(|t| t.clone().into_ir()).collect();
    let desc = CustomOpIr::new(kernel.entry(), &irs, &[output]);
    // 1 / (1 - prob) as f32 bits, and the hash threshold below which an element is dropped.
    let scale = (1.0 / (1.0 - prob)) as f32;
    let words = vec![0, 0, scale.to_bits() as u64, SeededDropout::drop_below(prob) as u64, 0];
    let op = Elementwise { desc: desc.clone(), kernel, code, seeded: seed.is_some(), words };
    client.register(streams, OperationIr::Custom(desc), op).output()
}

#[derive(Debug)]
struct Elementwise {
    desc: CustomOpIr,
    kernel: Kernel,
    /// The element types ([`code`]).
    code: u8,
    /// Whether the last input is the dropout seed (an int tensor).
    seeded: bool,
    /// `Params`, the element count filled in at launch.
    words: Vec<u64>,
}

impl Operation<Runtime> for Elementwise {
    fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
        let inputs = &self.desc.inputs;
        let floats = inputs.len() - self.seeded as usize;
        let mut tensors: Vec<Cube> = inputs[..floats].iter().map(|ir| contiguous(handles.get_float_tensor::<Inner>(ir))).collect();
        if self.seeded {
            tensors.push(contiguous(handles.get_int_tensor::<Inner>(&inputs[floats])));
        }
        let first = &tensors[0];
        let n = first.meta.num_elements();
        let out = empty(first, [n], self.desc.outputs[0].dtype);
        let mut words = self.words.clone();
        words[0] = n as u64;
        let mut buffers: Vec<&Cube> = tensors.iter().collect();
        buffers.push(&out);
        let blocks = n.div_ceil(THREADS as usize * ELEMENTS_PER_THREAD).min(MAX_ELEMENTWISE_BLOCKS) as u32;
        launch(self.kernel, self.code, buffers, words, CubeCount::Static(blocks, 1, 1));
        let out = CubeTensor::new_contiguous(out.client.clone(), out.device, first.meta.shape().clone(), out.handle, out.dtype);
        handles.register_float_tensor::<Inner>(&self.desc.outputs[0].id, out);
    }
}

/// The column sums of `t` (`[rows, d]`, f32 / bf16 / f16 on the fused CUDA backend) as `[d]` in
/// `out` (summed in f32 whatever the dtypes), by two kernels in a fixed order: a linear layer's
/// bias gradient. burn's reduction over rows ran at about half the memory's speed at the LLM's
/// widths.
pub(crate) fn column_sum(t: Primitive, out: DType) -> Primitive {
    let client = t.client.clone();
    let d = t.shape[1];
    let streams = OperationStreams::with_inputs([&t]);
    let output = TensorIr::uninit(client.create_empty_handle(), Shape::new([d]), out);
    let desc = CustomOpIr::new("column_sum", &[t.into_ir()], &[output]);
    client.register(streams, OperationIr::Custom(desc.clone()), ColumnSum { desc }).output()
}

#[derive(Debug)]
struct ColumnSum {
    desc: CustomOpIr,
}

impl Operation<Runtime> for ColumnSum {
    fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
        let t = contiguous(handles.get_float_tensor::<Inner>(&self.desc.inputs[0]));
        let (rows, d) = rows_and_width(&t);
        let out_dtype = self.desc.outputs[0].dtype;
        let code = code(t.dtype, out_dtype);
        let rows_per_chunk = ROWS_PER_CHUNK.max(rows.div_ceil(MAX_CHUNKS));
        let chunks = rows.div_ceil(rows_per_chunk).max(1);
        let partial = empty(&t, [chunks, d], DType::F32);
        let params = words(rows, d, 0.0, rows_per_chunk, chunks);
        // Two columns a thread for the partial sums; 32 columns a block for their total.
        let pairs = d.div_ceil(2 * THREADS as usize) as u32;
        launch(Kernel::ColumnSumPartial, code, vec![&t, &partial], params.clone(), CubeCount::Static(pairs, chunks as u32, 1));
        let out = empty(&t, [d], out_dtype);
        launch(Kernel::ColumnSumTotal, code, vec![&partial, &out], params, CubeCount::Static(d.div_ceil(32) as u32, 1, 1));
        handles.register_float_tensor::<Inner>(&self.desc.outputs[0].id, out);
    }
}

/// Queues the forward: the output (in `out`) and each row's mean and 1 / sqrt(var + eps) (f32,
/// for the backward).
fn register_forward(x: Primitive, weight: Primitive, bias: Primitive, eps: f64, out: DType) -> (Primitive, Primitive, Primitive) {
    let client = x.client.clone();
    let shape = x.shape.clone();
    let rows = shape.num_elements() / shape[shape.num_dims() - 1];
    let streams = OperationStreams::with_inputs([&x, &weight, &bias]);
    let outputs = [
        TensorIr::uninit(client.create_empty_handle(), shape, out),
        TensorIr::uninit(client.create_empty_handle(), Shape::new([rows]), DType::F32),
        TensorIr::uninit(client.create_empty_handle(), Shape::new([rows]), DType::F32),
    ];
    let desc = CustomOpIr::new("layer_norm_forward", &[x.into_ir(), weight.into_ir(), bias.into_ir()], &outputs);
    let op = LayerNormForward { desc: desc.clone(), eps };
    let mut out = client.register(streams, OperationIr::Custom(desc), op).into_iter();
    let mut next = || out.next().expect("three outputs");
    (next(), next(), next())
}

/// Queues the backward: the input's gradient, and the weight's and bias's when `params` (`dy`
/// in any of the kernels' dtypes: the output's, or f32).
fn register_backward(
    x: Primitive,
    weight: Primitive,
    mean: Primitive,
    rstd: Primitive,
    dy: Primitive,
    params: bool,
    addend: Option<Primitive>,
) -> (Primitive, Option<(Primitive, Primitive)>) {
    let client = x.client.clone();
    let (shape, d) = (x.shape.clone(), weight.shape[0]);
    let mut inputs = vec![&x, &weight, &mean, &rstd, &dy];
    inputs.extend(addend.as_ref());
    let streams = OperationStreams::with_inputs(inputs);
    let mut outputs = vec![TensorIr::uninit(client.create_empty_handle(), shape, x.dtype)];
    if params {
        outputs.push(TensorIr::uninit(client.create_empty_handle(), Shape::new([d]), weight.dtype));
        outputs.push(TensorIr::uninit(client.create_empty_handle(), Shape::new([d]), weight.dtype));
    }
    let mut irs = vec![x.into_ir(), weight.into_ir(), mean.into_ir(), rstd.into_ir(), dy.into_ir()];
    irs.extend(addend.map(|a| a.into_ir()));
    let desc = CustomOpIr::new("layer_norm_backward", &irs, &outputs);
    let op = LayerNormBackward { desc: desc.clone() };
    let mut out = client.register(streams, OperationIr::Custom(desc), op).into_iter();
    let dx = out.next().expect("the input's gradient");
    let params = params.then(|| (out.next().expect("the weight's gradient"), out.next().expect("the bias's gradient")));
    (dx, params)
}

/// The kernels' parameter words (`Params` in the source).
fn words(rows: usize, d: usize, eps: f64, rows_per_chunk: usize, chunks: usize) -> Vec<u64> {
    vec![rows as u64, d as u64, (eps as f32).to_bits() as u64, rows_per_chunk as u64, chunks as u64]
}

fn launch(kernel: Kernel, code: u8, buffers: Vec<&Cube>, words: Vec<u64>, count: CubeCount) {
    SourceKernel { source: &SOURCE, entry: kernel.entry(), code, threads: THREADS }.launch(buffers, words, count);
}

/// The source's `CODE` for element type `elem` and the other operand's type `other` (both
/// among [`float_code`]'s, which every caller checked).
fn code(elem: DType, other: DType) -> u8 {
    let of = |dtype| float_code(dtype).unwrap_or_else(|| panic!("the kernels take f32, bf16 or f16, not {dtype:?}"));
    of(elem) + 3 * of(other)
}

/// `[rows, d]` of a tensor whose last dimension is `d`.
fn rows_and_width(t: &Cube) -> (usize, usize) {
    let shape = t.meta.shape();
    let d = shape[shape.num_dims() - 1];
    (t.meta.num_elements() / d, d)
}

fn row_blocks(rows: usize) -> CubeCount {
    CubeCount::Static(rows.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1)
}

/// A block per row.
fn wide_blocks(rows: usize) -> CubeCount {
    CubeCount::Static(rows as u32, 1, 1)
}

#[derive(Debug)]
struct LayerNormForward {
    desc: CustomOpIr,
    eps: f64,
}

impl Operation<Runtime> for LayerNormForward {
    fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
        let inputs = &self.desc.inputs;
        let mut get = |i: usize| contiguous(handles.get_float_tensor::<Inner>(&inputs[i]));
        let (x, weight, bias) = (get(0), get(1), get(2));
        let (rows, d) = rows_and_width(&x);
        let out = self.desc.outputs[0].dtype;
        let y = empty(&x, [rows, d], out);
        let mean = empty(&x, [rows], DType::F32);
        let rstd = empty(&x, [rows], DType::F32);
        let code = code(x.dtype, out);
        let (kernel, blocks) = if d <= WIDE_ROWS { (Kernel::ForwardWide, wide_blocks(rows)) } else { (Kernel::Forward, row_blocks(rows)) };
        launch(kernel, code, vec![&x, &weight, &bias, &y, &mean, &rstd], words(rows, d, self.eps, 0, 0), blocks);
        let y = CubeTensor::new_contiguous(y.client.clone(), y.device, x.meta.shape().clone(), y.handle, y.dtype);
        for (output, tensor) in self.desc.outputs.iter().zip([y, mean, rstd]) {
            handles.register_float_tensor::<Inner>(&output.id, tensor);
        }
    }
}

#[derive(Debug)]
struct LayerNormBackward {
    desc: CustomOpIr,
}

impl Operation<Runtime> for LayerNormBackward {
    fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
        let inputs = &self.desc.inputs;
        let mut get = |i: usize| contiguous(handles.get_float_tensor::<Inner>(&inputs[i]));
        let (x, weight, mean, rstd, dy) = (get(0), get(1), get(2), get(3), get(4));
        let addend = (inputs.len() == 6).then(|| get(5));
        let (rows, d) = rows_and_width(&x);
        let code = code(x.dtype, dy.dtype);
        let dx = empty(&x, [rows, d], x.dtype);
        if let Some(a) = &addend {
            assert!(a.dtype == x.dtype && a.meta.num_elements() == rows * d, "LayerNorm backward: the gradient to add is {:?} {:?}, the input {:?} {:?}", a.dtype, a.meta.shape(), x.dtype, x.meta.shape());
        }
        let (kernel, blocks) = if d <= WIDE_ROWS { (Kernel::BackwardInputWide, wide_blocks(rows)) } else { (Kernel::BackwardInput, row_blocks(rows)) };
        let buffers = vec![&x, &weight, &dy, &mean, &rstd, &dx, addend.as_ref().unwrap_or(&dx)];
        launch(kernel, code, buffers, words(rows, d, 0.0, 0, addend.is_some() as usize), blocks);
        let dx = CubeTensor::new_contiguous(dx.client.clone(), dx.device, x.meta.shape().clone(), dx.handle, dx.dtype);
        let mut grads = vec![dx];
        if self.desc.outputs.len() == 3 {
            let rows_per_chunk = ROWS_PER_CHUNK.max(rows.div_ceil(MAX_CHUNKS));
            let chunks = rows.div_ceil(rows_per_chunk);
            let partial_weight = empty(&x, [chunks, d], DType::F32);
            let partial_bias = empty(&x, [chunks, d], DType::F32);
            let params = words(rows, d, 0.0, rows_per_chunk, chunks);
            let columns = d.div_ceil(THREADS as usize) as u32;
            launch(
                Kernel::BackwardParamsPartial,
                code,
                vec![&x, &dy, &mean, &rstd, &partial_weight, &partial_bias],
                params.clone(),
                CubeCount::Static(columns, chunks as u32, 1),
            );
            let dweight = empty(&x, [d], weight.dtype);
            let dbias = empty(&x, [d], weight.dtype);
            let sum_blocks = d.div_ceil(32) as u32;
            launch(Kernel::BackwardParamsSum, code, vec![&partial_weight, &partial_bias, &dweight, &dbias], params, CubeCount::Static(sum_blocks, 1, 1));
            grads.extend([dweight, dbias]);
        }
        for (output, tensor) in self.desc.outputs.iter().zip(grads) {
            handles.register_float_tensor::<Inner>(&output.id, tensor);
        }
    }
}

/// Which kernel of `SOURCE` a launch runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kernel {
    Forward,
    BackwardInput,
    ForwardWide,
    BackwardInputWide,
    BackwardParamsPartial,
    BackwardParamsSum,
    GeluForward,
    GeluBackward,
    QuickGeluForward,
    QuickGeluBackward,
    ResidualAdd,
    ResidualDropoutForward,
    ResidualDropoutBackward,
    ColumnSumPartial,
    ColumnSumTotal,
    EmbeddingBackwardZero,
    EmbeddingBackward,
}

impl Kernel {
    fn entry(self) -> &'static str {
        match self {
            Kernel::Forward => "layer_norm_forward",
            Kernel::BackwardInput => "layer_norm_backward_input",
            Kernel::ForwardWide => "layer_norm_forward_wide",
            Kernel::BackwardInputWide => "layer_norm_backward_input_wide",
            Kernel::BackwardParamsPartial => "layer_norm_backward_params_partial",
            Kernel::BackwardParamsSum => "layer_norm_backward_params_sum",
            Kernel::GeluForward => "gelu_forward",
            Kernel::GeluBackward => "gelu_backward",
            Kernel::QuickGeluForward => "quick_gelu_forward",
            Kernel::QuickGeluBackward => "quick_gelu_backward",
            Kernel::ResidualAdd => "residual_add",
            Kernel::ResidualDropoutForward => "residual_dropout_forward",
            Kernel::ResidualDropoutBackward => "residual_dropout_backward",
            Kernel::ColumnSumPartial => "column_sum_partial",
            Kernel::ColumnSumTotal => "column_sum_total",
            Kernel::EmbeddingBackwardZero => "embedding_backward_zero",
            Kernel::EmbeddingBackward => "embedding_backward",
        }
    }

    #[cfg(test)]
    const ALL: [Kernel; 17] = [
        Kernel::Forward,
        Kernel::BackwardInput,
        Kernel::ForwardWide,
        Kernel::BackwardInputWide,
        Kernel::BackwardParamsPartial,
        Kernel::BackwardParamsSum,
        Kernel::GeluForward,
        Kernel::GeluBackward,
        Kernel::QuickGeluForward,
        Kernel::QuickGeluBackward,
        Kernel::ResidualAdd,
        Kernel::ResidualDropoutForward,
        Kernel::ResidualDropoutBackward,
        Kernel::ColumnSumPartial,
        Kernel::ColumnSumTotal,
        Kernel::EmbeddingBackwardZero,
        Kernel::EmbeddingBackward,
    ];
}

/// The operations under autodiff, each with the kernels as its backward. LayerNorm's state keeps
/// the input, the weight and the rows' statistics.
mod autodiff {
    use super::{cast, elementwise, embedding_backward, gelu_forward, register_backward, register_forward, residual_add, Fused, Gelu, Kernel, Primitive};
    use burn::tensor::DType;
    use crate::cuda_kernel::AutodiffCudaOp;
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::Autodiff;
    use burn::tensor::backend::AutodiffBackend;
    use burn::prelude::Backend;
    use burn::tensor::ops::FloatTensor;

    #[derive(Debug)]
    struct LayerNormBackward;

    #[derive(Debug, Clone)]
    pub(super) struct State {
        x: Primitive,
        weight: Primitive,
        mean: Primitive,
        rstd: Primitive,
    }

    impl<B: Backend<FloatTensorPrimitive = Primitive>> Backward<B, 3> for LayerNormBackward {
        type State = State;

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let dy = grads.consume::<B>(&ops.node);
            let s = ops.state;
            let [x, weight, bias] = ops.parents;
            // The input's gradient so far (a pre-LN block's residual branch, whose add comes
            // later in the graph and so first in the backward) goes into the kernel, which adds
            // it; burn's `register` would add it by a pass over [tokens, d] of its own.
            // (burn removes a gradient by a tensor of the node: a stand-in carrying it; one not
            // of the input's dtype and shape goes back, for `register` to add.)
            let addend = x.as_ref().and_then(|node| {
                let mut probe = <Autodiff<B> as AutodiffBackend>::from_inner(s.x.clone());
                probe.node = node.clone();
                let grad = <Autodiff<B> as AutodiffBackend>::grad_remove(&probe, grads)?;
                if grad.dtype == s.x.dtype && grad.shape == s.x.shape {
                    return Some(grad);
                }
                grads.register::<B>(node.id, grad);
                None
            });
            // A frozen LayerNorm (stage 1's LLM) needs only the input's gradient.
            let (dx, params) = register_backward(s.x, s.weight, s.mean, s.rstd, dy, weight.is_some() || bias.is_some(), addend);
            if let Some(node) = x {
                grads.register::<B>(node.id, dx);
            }
            if let Some((dweight, dbias)) = params {
                for (parent, grad) in [(weight, dweight), (bias, dbias)] {
                    if let Some(node) = parent {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }
    }

    /// LayerNorm over `[x, weight, bias]`, its output in `out`.
    #[derive(Debug)]
    pub(super) struct LayerNorm {
        pub eps: f64,
        pub out: DType,
    }

    impl AutodiffCudaOp<3> for LayerNorm {
        fn run<I, C>(self, [x, weight, bias]: [FloatTensor<Autodiff<I, C>>; 3]) -> FloatTensor<Autodiff<I, C>>
        where
            I: Backend<FloatTensorPrimitive = Primitive>,
            C: CheckpointStrategy,
        {
            match LayerNormBackward.prepare::<C>([x.node.clone(), weight.node.clone(), bias.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let (y, mean, rstd) = register_forward(x.primitive.clone(), weight.primitive.clone(), bias.primitive, self.eps, self.out);
                    prep.finish(State { x: x.primitive, weight: weight.primitive, mean, rstd }, y)
                }
                OpsKind::UnTracked(prep) => prep.finish(register_forward(x.primitive, weight.primitive, bias.primitive, self.eps, self.out).0),
            }
        }
    }

    /// One of the GELUs; the state keeps the input.
    #[derive(Debug)]
    pub(super) struct Activation {
        pub gelu: Gelu,
    }

    #[derive(Debug)]
    struct ActivationBackward(Gelu);

    impl<B: Backend<FloatTensorPrimitive = Primitive>> Backward<B, 1> for ActivationBackward {
        type State = Primitive;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let dy = grads.consume::<B>(&ops.node);
            if let [Some(node)] = ops.parents {
                let dtype = ops.state.dtype;
                let dx = elementwise(self.0.kernels().1, vec![ops.state, cast(dy, dtype)], dtype, dtype, None, 0.0);
                grads.register::<B>(node.id, dx);
            }
        }
    }

    impl AutodiffCudaOp<1> for Activation {
        fn run<I, C>(self, [x]: [FloatTensor<Autodiff<I, C>>; 1]) -> FloatTensor<Autodiff<I, C>>
        where
            I: Backend<FloatTensorPrimitive = Primitive>,
            C: CheckpointStrategy,
        {
            match ActivationBackward(self.gelu).prepare::<C>([x.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let y = gelu_forward(x.primitive.clone(), self.gelu);
                    prep.finish(x.primitive, y)
                }
                OpsKind::UnTracked(prep) => prep.finish(gelu_forward(x.primitive, self.gelu)),
            }
        }
    }

    /// The embedding lookup over `[weight]`, the ids beside it; the state keeps the ids, the
    /// table's rows and its dtype (the gradient's).
    #[derive(Debug)]
    pub(super) struct Embedding {
        pub ids: Primitive,
    }

    #[derive(Debug)]
    struct EmbeddingBackward;

    impl<B: Backend<FloatTensorPrimitive = Primitive>> Backward<B, 1> for EmbeddingBackward {
        type State = (Primitive, usize, DType);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let dy = grads.consume::<B>(&ops.node);
            if let [Some(node)] = ops.parents {
                let (ids, table_rows, dtype) = ops.state;
                grads.register::<B>(node.id, cast(embedding_backward(dy, ids, table_rows), dtype));
            }
        }
    }

    impl AutodiffCudaOp<1> for Embedding {
        fn run<I, C>(self, [weight]: [FloatTensor<Autodiff<I, C>>; 1]) -> FloatTensor<Autodiff<I, C>>
        where
            I: Backend<FloatTensorPrimitive = Primitive>,
            C: CheckpointStrategy,
        {
            use burn::tensor::ops::ModuleOps;
            let (table_rows, dtype) = (weight.primitive.shape[0], weight.primitive.dtype);
            match EmbeddingBackward.prepare::<C>([weight.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let y = Fused::embedding(weight.primitive, self.ids.clone());
                    prep.finish((self.ids, table_rows, dtype), y)
                }
                OpsKind::UnTracked(prep) => prep.finish(Fused::embedding(weight.primitive, self.ids)),
            }
        }
    }

    /// `x + h` over `[x, h]`; the state keeps the two dtypes, each gradient's.
    #[derive(Debug)]
    pub(super) struct ResidualAdd;

    #[derive(Debug)]
    struct ResidualAddBackward;

    impl<B: Backend<FloatTensorPrimitive = Primitive>> Backward<B, 2> for ResidualAddBackward {
        type State = (DType, DType);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let (x_dtype, h_dtype) = ops.state;
            let dy = grads.consume::<B>(&ops.node);
            let [x, h] = ops.parents;
            if let Some(node) = h {
                grads.register::<B>(node.id, cast(dy.clone(), h_dtype));
            }
            if let Some(node) = x {
                grads.register::<B>(node.id, cast(dy, x_dtype));
            }
        }
    }

    impl AutodiffCudaOp<2> for ResidualAdd {
        fn run<I, C>(self, [x, h]: [FloatTensor<Autodiff<I, C>>; 2]) -> FloatTensor<Autodiff<I, C>>
        where
            I: Backend<FloatTensorPrimitive = Primitive>,
            C: CheckpointStrategy,
        {
            let dtypes = (x.primitive.dtype, h.primitive.dtype);
            match ResidualAddBackward.prepare::<C>([x.node.clone(), h.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => prep.finish(dtypes, residual_add(x.primitive, h.primitive)),
                OpsKind::UnTracked(prep) => prep.finish(residual_add(x.primitive, h.primitive)),
            }
        }
    }

    /// `x + dropout(h)` over `[x, h]` (`h` may be in another dtype: a linear layer's output
    /// under autocast), the seed's two words on the device; the state keeps the seed (the
    /// backward draws the same mask from it) and the two dtypes.
    #[derive(Debug)]
    pub(super) struct ResidualDropout {
        pub prob: f64,
        pub seed: Primitive,
    }

    #[derive(Debug)]
    struct ResidualDropoutBackward;

    impl<B: Backend<FloatTensorPrimitive = Primitive>> Backward<B, 2> for ResidualDropoutBackward {
        type State = (Primitive, f64, DType, DType);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            let (seed, prob, x_dtype, h_dtype) = ops.state;
            let dy = cast(grads.consume::<B>(&ops.node), x_dtype);
            let [x, h] = ops.parents;
            if let Some(node) = h {
                let dh = elementwise(Kernel::ResidualDropoutBackward, vec![dy.clone()], h_dtype, h_dtype, Some(seed), prob);
                grads.register::<B>(node.id, dh);
            }
            if let Some(node) = x {
                grads.register::<B>(node.id, dy);
            }
        }
    }

    impl AutodiffCudaOp<2> for ResidualDropout {
        fn run<I, C>(self, [x, h]: [FloatTensor<Autodiff<I, C>>; 2]) -> FloatTensor<Autodiff<I, C>>
        where
            I: Backend<FloatTensorPrimitive = Primitive>,
            C: CheckpointStrategy,
        {
            let dtypes = (x.primitive.dtype, h.primitive.dtype);
            let forward = |x: Primitive, h: Primitive| elementwise(Kernel::ResidualDropoutForward, vec![x, h], dtypes.1, dtypes.0, Some(self.seed.clone()), self.prob);
            match ResidualDropoutBackward.prepare::<C>([x.node.clone(), h.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let y = forward(x.primitive, h.primitive);
                    prep.finish((self.seed.clone(), self.prob, dtypes.0, dtypes.1), y)
                }
                OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive, h.primitive)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every entry point the launches name is in the source, with the launch bounds the
    /// launches assume.
    #[test]
    fn entry_points_are_in_the_source() {
        for kernel in Kernel::ALL {
            assert!(SOURCE.specialised(1).contains(&format!("__launch_bounds__({THREADS}) {}(", kernel.entry())), "{}", kernel.entry());
        }
        assert!(SOURCE.specialised(1).contains(&format!("#define UNROLL {ELEMENTS_PER_THREAD}\n")));
        assert!(SOURCE.specialised(1).contains(&format!("#define WIDE_PER {}\n", WIDE_ROWS / THREADS as usize)));
    }
}

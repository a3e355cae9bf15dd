//! Model operations as kernels of our own on burn's fused CUDA backend (`src/fused_ops.cu`),
//! forward and, under autodiff, backward: LayerNorm so far. burn records LayerNorm as ~10
//! operations forward and ~20 backward; a full-size stage-2 step has 49 of them, and recording
//! operations is what bounds that step (`model-import/results/fused-optim-2026-12-03/`: the
//! host spends 0.14 s recording the forward and 0.22 s the backward of a 0.39 s step). Here
//! each is one operation each way. [`crate::model::nn::LayerNorm`] calls here first and keeps
//! burn's operations for every other backend, dtype, and when `LLAVA_JP_FUSED_OPS=0`.
//!
//! Launched like [`crate::flash`]'s kernels: custom operations of burn's fusion stream,
//! compiled by NVRTC through cubecl, queued on cubecl's stream.

use burn::backend::ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::cubecl::prelude::CubeCount;
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{FusionRuntime, FusionTensor};

use crate::backend::autodiff_cuda_backends;
use crate::cublaslt::downcast;
use crate::cuda_kernel::{autodiff_cuda, contiguous, float_code, Cube, KernelSource, SourceKernel, Switch};
use crate::flash::{empty, tensor_cores};

type Inner = CubeBackend<CudaRuntime, f32, i32, u8>;
type Runtime = FusionCubeRuntime<CudaRuntime>;
type Primitive = FusionTensor<Runtime>;

/// Specialised on the element type (`ELEM`, [`float_code`]'s codes).
static SOURCE: KernelSource = KernelSource::new("ELEM", include_str!("fused_ops.cu"));
/// Threads per block (the launch bounds in the source); a warp per row, so eight rows a block.
const THREADS: u32 = 256;
const ROWS_PER_BLOCK: usize = 8;
/// Rows a block of the weight / bias gradients' partial sums covers (more when there would
/// be more than [`MAX_CHUNKS`] blocks).
const ROWS_PER_CHUNK: usize = 64;
const MAX_CHUNKS: usize = 512;

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
/// the kernels, where `B` and the operands are ones they cover (burn's CUDA backend, under
/// autodiff or not; f32, or bf16 / f16 on compute capability 8.0 and up; weight and bias of
/// the input's dtype and width); the operands come back untouched otherwise.
pub fn try_layer_norm<B: Backend, const D: usize>(x: Tensor<B, D>, weight: Tensor<B, 1>, bias: Tensor<B, 1>, eps: f64) -> Result<Tensor<B, D>, Rejected<B, D>> {
    let fused = std::any::TypeId::of::<B::FloatTensorPrimitive>() == std::any::TypeId::of::<Primitive>();
    if !fused && !autodiff_cuda::<B>() {
        return Err((x, weight, bias));
    }
    let dtype = x.dtype();
    let d = x.dims()[D - 1];
    let covered = enabled()
        && float_code(dtype).is_some()
        && weight.dtype() == dtype
        && bias.dtype() == dtype
        && weight.dims() == [d]
        && bias.dims() == [d]
        && x.shape().num_elements() > 0
        && (dtype == DType::F32 || tensor_cores(&x.device()));
    if !covered {
        return Err((x, weight, bias));
    }
    if fused {
        let prim = |t: TensorPrimitive<B>| downcast::<_, Primitive>(t.tensor()).ok().unwrap();
        let y = register_forward(prim(x.into_primitive()), prim(weight.into_primitive()), prim(bias.into_primitive()), eps).0;
        let y = downcast::<Primitive, B::FloatTensorPrimitive>(y).ok().unwrap();
        return Ok(Tensor::from_primitive(TensorPrimitive::Float(y)));
    }
    Ok(autodiff_layer_norm(x, weight, bias, eps))
}

/// On the autodiff CUDA backends: the forward kernel, and the backward kernels when an operand
/// is tracked.
fn autodiff_layer_norm<B: Backend, const D: usize>(x: Tensor<B, D>, weight: Tensor<B, 1>, bias: Tensor<B, 1>, eps: f64) -> Tensor<B, D> {
    use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
    use burn::backend::{Autodiff, Cuda};
    use burn::tensor::{bf16, f16};
    macro_rules! route {
        ($($inner:ty, $strategy:ty);*) => {$(
            if std::any::TypeId::of::<B>() == std::any::TypeId::of::<Autodiff<$inner, $strategy>>() {
                type P = burn::tensor::ops::FloatTensor<Autodiff<$inner, $strategy>>;
                let prim = |t: TensorPrimitive<B>| downcast::<_, P>(t.tensor()).ok().unwrap();
                let y = autodiff::layer_norm::<$inner, $strategy>(prim(x.into_primitive()), prim(weight.into_primitive()), prim(bias.into_primitive()), eps);
                let y = downcast::<P, B::FloatTensorPrimitive>(y).ok().unwrap();
                return Tensor::from_primitive(TensorPrimitive::Float(y));
            }
        )*};
    }
    autodiff_cuda_backends!(route);
    unreachable!("autodiff_cuda::<B>() was checked by the caller")
}

/// Queues the forward: the output and each row's mean and 1 / sqrt(var + eps) (f32, for the
/// backward).
fn register_forward(x: Primitive, weight: Primitive, bias: Primitive, eps: f64) -> (Primitive, Primitive, Primitive) {
    let client = x.client.clone();
    let shape = x.shape.clone();
    let rows = shape.num_elements() / shape[shape.num_dims() - 1];
    let streams = OperationStreams::with_inputs([&x, &weight, &bias]);
    let outputs = [
        TensorIr::uninit(client.create_empty_handle(), shape, x.dtype),
        TensorIr::uninit(client.create_empty_handle(), Shape::new([rows]), DType::F32),
        TensorIr::uninit(client.create_empty_handle(), Shape::new([rows]), DType::F32),
    ];
    let desc = CustomOpIr::new("layer_norm_forward", &[x.into_ir(), weight.into_ir(), bias.into_ir()], &outputs);
    let op = LayerNormForward { desc: desc.clone(), eps };
    let mut out = client.register(streams, OperationIr::Custom(desc), op).into_iter();
    let mut next = || out.next().expect("three outputs");
    (next(), next(), next())
}

/// Queues the backward: the input's gradient, and the weight's and bias's when `params`.
fn register_backward(x: Primitive, weight: Primitive, mean: Primitive, rstd: Primitive, dy: Primitive, params: bool) -> (Primitive, Option<(Primitive, Primitive)>) {
    let dy = if dy.dtype == x.dtype {
        dy
    } else {
        type Fused = burn::backend::Cuda<f32>;
        Tensor::<Fused, 1>::from_primitive(TensorPrimitive::Float(dy)).cast(x.dtype).into_primitive().tensor()
    };
    let client = x.client.clone();
    let (shape, d) = (x.shape.clone(), weight.shape[0]);
    let streams = OperationStreams::with_inputs([&x, &weight, &mean, &rstd, &dy]);
    let mut outputs = vec![TensorIr::uninit(client.create_empty_handle(), shape, x.dtype)];
    if params {
        outputs.push(TensorIr::uninit(client.create_empty_handle(), Shape::new([d]), weight.dtype));
        outputs.push(TensorIr::uninit(client.create_empty_handle(), Shape::new([d]), weight.dtype));
    }
    let desc = CustomOpIr::new("layer_norm_backward", &[x.into_ir(), weight.into_ir(), mean.into_ir(), rstd.into_ir(), dy.into_ir()], &outputs);
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

fn launch(kernel: OpKernel, elem: u8, buffers: Vec<&Cube>, words: Vec<u64>, count: CubeCount) {
    SourceKernel { source: &SOURCE, entry: kernel.entry(), code: elem, threads: THREADS }.launch(buffers, words, count);
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
        let y = empty(&x, [rows, d], x.dtype);
        let mean = empty(&x, [rows], DType::F32);
        let rstd = empty(&x, [rows], DType::F32);
        let elem = float_code(x.dtype).expect("checked when queued");
        launch(OpKernel::Forward, elem, vec![&x, &weight, &bias, &y, &mean, &rstd], words(rows, d, self.eps, 0, 0), row_blocks(rows));
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
        let (rows, d) = rows_and_width(&x);
        let elem = float_code(x.dtype).expect("checked when queued");
        let dx = empty(&x, [rows, d], x.dtype);
        launch(OpKernel::BackwardInput, elem, vec![&x, &weight, &dy, &mean, &rstd, &dx], words(rows, d, 0.0, 0, 0), row_blocks(rows));
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
                OpKernel::BackwardParamsPartial,
                elem,
                vec![&x, &dy, &mean, &rstd, &partial_weight, &partial_bias],
                params.clone(),
                CubeCount::Static(columns, chunks as u32, 1),
            );
            let dweight = empty(&x, [d], weight.dtype);
            let dbias = empty(&x, [d], weight.dtype);
            launch(OpKernel::BackwardParamsSum, elem, vec![&partial_weight, &partial_bias, &dweight, &dbias], params, CubeCount::Static(columns, 1, 1));
            grads.extend([dweight, dbias]);
        }
        for (output, tensor) in self.desc.outputs.iter().zip(grads) {
            handles.register_float_tensor::<Inner>(&output.id, tensor);
        }
    }
}

/// Which kernel of `SOURCE` a launch runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum OpKernel {
    Forward,
    BackwardInput,
    BackwardParamsPartial,
    BackwardParamsSum,
}

impl OpKernel {
    fn entry(self) -> &'static str {
        match self {
            OpKernel::Forward => "layer_norm_forward",
            OpKernel::BackwardInput => "layer_norm_backward_input",
            OpKernel::BackwardParamsPartial => "layer_norm_backward_params_partial",
            OpKernel::BackwardParamsSum => "layer_norm_backward_params_sum",
        }
    }
}

/// LayerNorm as an autodiff operation whose backward is the kernels'. The state keeps the
/// input, the weight and the rows' statistics.
mod autodiff {
    use super::{register_backward, register_forward, Primitive};
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::Autodiff;
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
            // A frozen LayerNorm (stage 1's LLM) needs only the input's gradient.
            let (dx, params) = register_backward(s.x, s.weight, s.mean, s.rstd, dy, weight.is_some() || bias.is_some());
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

    /// LayerNorm on `Autodiff<B, C>`.
    pub(super) fn layer_norm<B, C>(
        x: FloatTensor<Autodiff<B, C>>,
        weight: FloatTensor<Autodiff<B, C>>,
        bias: FloatTensor<Autodiff<B, C>>,
        eps: f64,
    ) -> FloatTensor<Autodiff<B, C>>
    where
        B: Backend<FloatTensorPrimitive = Primitive>,
        C: CheckpointStrategy,
    {
        match LayerNormBackward.prepare::<C>([x.node.clone(), weight.node.clone(), bias.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (y, mean, rstd) = register_forward(x.primitive.clone(), weight.primitive.clone(), bias.primitive, eps);
                prep.finish(State { x: x.primitive, weight: weight.primitive, mean, rstd }, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(register_forward(x.primitive, weight.primitive, bias.primitive, eps).0),
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
        for kernel in [OpKernel::Forward, OpKernel::BackwardInput, OpKernel::BackwardParamsPartial, OpKernel::BackwardParamsSum] {
            assert!(SOURCE.specialised(1).contains(&format!("__launch_bounds__({THREADS}) {}(", kernel.entry())), "{}", kernel.entry());
        }
    }
}

//! The optimizer's step on burn's fused CUDA backend as kernels of our own
//! (`src/fused_optim.cu`): each parameter's AdamW update in one launch, updating the parameter
//! and its moments in place where burn hands them over unshared, and the gradients' global norm
//! as one operation. With burn's operations a stage-2 step recorded ~300 x 16 operations for
//! these alone, and recording operations is what bounds that step (the host thread at 100%,
//! `model-import/results/device-ordered-gemm-2026-12-02/`). The arithmetic is
//! [`crate::train::optim`]'s, in f32, in the same order; that module calls here first and keeps
//! its tensor version for every other backend and dtype.
//!
//! Launched like [`crate::flash`]'s kernels: a custom operation of burn's fusion stream, compiled
//! by NVRTC through cubecl (PTX kept in the kernel cache), queued on cubecl's stream.

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

use crate::cublaslt::downcast;
use crate::cuda_kernel::{contiguous, float_code, Cube, KernelSource, SourceKernel, Switch};
use crate::flash::empty;
use crate::train::optim::AdamWUpdate;

type Inner = CubeBackend<CudaRuntime, f32, i32, u8>;
type Runtime = FusionCubeRuntime<CudaRuntime>;
type Primitive = FusionTensor<Runtime>;

/// Specialised on the gradient's element type (`GRAD_TYPE`, [`float_code`]'s codes).
static SOURCE: KernelSource = KernelSource::new("GRAD_TYPE", include_str!("fused_optim.cu"));
/// Threads per block (the launch bounds in the source).
const THREADS: u32 = 256;
/// Blocks per launch at most (grid-stride loops cover the rest): about one wave on an H200.
const MAX_BLOCKS: usize = 1024;
/// Blocks (so partial sums) per gradient for the norm: a few per SM, so that a large gradient
/// is read at the memory's speed (128 read a 2048 x 8192 one at a fifth of it).
const NORM_BLOCKS: usize = 1024;

static SWITCH: Switch = Switch::new("LLAVA_JP_FUSED_OPTIM");

/// Whether the kernels take the optimizer's work where they can: yes unless
/// `LLAVA_JP_FUSED_OPTIM=0` or [`set_enabled`] said otherwise.
pub fn enabled() -> bool {
    SWITCH.on()
}

/// Turns the kernels on or off for the whole process (tests and benchmarks compare the two).
pub fn set_enabled(on: bool) {
    SWITCH.set(on);
}

/// Whether `B` is the backend the kernels run on (burn's fused CUDA backend).
pub fn covers<B: Backend>() -> bool {
    std::any::TypeId::of::<B::FloatTensorPrimitive>() == std::any::TypeId::of::<Primitive>() && enabled()
}

type Rejected<B, const D: usize> = (Tensor<B, D>, Tensor<B, D>, Tensor<B, 1>, Tensor<B, 1>);

/// One AdamW update of `param` (any shape, f32) from `grad` (its shape; f32, bf16 or f16) and
/// the flattened f32 moments: `(param, exp_avg, exp_avg_sq)` after it. The operands come back
/// untouched where the kernel does not cover them.
pub fn try_adamw<B: Backend, const D: usize>(
    param: Tensor<B, D>,
    grad: Tensor<B, D>,
    exp_avg: Tensor<B, 1>,
    exp_avg_sq: Tensor<B, 1>,
    update: &AdamWUpdate,
) -> Result<(Tensor<B, D>, Tensor<B, 1>, Tensor<B, 1>), Rejected<B, D>> {
    let n = param.shape().num_elements();
    let fits = covers::<B>()
        && n > 0
        && param.dtype() == DType::F32
        && exp_avg.dtype() == DType::F32
        && exp_avg_sq.dtype() == DType::F32
        && float_code(grad.dtype()).is_some()
        && grad.dims() == param.dims()
        && exp_avg.dims() == [n]
        && exp_avg_sq.dims() == [n];
    if !fits {
        return Err((param, grad, exp_avg, exp_avg_sq));
    }
    let prim = |t: TensorPrimitive<B>| downcast::<_, Primitive>(t.tensor()).ok().unwrap();
    let back = |p: Primitive| TensorPrimitive::<B>::Float(downcast::<Primitive, B::FloatTensorPrimitive>(p).ok().unwrap());
    let (p, g, m, v) = (prim(param.into_primitive()), prim(grad.into_primitive()), prim(exp_avg.into_primitive()), prim(exp_avg_sq.into_primitive()));
    let client = p.client.clone();
    let streams = OperationStreams::with_inputs([&p, &g, &m, &v]);
    let outputs = [
        TensorIr::uninit(client.create_empty_handle(), p.shape.clone(), DType::F32),
        TensorIr::uninit(client.create_empty_handle(), m.shape.clone(), DType::F32),
        TensorIr::uninit(client.create_empty_handle(), v.shape.clone(), DType::F32),
    ];
    let desc = CustomOpIr::new("adamw_step", &[p.into_ir(), g.into_ir(), m.into_ir(), v.into_ir()], &outputs);
    let op = AdamWOp { desc: desc.clone(), params: update.params() };
    let mut out = client.register(streams, OperationIr::Custom(desc), op).into_iter();
    let mut next = || back(out.next().expect("three outputs"));
    Ok((Tensor::from_primitive(next()), Tensor::from_primitive(next()), Tensor::from_primitive(next())))
}

/// The sum of the squares of every element of `grads` (f32, bf16 or f16 primitives of any
/// shape), as a one-element f32 tensor: one operation however many gradients. The same inputs
/// give the same bits (the partial sums are added in a fixed order). `None` where the kernels
/// do not cover them (another backend, another dtype, no element at all).
pub fn try_sum_of_squares<B: Backend>(grads: &[B::FloatTensorPrimitive]) -> Option<Tensor<B, 1>> {
    if !covers::<B>() || grads.is_empty() {
        return None;
    }
    let prims: Vec<Primitive> = grads.iter().map(|g| downcast::<_, Primitive>(g.clone()).ok().unwrap()).collect();
    if prims.iter().any(|g| float_code(g.dtype).is_none()) {
        return None;
    }
    // An empty gradient adds nothing, and a kernel cannot be launched over none.
    let prims: Vec<Primitive> = prims.into_iter().filter(|g| g.shape.num_elements() > 0).collect();
    if prims.is_empty() {
        return None;
    }
    let client = prims[0].client.clone();
    let streams = OperationStreams::with_inputs(prims.iter());
    let output = TensorIr::uninit(client.create_empty_handle(), Shape::new([1]), DType::F32);
    let irs: Vec<TensorIr> = prims.into_iter().map(|g| g.into_ir()).collect();
    let desc = CustomOpIr::new("sum_of_squares", &irs, &[output]);
    let op = SumOfSquaresOp { desc: desc.clone() };
    let out = client.register(streams, OperationIr::Custom(desc), op).pop().expect("one output");
    let out = downcast::<Primitive, B::FloatTensorPrimitive>(out).ok().unwrap();
    Some(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

/// The kernels' parameter words (`Params` in the source).
#[derive(Debug, Clone, Copy, Default)]
struct Params {
    n: u64,
    slot: u64,
    update: [u64; 9],
}

impl Params {
    fn words(&self) -> Vec<u64> {
        let mut words = vec![self.n, self.slot];
        words.extend(self.update);
        words
    }
}

impl AdamWUpdate {
    /// decay, grad_scale, beta1, 1 - beta1, beta2, 1 - beta2, sqrt(bias correction 2), epsilon,
    /// step size: the scalars as burn's scalar operations round them (f64 to f32), as bits.
    fn params(&self) -> [u64; 9] {
        let bits = |x: f64| (x as f32).to_bits() as u64;
        let t = self.step as i32;
        let bias_correction1 = 1.0 - self.beta1.powi(t);
        let bias_correction2 = 1.0 - self.beta2.powi(t);
        [
            bits(1.0 - self.lr * self.weight_decay),
            bits(self.grad_scale),
            bits(self.beta1),
            bits(1.0 - self.beta1),
            bits(self.beta2),
            bits(1.0 - self.beta2),
            bits(bias_correction2.sqrt()),
            bits(self.epsilon),
            bits(self.lr / bias_correction1),
        ]
    }
}

/// Blocks for `n` elements, one element a thread, at most [`MAX_BLOCKS`].
fn blocks(n: usize) -> u32 {
    n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32
}

/// Queues `kernel` for gradients of element type `grad`.
fn launch(kernel: OptimKernel, grad: u8, buffers: Vec<&Cube>, params: Params, blocks: u32) {
    let task = SourceKernel { source: &SOURCE, entry: kernel.entry(), code: grad, threads: THREADS };
    task.launch(buffers, params.words(), CubeCount::Static(blocks, 1, 1));
}

#[derive(Debug)]
struct AdamWOp {
    desc: CustomOpIr,
    params: [u64; 9],
}

impl Operation<Runtime> for AdamWOp {
    fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
        let inputs = &self.desc.inputs;
        let mut get = |i: usize| contiguous(handles.get_float_tensor::<Inner>(&inputs[i]));
        let (param, grad, exp_avg, exp_avg_sq) = (get(0), get(1), get(2), get(3));
        let n = param.meta.num_elements();
        // In place where this operation holds the only reference (burn handed the tensor over
        // at its last use); a new buffer otherwise.
        let output = |t: &Cube| if t.can_mut() { t.clone() } else { empty(t, [n], DType::F32) };
        let (param_out, exp_avg_out, exp_avg_sq_out) = (output(&param), output(&exp_avg), output(&exp_avg_sq));
        let kind = float_code(grad.dtype).expect("checked when queued");
        let params = Params { n: n as u64, slot: 0, update: self.params };
        launch(OptimKernel::AdamW, kind, vec![&param, &grad, &exp_avg, &exp_avg_sq, &param_out, &exp_avg_out, &exp_avg_sq_out], params, blocks(n));
        // The parameter's own shape (a new buffer was made flat).
        let param_out = CubeTensor::new_contiguous(param_out.client.clone(), param_out.device, param.meta.shape().clone(), param_out.handle, DType::F32);
        for (output, tensor) in self.desc.outputs.iter().zip([param_out, exp_avg_out, exp_avg_sq_out]) {
            handles.register_float_tensor::<Inner>(&output.id, tensor);
        }
    }
}

#[derive(Debug)]
struct SumOfSquaresOp {
    desc: CustomOpIr,
}

impl Operation<Runtime> for SumOfSquaresOp {
    fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
        let grads: Vec<Cube> = self.desc.inputs.iter().map(|ir| contiguous(handles.get_float_tensor::<Inner>(ir))).collect();
        let slots: Vec<usize> = grads.iter().map(|g| blocks(g.meta.num_elements()).min(NORM_BLOCKS as u32) as usize).collect();
        let partials = empty(&grads[0], [slots.iter().sum::<usize>()], DType::F32);
        let mut slot = 0;
        for (grad, &count) in grads.iter().zip(&slots) {
            let params = Params { n: grad.meta.num_elements() as u64, slot: slot as u64, ..Params::default() };
            launch(OptimKernel::SumSquaresPartial, float_code(grad.dtype).expect("checked when queued"), vec![grad, &partials], params, count as u32);
            slot += count;
        }
        let out = empty(&grads[0], [1], DType::F32);
        let params = Params { n: slot as u64, ..Params::default() };
        launch(OptimKernel::SumPartials, 0, vec![&partials, &out], params, 1);
        handles.register_float_tensor::<Inner>(&self.desc.outputs[0].id, out);
    }
}

/// Which kernel of `SOURCE` a launch runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum OptimKernel {
    AdamW,
    SumSquaresPartial,
    SumPartials,
}

impl OptimKernel {
    fn entry(self) -> &'static str {
        match self {
            OptimKernel::AdamW => "adamw_step",
            OptimKernel::SumSquaresPartial => "sum_squares_partial",
            OptimKernel::SumPartials => "sum_partials",
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
        for kernel in [OptimKernel::AdamW, OptimKernel::SumSquaresPartial, OptimKernel::SumPartials] {
            assert!(SOURCE.specialised(1).contains(&format!("__launch_bounds__({THREADS}) {}(", kernel.entry())), "{}", kernel.entry());
        }
    }

    /// The scalars as the kernel reads them: PyTorch's bias corrections at step 3.
    #[test]
    fn update_words() {
        let update = AdamWUpdate { lr: 1e-3, weight_decay: 0.1, beta1: 0.9, beta2: 0.999, epsilon: 1e-8, step: 3, grad_scale: 0.5 };
        let w = update.params().map(|b| f32::from_bits(b as u32));
        assert_eq!(w[0], (1.0 - 1e-4) as f32);
        assert_eq!(w[1], 0.5);
        assert_eq!(w[3], 0.1f64 as f32);
        assert_eq!(w[6], ((1.0 - 0.999f64.powi(3)).sqrt()) as f32);
        assert_eq!(w[8], (1e-3 / (1.0 - 0.9f64.powi(3))) as f32);
    }
}

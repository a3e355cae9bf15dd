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

use std::collections::BTreeMap;

use burn::backend::ir::{CustomOpIr, HandleContainer, OperationIr, TensorId, TensorIr};
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
/// `LLAVA_JP_OPTIM_COPIES=0` turns the compute-dtype copies off (A/B timing).
static COPIES: Switch = Switch::new("LLAVA_JP_OPTIM_COPIES");

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

/// The parameters' copies in the compute dtype that [`try_adamw`] wrote with their update, by
/// the id of the f32 parameter each is a copy of. Under autocast every linear layer casts its
/// f32 weight and bias on every forward (stage 2: ~4.4 ms a step of casts alone, reading the
/// whole language model); the update already holds each new value in a register, so writing it
/// rounded costs the write only. A parameter's copy is dropped when the parameter is updated
/// again (its successor has a new id) or by [`drop_compute_copies`].
static COMPUTE_COPIES: std::sync::Mutex<BTreeMap<TensorId, Primitive>> = std::sync::Mutex::new(BTreeMap::new());

fn compute_copies() -> std::sync::MutexGuard<'static, BTreeMap<TensorId, Primitive>> {
    // A panic elsewhere while the lock was held leaves a map that is still whole.
    COMPUTE_COPIES.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `param` in `dtype`: the copy the optimizer wrote with `param`'s update when it wrote one
/// in that dtype, else burn's cast. The two are the same bits (the same rounding).
pub(crate) fn cast_parameter(param: Primitive, dtype: DType) -> Primitive {
    match compute_copy(&param, dtype) {
        Some(copy) => {
            COPIES_TAKEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            copy
        }
        None => crate::cuda_kernel::cast(param, dtype),
    }
}

static COPIES_TAKEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many times a forward has taken the optimizer's copy instead of a cast, in this process
/// (tests and benchmarks: that the copies are used).
pub fn compute_copies_taken() -> u64 {
    COPIES_TAKEN.load(std::sync::atomic::Ordering::Relaxed)
}

/// The optimizer's copy of `param` in `dtype`, if it wrote one (see [`COMPUTE_COPIES`]).
pub(crate) fn compute_copy(param: &Primitive, dtype: DType) -> Option<Primitive> {
    if param.dtype != DType::F32 || param.dtype == dtype {
        return None;
    }
    compute_copies().get(&param.id).filter(|copy| copy.dtype == dtype && copy.shape == param.shape).cloned()
}

/// Drops every copy [`try_adamw`] kept (the end of a training run: they are device memory the
/// size of the trained parameters in the compute dtype).
pub fn drop_compute_copies() {
    // Dropped once the lock is released (a drop queues an operation).
    let copies = std::mem::take(&mut *compute_copies());
    drop(copies);
}

/// How many copies are kept now (tests).
pub fn compute_copies_kept() -> usize {
    compute_copies().len()
}

/// The optimizer's copy of `param` in `dtype`, if it kept one (tests; the forward takes it
/// through [`cast_parameter`]).
pub fn compute_copy_of<B: Backend, const D: usize>(param: &Tensor<B, D>, dtype: DType) -> Option<Tensor<B, D>> {
    if !crate::cuda_kernel::fused_cuda::<B>() {
        return None;
    }
    compute_copy(&crate::cuda_kernel::to_primitive(param.clone()), dtype).map(crate::cuda_kernel::from_primitive)
}

/// One AdamW update of `param` (any shape, f32) from `grad` (its shape; f32, bf16 or f16) and
/// the flattened f32 moments: `(param, exp_avg, exp_avg_sq)` after it. With `copy` (bf16 or
/// f16) the kernel also writes the new parameter in that dtype, kept for [`cast_parameter`].
/// The operands come back untouched where the kernel does not cover them.
pub fn try_adamw<B: Backend, const D: usize>(
    param: Tensor<B, D>,
    grad: Tensor<B, D>,
    exp_avg: Tensor<B, 1>,
    exp_avg_sq: Tensor<B, 1>,
    update: &AdamWUpdate,
    copy: Option<DType>,
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
    let copy_type = match copy.filter(|_| COPIES.on()) {
        Some(DType::BF16) => 1,
        Some(DType::F16) => 2,
        _ => 0,
    };
    // The copy of the parameter before this update is stale from here on (dropped outside
    // the lock: a drop queues an operation).
    let stale = compute_copies().remove(&p.id);
    drop(stale);
    let streams = OperationStreams::with_inputs([&p, &g, &m, &v]);
    let mut outputs = vec![
        TensorIr::uninit(client.create_empty_handle(), p.shape.clone(), DType::F32),
        TensorIr::uninit(client.create_empty_handle(), m.shape.clone(), DType::F32),
        TensorIr::uninit(client.create_empty_handle(), v.shape.clone(), DType::F32),
    ];
    if copy_type != 0 {
        outputs.push(TensorIr::uninit(client.create_empty_handle(), p.shape.clone(), copy.expect("a copy type")));
    }
    let desc = CustomOpIr::new("adamw_step", &[p.into_ir(), g.into_ir(), m.into_ir(), v.into_ir()], &outputs);
    let op = AdamWOp { desc: desc.clone(), params: update.params(), copy_type };
    let mut out = client.register(streams, OperationIr::Custom(desc), op).into_iter();
    let param = out.next().expect("the parameter");
    let (exp_avg, exp_avg_sq) = (out.next().expect("the first moment"), out.next().expect("the second moment"));
    if let Some(param_copy) = out.next() {
        compute_copies().insert(param.id, param_copy);
    }
    Ok((Tensor::from_primitive(back(param)), Tensor::from_primitive(back(exp_avg)), Tensor::from_primitive(back(exp_avg_sq))))
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
    copy_type: u64,
}

impl Params {
    fn words(&self) -> Vec<u64> {
        let mut words = vec![self.n, self.slot];
        words.extend(self.update);
        words.push(self.copy_type);
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
    /// 0: no copy; 1: bf16, 2: f16 (the source's `copy_type`).
    copy_type: u64,
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
        let copy = self.desc.outputs.get(3).map(|ir| empty(&param, [n], ir.dtype));
        let params = Params { n: n as u64, slot: 0, update: self.params, copy_type: self.copy_type };
        // Without a copy the kernel writes none: `param_out` stands in for its buffer.
        let copy_buffer = copy.as_ref().unwrap_or(&param_out);
        launch(OptimKernel::AdamW, kind, vec![&param, &grad, &exp_avg, &exp_avg_sq, &param_out, &exp_avg_out, &exp_avg_sq_out, copy_buffer], params, blocks(n));
        // The parameter's own shape (a new buffer was made flat).
        let shaped = |t: Cube, dtype: DType| CubeTensor::new_contiguous(t.client.clone(), t.device, param.meta.shape().clone(), t.handle, dtype);
        let param_out = shaped(param_out, DType::F32);
        let copy = copy.map(|c| {
            let dtype = c.dtype;
            shaped(c, dtype)
        });
        for (output, tensor) in self.desc.outputs.iter().zip([param_out, exp_avg_out, exp_avg_sq_out].into_iter().chain(copy)) {
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

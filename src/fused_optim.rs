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

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use burn::backend::ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use burn_cubecl::cubecl::cuda::{CudaCompiler, CudaRuntime};
use burn_cubecl::cubecl::prelude::{AddressType, CompiledKernel, CubeCount, CubeDim, ExecutionMode, KernelId, KernelMetadata, StorageType};
use burn_cubecl::cubecl::server::{KernelArguments, MetadataBindingInfo};
use burn_cubecl::cubecl::{CompilationError, Compiler, CubeTask};
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{FusionRuntime, FusionTensor};

use crate::cublaslt::downcast;
use crate::flash::{compile_source, empty, fnv1a};
use crate::train::optim::AdamWUpdate;

type Inner = CubeBackend<CudaRuntime, f32, i32, u8>;
type Runtime = FusionCubeRuntime<CudaRuntime>;
type Primitive = FusionTensor<Runtime>;
type Cube = CubeTensor<CudaRuntime>;

const SOURCE: &str = include_str!("fused_optim.cu");
/// Threads per block (the launch bounds in the source).
const THREADS: u32 = 256;
/// Blocks per launch at most (grid-stride loops cover the rest): about one wave on an H200.
const MAX_BLOCKS: usize = 1024;
/// Blocks (so partial sums) per gradient for the norm.
const NORM_BLOCKS: usize = 128;

static ENABLED: AtomicU8 = AtomicU8::new(UNSET);
const UNSET: u8 = u8::MAX;

/// Whether the kernels take the optimizer's work where they can: yes unless
/// `LLAVA_JP_FUSED_OPTIM=0` or [`set_enabled`] said otherwise.
pub fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        UNSET => {
            let on = match std::env::var("LLAVA_JP_FUSED_OPTIM").as_deref() {
                Ok("1") | Err(_) => true,
                Ok("0") => false,
                Ok(other) => panic!("LLAVA_JP_FUSED_OPTIM={other}: expected 0 or 1"),
            };
            set_enabled(on);
            on
        }
        code => code == 1,
    }
}

/// Turns the kernels on or off for the whole process (tests and benchmarks compare the two).
pub fn set_enabled(on: bool) {
    ENABLED.store(on as u8, Ordering::Relaxed);
}

/// Whether `B` is the backend the kernels run on (burn's fused CUDA backend).
pub fn covers<B: Backend>() -> bool {
    std::any::TypeId::of::<B::FloatTensorPrimitive>() == std::any::TypeId::of::<Primitive>() && enabled()
}

fn grad_type(dtype: DType) -> Option<u8> {
    match dtype {
        DType::F32 => Some(0),
        DType::BF16 => Some(1),
        DType::F16 => Some(2),
        _ => None,
    }
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
        && grad_type(grad.dtype()).is_some()
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
    if prims.iter().any(|g| grad_type(g.dtype).is_none()) {
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

/// `tensor` as a row-major tensor (a copy only where it is not one).
pub(crate) fn contiguous(tensor: Cube) -> Cube {
    let shape = tensor.meta.shape().to_vec();
    let dense = tensor.meta.strides().iter().zip(row_major_dyn(&shape)).all(|(&s, r)| s == r);
    if dense { tensor } else { into_contiguous(tensor) }
}

fn row_major_dyn(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// Blocks for `n` elements, one element a thread, at most [`MAX_BLOCKS`].
fn blocks(n: usize) -> u32 {
    n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32
}

fn launch(kernel: OptimKernel, grad_type: u8, buffers: Vec<&Cube>, params: Params, blocks: u32) {
    let client = buffers[0].client.clone();
    let mut args = KernelArguments::new();
    args.buffers = buffers.into_iter().map(|t| t.handle.clone().binding()).collect();
    let words = params.words();
    let count = words.len();
    // All of it static: cubecl would pass a dynamic part as one more buffer argument.
    args.info = MetadataBindingInfo::new(words, count);
    client.launch(Box::new(OptimTask { kernel, grad_type }), CubeCount::Static(blocks, 1, 1), args);
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
        let kind = grad_type(grad.dtype).expect("checked when queued");
        let params = Params { n: n as u64, slot: 0, update: self.params };
        launch(OptimKernel::AdamW, kind, vec![&param, &grad, &exp_avg, &exp_avg_sq, &param_out, &exp_avg_out, &exp_avg_sq_out], params, blocks(n));
        // The parameter's own shape (a new buffer was made flat).
        let shape = param.meta.shape().clone();
        let strides = row_major_dyn(&shape);
        let param_out = CubeTensor::new(param_out.client.clone(), param_out.handle, burn_std::Metadata::new(shape, strides), param_out.device, DType::F32);
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
            launch(OptimKernel::SumSquaresPartial, grad_type(grad.dtype).expect("checked when queued"), vec![grad, &partials], params, count as u32);
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

/// One kernel for one gradient type: the source behind a `#define`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct OptimTask {
    kernel: OptimKernel,
    grad_type: u8,
}

impl OptimTask {
    fn source(&self) -> String {
        format!("#define GRAD_TYPE {}\n{SOURCE}", self.grad_type)
    }
}

fn source_hash() -> u64 {
    static HASH: OnceLock<u64> = OnceLock::new();
    *HASH.get_or_init(|| fnv1a(SOURCE))
}

impl KernelMetadata for OptimTask {
    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((*self, source_hash())).cube_dim(CubeDim::new_1d(THREADS))
    }

    fn address_type(&self) -> StorageType {
        AddressType::U64.unsigned_type()
    }
}

impl CubeTask<CudaCompiler> for OptimTask {
    fn compile(
        &self,
        compiler: &mut CudaCompiler,
        options: &<CudaCompiler as Compiler>::CompilationOptions,
        mode: ExecutionMode,
        address_type: StorageType,
    ) -> Result<CompiledKernel<CudaCompiler>, CompilationError> {
        compile_source(compiler, options, mode, address_type, self.kernel.entry(), self.source(), THREADS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel's task compiles without a GPU to our source with its define, and the ids
    /// tell the variants apart.
    #[test]
    fn tasks_compile_to_our_source() {
        for kernel in [OptimKernel::AdamW, OptimKernel::SumSquaresPartial, OptimKernel::SumPartials] {
            let task = OptimTask { kernel, grad_type: 1 };
            let compiled = task
                .compile(&mut CudaCompiler::default(), &Default::default(), ExecutionMode::Checked, task.address_type())
                .expect("compiles");
            assert_eq!(compiled.entrypoint_name, kernel.entry());
            assert!(compiled.source.starts_with("#define GRAD_TYPE 1\n"));
            assert!(compiled.source.contains(&format!("__launch_bounds__({THREADS}) {}(", kernel.entry())));
            assert_ne!(task.id(), OptimTask { grad_type: 0, ..task }.id());
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

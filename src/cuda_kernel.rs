//! What the hand-written CUDA kernels launched as burn custom operations share
//! ([`crate::fused_ops`], [`crate::fused_optim`]): a process-wide switch read from the
//! environment, the element-type code their sources are specialised on, row-major copies of
//! operands, and one kernel task for a source specialised by a single `#define`, compiled by
//! NVRTC through cubecl and launched on cubecl's stream with its parameters as static info
//! words. [`crate::flash`]'s kernels, specialised by four defines, have a task of their own.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use burn::prelude::*;
use burn::tensor::DType;
use burn_cubecl::cubecl::cuda::{CudaCompiler, CudaRuntime};
use burn_cubecl::cubecl::prelude::{AddressType, CompiledKernel, CubeCount, CubeDim, ExecutionMode, KernelId, KernelMetadata, StorageType};
use burn_cubecl::cubecl::server::{KernelArguments, MetadataBindingInfo};
use burn_cubecl::cubecl::{CompilationError, Compiler, CubeTask};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;

use crate::backend::autodiff_cuda_backends;
use crate::flash::{compile_source, fnv1a};

pub(crate) type Cube = CubeTensor<CudaRuntime>;

/// A choice among named options for the whole process: read from the environment variable
/// `var` when first asked (unset: the first option, or what [`Setting::defaulting_to`] picks),
/// unless [`Setting::set`] chose before. An option may have several spellings, `|`-separated
/// (an old name kept working).
pub struct Setting {
    var: &'static str,
    options: &'static [&'static str],
    default: fn() -> usize,
    state: AtomicU8,
}

const UNSET: u8 = u8::MAX;

impl Setting {
    pub const fn new(var: &'static str, options: &'static [&'static str]) -> Self {
        Self { var, options, default: || 0, state: AtomicU8::new(UNSET) }
    }

    /// The option taken when `var` is unset, decided when first asked (what this machine has).
    pub const fn defaulting_to(self, default: fn() -> usize) -> Self {
        Self { default, ..self }
    }

    /// The chosen option's index in `options`.
    pub fn index(&self) -> usize {
        match self.state.load(Ordering::Relaxed) {
            UNSET => {
                let index = match std::env::var(self.var) {
                    Err(_) => (self.default)(),
                    Ok(value) => self.options.iter().position(|o| o.split('|').any(|name| name == value)).unwrap_or_else(|| {
                        let expected: Vec<&str> = self.options.iter().map(|o| o.split('|').next().unwrap_or(o)).collect();
                        panic!("{}={value}: expected one of {}", self.var, expected.join(", "))
                    }),
                };
                self.set(index);
                index
            }
            code => code as usize,
        }
    }

    pub fn set(&self, index: usize) {
        assert!(index < self.options.len(), "{}: option {index} of {}", self.var, self.options.len());
        self.state.store(index as u8, Ordering::Relaxed);
    }
}

/// An on/off [`Setting`]: on unless the environment variable is `0`.
pub struct Switch(Setting);

impl Switch {
    pub const fn new(var: &'static str) -> Self {
        Self(Setting::new(var, &["1", "0"]))
    }

    pub fn on(&self) -> bool {
        self.0.index() == 0
    }

    pub fn set(&self, on: bool) {
        self.0.set(if on { 0 } else { 1 })
    }
}

/// A kernel source: `builtin`, or the file the environment variable `var` names (a variant with
/// the same entry points and arguments, timed on a GPU machine without another build).
pub(crate) fn source_or_file(var: &str, builtin: &str) -> Result<String, String> {
    match std::env::var_os(var).filter(|path| !path.is_empty()) {
        Some(path) => std::fs::read_to_string(&path).map_err(|e| format!("{var}: cannot read {}: {e}", std::path::Path::new(&path).display())),
        None => Ok(builtin.to_owned()),
    }
}

/// The element-type code the sources are specialised on (`ELEM`): 0 f32, 1 bf16, 2 f16.
pub(crate) fn float_code(dtype: DType) -> Option<u8> {
    match dtype {
        DType::F32 => Some(0),
        DType::BF16 => Some(1),
        DType::F16 => Some(2),
        _ => None,
    }
}

/// Whether `B` is one of burn's autodiff backends over its fused CUDA backend.
pub(crate) fn autodiff_cuda<B: Backend>() -> bool {
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::{Autodiff, Cuda};
    use burn::tensor::{bf16, f16};
    macro_rules! any_of {
        ($($inner:ty, $strategy:ty);*) => { false $(|| std::any::TypeId::of::<B>() == std::any::TypeId::of::<Autodiff<$inner, $strategy>>())* };
    }
    autodiff_cuda_backends!(any_of)
}

/// The float primitive of burn's fused CUDA backend (`Cuda<f32>`, `Cuda<bf16>` alike: a
/// tensor's dtype travels with it), and of the backend under autodiff's inner one.
pub(crate) type Primitive = burn_fusion::FusionTensor<burn_cubecl::fusion::FusionCubeRuntime<CudaRuntime>>;

/// `Cuda<f32>`: its float primitive is [`Primitive`] whatever a tensor's dtype, so burn's
/// operations can run on primitives (inside custom and autodiff operations).
pub(crate) type Fused = burn::backend::Cuda<f32>;

/// `t` in `dtype` (burn's cast on the fused backend; `t` itself when already so).
pub(crate) fn cast(t: Primitive, dtype: DType) -> Primitive {
    use burn::tensor::ops::FloatTensorOps;
    if t.dtype == dtype {
        return t;
    }
    Fused::float_cast(t, dtype.into())
}

/// Whether `B` is burn's fused CUDA backend itself (no autodiff).
pub(crate) fn fused_cuda<B: Backend>() -> bool {
    std::any::TypeId::of::<B::FloatTensorPrimitive>() == std::any::TypeId::of::<Primitive>()
}

/// `B`'s float primitive as the fused CUDA backend's, for callers that checked [`fused_cuda`].
pub(crate) fn to_primitive<B: Backend, const D: usize>(t: Tensor<B, D>) -> Primitive {
    crate::cublaslt::downcast::<_, Primitive>(t.into_primitive().tensor()).ok().expect("burn's fused CUDA backend")
}

pub(crate) fn from_primitive<B: Backend, const D: usize>(p: Primitive) -> Tensor<B, D> {
    let p = crate::cublaslt::downcast::<Primitive, B::FloatTensorPrimitive>(p).ok().expect("burn's fused CUDA backend");
    Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(p))
}

/// An operation with its own backward on burn's autodiff CUDA backends: `run` records it on
/// `Autodiff<I, C>` for whichever inner backend and checkpointing strategy `B` turns out to be
/// ([`on_autodiff_cuda`] finds them: one place that knows the list).
pub(crate) trait AutodiffCudaOp<const N: usize> {
    fn run<I, C>(self, inputs: [burn::tensor::ops::FloatTensor<burn::backend::Autodiff<I, C>>; N]) -> burn::tensor::ops::FloatTensor<burn::backend::Autodiff<I, C>>
    where
        I: Backend<FloatTensorPrimitive = Primitive>,
        C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
}

/// Runs `op` on `inputs` (float primitives of any rank: `Tensor::into_primitive().tensor()`)
/// when `B` is one of the autodiff CUDA backends ([`autodiff_cuda`]); hands them back
/// otherwise.
pub(crate) fn on_autodiff_cuda<B: Backend, const N: usize, Op: AutodiffCudaOp<N>>(
    op: Op,
    inputs: [B::FloatTensorPrimitive; N],
) -> Result<B::FloatTensorPrimitive, [B::FloatTensorPrimitive; N]> {
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::{Autodiff, Cuda};
    use burn::tensor::{bf16, f16};
    use crate::cublaslt::downcast;
    macro_rules! route {
        ($($inner:ty, $strategy:ty);*) => {$(
            if std::any::TypeId::of::<B>() == std::any::TypeId::of::<Autodiff<$inner, $strategy>>() {
                type P = burn::tensor::ops::FloatTensor<Autodiff<$inner, $strategy>>;
                let prims = inputs.map(|t| downcast::<_, P>(t).ok().unwrap());
                let out = op.run::<$inner, $strategy>(prims);
                return Ok(downcast::<P, B::FloatTensorPrimitive>(out).ok().unwrap());
            }
        )*};
    }
    autodiff_cuda_backends!(route);
    Err(inputs)
}

/// Row-major strides of `shape`.
pub(crate) fn row_major_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// `tensor` as a row-major tensor (a copy only where it is not one).
pub(crate) fn contiguous(tensor: Cube) -> Cube {
    let shape = tensor.meta.shape().to_vec();
    let dense = tensor.meta.strides().iter().zip(row_major_strides(&shape)).all(|(&s, r)| s == r);
    if dense { tensor } else { into_contiguous(tensor) }
}

/// A kernel source (CUDA C++) specialised by one `#define` (`define` = a small code).
#[derive(Debug)]
pub(crate) struct KernelSource {
    define: &'static str,
    text: &'static str,
    hash: OnceLock<u64>,
}

impl KernelSource {
    pub(crate) const fn new(define: &'static str, text: &'static str) -> Self {
        Self { define, text, hash: OnceLock::new() }
    }

    /// FNV-1a of the text: part of every kernel's id, so that an edited source is never served
    /// from cubecl's on-disk PTX cache.
    fn hash(&self) -> u64 {
        *self.hash.get_or_init(|| fnv1a(self.text))
    }

    /// The text behind its define.
    pub(crate) fn specialised(&self, code: u8) -> String {
        format!("#define {} {code}\n{}", self.define, self.text)
    }
}

/// One entry point of a [`KernelSource`] for one value of its define, `threads` a block.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SourceKernel {
    pub source: &'static KernelSource,
    pub entry: &'static str,
    pub code: u8,
    pub threads: u32,
}

impl SourceKernel {
    /// Queues the kernel on `buffers[0]`'s stream over `count` blocks, its parameters the
    /// 64-bit `words` (the source's `Params`, passed by value).
    pub(crate) fn launch(self, buffers: Vec<&Cube>, words: Vec<u64>, count: CubeCount) {
        let client = buffers[0].client.clone();
        let mut args = KernelArguments::new();
        args.buffers = buffers.into_iter().map(|t| t.handle.clone().binding()).collect();
        let n = words.len();
        // All of it static: cubecl would pass a dynamic part as one more buffer argument.
        args.info = MetadataBindingInfo::new(words, n);
        client.launch(Box::new(self), count, args);
    }
}

impl KernelMetadata for SourceKernel {
    /// The entry point, so that cubecl's profile (`CUBECL_DEBUG_OPTION=profile`) tells our
    /// kernels apart.
    fn name(&self) -> &'static str {
        self.entry
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>().info((self.entry, self.code, self.threads, self.source.hash())).cube_dim(CubeDim::new_1d(self.threads))
    }

    fn address_type(&self) -> StorageType {
        AddressType::U64.unsigned_type()
    }
}

impl CubeTask<CudaCompiler> for SourceKernel {
    fn compile(
        &self,
        compiler: &mut CudaCompiler,
        options: &<CudaCompiler as Compiler>::CompilationOptions,
        mode: ExecutionMode,
        address_type: StorageType,
    ) -> Result<CompiledKernel<CudaCompiler>, CompilationError> {
        compile_source(compiler, options, mode, address_type, self.entry, self.source.specialised(self.code), self.threads, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static SOURCE: KernelSource = KernelSource::new("ELEM", "extern \"C\" __global__ void __launch_bounds__(256) k() {}\n");

    /// A task compiles without a GPU to its source behind its define; the ids tell the codes
    /// and entry points apart.
    #[test]
    fn tasks_compile_to_their_source() {
        let task = SourceKernel { source: &SOURCE, entry: "k", code: 2, threads: 256 };
        let compiled = task
            .compile(&mut CudaCompiler::default(), &Default::default(), ExecutionMode::Checked, task.address_type())
            .expect("compiles");
        assert_eq!(compiled.entrypoint_name, "k");
        assert!(compiled.source.starts_with("#define ELEM 2\nextern"));
        assert_ne!(task.id(), SourceKernel { code: 1, ..task }.id());
        assert_ne!(task.id(), SourceKernel { entry: "j", ..task }.id());
    }

    #[test]
    fn row_major_strides_of_shapes() {
        assert_eq!(row_major_strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(row_major_strides(&[5]), vec![1]);
        assert!(row_major_strides(&[]).is_empty());
    }

    #[test]
    fn a_setting_reads_its_variable_once_takes_every_spelling_and_names_the_bad_value() {
        use super::{Setting, Switch};
        // Variables of this test alone, so no other test's reads race with these writes.
        static UNSET: Setting = Setting::new("LLAVA_JP_TEST_SETTING_UNSET", &["first", "second"]);
        static PICKED: Setting = Setting::new("LLAVA_JP_TEST_SETTING_PICKED", &["first", "second"]).defaulting_to(|| 1);
        static OLD: Setting = Setting::new("LLAVA_JP_TEST_SETTING_OLD", &["new|old", "other"]);
        static BAD: Setting = Setting::new("LLAVA_JP_TEST_SETTING_BAD", &["new|old", "other"]);
        static OFF: Switch = Switch::new("LLAVA_JP_TEST_SWITCH_OFF");
        std::env::set_var("LLAVA_JP_TEST_SETTING_OLD", "old");
        std::env::set_var("LLAVA_JP_TEST_SETTING_BAD", "nwe");
        std::env::set_var("LLAVA_JP_TEST_SWITCH_OFF", "0");
        assert_eq!(UNSET.index(), 0);
        assert_eq!(PICKED.index(), 1);
        assert_eq!(OLD.index(), 0);
        assert!(!OFF.on());
        // Read once: a later change of the variable does not move it, `set` does.
        std::env::set_var("LLAVA_JP_TEST_SETTING_OLD", "other");
        assert_eq!(OLD.index(), 0);
        OLD.set(1);
        assert_eq!(OLD.index(), 1);
        OFF.set(true);
        assert!(OFF.on());
        let message = std::panic::catch_unwind(|| BAD.index()).expect_err("an unknown spelling panics");
        let message = message.downcast_ref::<String>().expect("a formatted message");
        assert_eq!(message, "LLAVA_JP_TEST_SETTING_BAD=nwe: expected one of new, other");
    }
}

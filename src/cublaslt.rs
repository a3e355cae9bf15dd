//! Matrix products on CUDA through cuBLASLt, loaded at run time, as a custom operation of burn's
//! fused CUDA backend (`burn::backend::Cuda`). burn 0.21's own bf16 GEMM runs at about a quarter
//! of cuBLAS's speed on an H200; this is the faster path [`crate::model::nn::matmul`] takes when
//! `LLAVA_JP_GEMM=cublaslt` is set and the backend is burn's CUDA backend, for inference and for
//! training alike. Every other backend keeps burn's path.
//!
//! cubecl 0.10 does not hand out the CUDA stream it runs on, so the product runs on a stream of
//! its own between two waits on the host: cubecl's queue is drained before (the operands are
//! written; the wait comes after the operands' device addresses are fetched, since fetching one
//! can queue work) and cuBLASLt's stream after (cubecl may reuse the operands' memory next).
//! That costs two round trips per product, little beside a large GEMM and a lot beside a decode
//! step's.
//!
//! Training goes through it too: on the autodiff CUDA backends the product is an autodiff
//! operation whose backward is two more cuBLASLt products ([`autodiff`]).
//!
//! Status (H200, 2026-12-02): bf16 products at the LLM's shapes run 1.5-3.2x faster than burn's
//! (`benches/gemm.rs`), f32 products are exact f32 (burn's use TF32). With the route on, the
//! backend fuzzer's matmul, projector, GPT-2, KV-cached decode, LLaVA and training-gradient
//! properties pass on the f32, bf16 and autocast CUDA legs, except one LLaVA case on f32 (GPT-2
//! width 2 with one-wide heads), whose logits miss by 1.9e-2 every time although every product
//! in it is exact when checked (`LLAVA_JP_GEMM_CHECK=1`, which also makes the case pass). Until
//! that is understood the route stays opt-in. A full-size stage-2 training step is no faster with
//! it (0.80 s against PyTorch's 0.18 s): matrix products are not where that time goes.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use burn::backend::ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};
use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::cubecl::future::block_on;
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{FusionRuntime, FusionTensor};
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{CudaContext, CudaStream};

/// The inner (unfused) backend whose handles the fused CUDA backend keeps; its float type does
/// not matter here, a tensor's dtype travels with it.
type Inner = CubeBackend<CudaRuntime, f32, i32, u8>;
type Runtime = FusionCubeRuntime<CudaRuntime>;
/// The float primitive of `Cuda<f32>` and `Cuda<bf16>` alike.
type Primitive = FusionTensor<Runtime>;

/// cuBLASLt's scratch space; 32 MiB is what cuBLAS itself uses on Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

static ENABLED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(UNSET);
const UNSET: u8 = 2;

/// Whether matrix products go through cuBLASLt: `LLAVA_JP_GEMM=cublaslt` (opt-in while it is
/// young) or `burn` (the default), unless [`set_enabled`] said otherwise.
pub fn enabled() -> bool {
    use std::sync::atomic::Ordering;
    match ENABLED.load(Ordering::Relaxed) {
        UNSET => {
            let on = match std::env::var("LLAVA_JP_GEMM").as_deref() {
                Ok("cublaslt") => true,
                Ok("burn") | Err(_) => false,
                Ok(other) => panic!("LLAVA_JP_GEMM={other}: expected `cublaslt` or `burn`"),
            };
            ENABLED.store(on as u8, Ordering::Relaxed);
            on
        }
        on => on == 1,
    }
}

/// Turns the cuBLASLt route on or off for the whole process (benchmarks compare both).
pub fn set_enabled(on: bool) {
    ENABLED.store(on as u8, std::sync::atomic::Ordering::Relaxed);
}

/// `value` as a `U` when `T` is `U` (for backend-generic code that takes a CUDA-only path).
pub(crate) fn downcast<T: 'static, U: 'static>(value: T) -> Result<U, T> {
    let boxed: Box<dyn Any> = Box::new(value);
    match boxed.downcast::<U>() {
        Ok(u) => Ok(*u),
        Err(back) => Err(*back.downcast::<T>().expect("a value downcast to its own type")),
    }
}

/// `a · b` (`[m, k] x [k, n]`) through cuBLASLt when `B` is burn's fused CUDA backend (with or
/// without autodiff) and the route is enabled; the operands come back untouched otherwise.
#[allow(clippy::type_complexity)]
pub fn try_matmul<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
    if checking() { checked(a, b) } else { route(a, b) }
}

#[allow(clippy::type_complexity)]
fn route<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
    if !enabled() || !matches!(a.dtype(), DType::F32 | DType::BF16 | DType::F16) || a.dtype() != b.dtype() {
        return Err((a, b));
    }
    if std::any::TypeId::of::<B::FloatTensorPrimitive>() != std::any::TypeId::of::<Primitive>() {
        return try_autodiff_matmul(a, b);
    }
    let (TensorPrimitive::Float(pa), TensorPrimitive::Float(pb)) = (a.into_primitive(), b.into_primitive()) else {
        unreachable!("float tensors of a float dtype");
    };
    let (pa, pb) = (downcast::<_, Primitive>(pa).ok().unwrap(), downcast::<_, Primitive>(pb).ok().unwrap());
    let out = register(pa, pb);
    let out = downcast::<Primitive, B::FloatTensorPrimitive>(out).ok().unwrap();
    Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

/// `LLAVA_JP_GEMM_CHECK=1`: every routed product is compared with the same product done in f64
/// on the host, and a wrong one panics naming its shapes (a debugging aid; it reads every
/// operand back, so it is slow).
fn checking() -> bool {
    static CHECK: OnceLock<bool> = OnceLock::new();
    *CHECK.get_or_init(|| std::env::var_os("LLAVA_JP_GEMM_CHECK").is_some())
}

/// [`route`] under [`checking`]. The bound per entry is the operands' rounding unit times
/// `Σ|a||b|` (plus a little for accumulation), so that a wrong layout or a race shows and
/// rounding does not.
#[allow(clippy::type_complexity)]
fn checked<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
    let host = |t: &Tensor<B, 2>| t.clone().into_data().convert::<f64>().to_vec::<f64>().unwrap();
    let ([m, k], [_, n], dtype) = (a.dims(), b.dims(), a.dtype());
    let (ha, hb) = (host(&a), host(&b));
    let routed = route(a, b)?;
    let got = host(&routed);
    let unit = match dtype {
        DType::BF16 => 2f64.powi(-7),
        DType::F16 => 2f64.powi(-10),
        _ => 2f64.powi(-20),
    };
    for i in 0..m {
        for j in 0..n {
            let (mut want, mut size) = (0f64, 0f64);
            for l in 0..k {
                want += ha[i * k + l] * hb[l * n + j];
                size += (ha[i * k + l] * hb[l * n + j]).abs();
            }
            let err = (got[i * n + j] - want).abs();
            if !(err <= size * (4.0 * unit + k as f64 * 2f64.powi(-24)) + 1e-30) {
                panic!("cuBLASLt product [{m}, {k}] x [{k}, {n}] {dtype:?}: entry ({i}, {j}) is {} where f64 gives {want} (|a||b| sums to {size})", got[i * n + j]);
            }
        }
    }
    Ok(routed)
}

/// Calls `$m!` with the autodiff CUDA backends routed to cuBLASLt, as `inner, strategy` pairs.
macro_rules! autodiff_cuda_backends {
    ($m:ident) => {
        $m!(Cuda<f32>, NoCheckpointing; Cuda<f32>, BalancedCheckpointing; Cuda<bf16>, NoCheckpointing; Cuda<bf16>, BalancedCheckpointing; Cuda<f16>, NoCheckpointing)
    };
}

/// The autodiff CUDA backends this crate trains on (`crate::backend::dispatch_autodiff`, and
/// the tests' bf16 one): each gets cuBLASLt's product and backward ([`autodiff::matmul`]).
fn try_autodiff_matmul<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
    use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
    use burn::backend::{Autodiff, Cuda};
    use burn::tensor::{bf16, f16};
    macro_rules! route {
        ($($inner:ty, $strategy:ty);*) => {$(
            if std::any::TypeId::of::<B>() == std::any::TypeId::of::<Autodiff<$inner, $strategy>>() {
                let (TensorPrimitive::Float(pa), TensorPrimitive::Float(pb)) = (a.into_primitive(), b.into_primitive()) else {
                    unreachable!("float tensors of a float dtype");
                };
                type P = burn::tensor::ops::FloatTensor<Autodiff<$inner, $strategy>>;
                let (pa, pb) = (downcast::<_, P>(pa).ok().unwrap(), downcast::<_, P>(pb).ok().unwrap());
                let out = autodiff::matmul::<$inner, $strategy>(pa, pb);
                let out = downcast::<P, B::FloatTensorPrimitive>(out).ok().unwrap();
                return Ok(Tensor::from_primitive(TensorPrimitive::Float(out)));
            }
        )*};
    }
    autodiff_cuda_backends!(route);
    Err((a, b))
}

/// Whether [`try_matmul`] takes `B`'s products (for callers that work around burn's own).
pub fn routes<B: Backend>() -> bool {
    use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
    use burn::backend::{Autodiff, Cuda};
    use burn::tensor::{bf16, f16};
    use std::any::TypeId;
    macro_rules! any_of {
        ($($inner:ty, $strategy:ty);*) => { false $(|| TypeId::of::<B>() == TypeId::of::<Autodiff<$inner, $strategy>>())* };
    }
    enabled() && (TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<Primitive>() || autodiff_cuda_backends!(any_of))
}

/// Queues the product on the fused backend's stream as a custom operation.
fn register(a: Primitive, b: Primitive) -> Primitive {
    let (m, n) = (a.shape[0], b.shape[1]);
    let client = a.client.clone();
    let streams = OperationStreams::with_inputs([&a, &b]);
    let out = TensorIr::uninit(client.create_empty_handle(), Shape::new([m, n]), a.dtype);
    let desc = CustomOpIr::new("cublaslt_matmul", &[a.into_ir(), b.into_ir()], &[out]);
    client.register(streams, OperationIr::Custom(desc.clone()), LtMatmul { desc }).output()
}

#[derive(Debug)]
struct LtMatmul {
    desc: CustomOpIr,
}

impl Operation<Runtime> for LtMatmul {
    fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
        let ([a, b], [out]) = self.desc.as_fixed();
        let a = handles.get_float_tensor::<Inner>(a);
        let b = handles.get_float_tensor::<Inner>(b);
        let product = gemm(a, b).unwrap_or_else(|e| panic!("cuBLASLt matmul: {e}"));
        handles.register_float_tensor::<Inner>(&out.id, product);
    }
}

/// One operand as cuBLASLt sees it (column-major): the buffer of a row-major `[rows, cols]`
/// matrix with unit column stride is the column-major `[cols, rows]` matrix with leading
/// dimension `strides[0]`; with unit row stride it is the column-major `[rows, cols]` matrix,
/// to be used transposed.
struct Operand {
    tensor: CubeTensor<CudaRuntime>,
    transposed: bool,
    /// Rows and columns of the column-major matrix in memory, and its leading dimension.
    rows: u64,
    cols: u64,
    ld: i64,
}

fn operand(tensor: CubeTensor<CudaRuntime>) -> Operand {
    let (shape, strides) = (tensor.meta.shape().to_vec(), tensor.meta.strides().to_vec());
    let (r, c) = (shape[0], shape[1]);
    if strides[1] == 1 && strides[0] >= c.max(1) {
        Operand { ld: strides[0] as i64, tensor, transposed: false, rows: c as u64, cols: r as u64 }
    } else if strides[0] == 1 && strides[1] >= r.max(1) {
        Operand { ld: strides[1] as i64, tensor, transposed: true, rows: r as u64, cols: c as u64 }
    } else {
        operand(into_contiguous(tensor))
    }
}

/// What a cuBLASLt product needs per device: the primary context (cubecl's), a stream and a
/// handle, and the algorithm chosen for each problem (the heuristic query costs more than a
/// small product).
struct Device {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    handle: sys::cublasLtHandle_t,
    algorithms: HashMap<Problem, sys::cublasLtMatmulAlgo_t>,
}

// The handle and algorithms are plain data used under the mutex.
unsafe impl Send for Device {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Problem {
    dtype: sys::cudaDataType_t,
    transposed: (bool, bool),
    /// m, n, k of the column-major product D = op(X) · op(Y).
    mnk: (u64, u64, u64),
    lds: (i64, i64, i64),
    alignments: (u32, u32, u32),
}

fn devices() -> &'static Mutex<HashMap<usize, Device>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Device>>> = OnceLock::new();
    DEVICES.get_or_init(|| Mutex::new(HashMap::new()))
}

fn open(index: usize) -> Result<Device, String> {
    // SAFETY: only asks the loader whether the library can be opened.
    if !unsafe { sys::is_culib_present() } {
        return Err("libcublasLt.so could not be loaded (is the CUDA toolkit's lib64 on LD_LIBRARY_PATH?)".into());
    }
    let context = CudaContext::new(index).map_err(|e| format!("CUDA device {index}: {e}"))?;
    context.bind_to_thread().map_err(|e| format!("CUDA device {index}: {e}"))?;
    let stream = context.new_stream().map_err(|e| format!("a stream on CUDA device {index}: {e}"))?;
    let handle = lt::create_handle().map_err(|e| format!("cublasLtCreate: {e}"))?;
    Ok(Device { context, stream, handle, algorithms: HashMap::new() })
}

/// The largest power of two (up to 256) that divides a device address: what the algorithm
/// heuristic must assume about an operand's alignment.
fn alignment(ptr: u64) -> u32 {
    (1u64 << ptr.trailing_zeros().min(8)) as u32
}

fn gemm(a: CubeTensor<CudaRuntime>, b: CubeTensor<CudaRuntime>) -> Result<CubeTensor<CudaRuntime>, String> {
    let dtype = a.dtype;
    let (m, k, n) = (a.meta.shape()[0], a.meta.shape()[1], b.meta.shape()[1]);
    let (data_type, elem) = match dtype {
        DType::BF16 => (sys::cudaDataType_t::CUDA_R_16BF, 2),
        DType::F16 => (sys::cudaDataType_t::CUDA_R_16F, 2),
        DType::F32 => (sys::cudaDataType_t::CUDA_R_32F, 4),
        other => return Err(format!("{other:?} operands (expected f32, bf16 or f16)")),
    };
    if b.dtype != dtype || b.meta.shape()[0] != k {
        return Err(format!("operands [{m}, {k}] {dtype:?} and {:?} {:?} do not chain", b.meta.shape(), b.dtype));
    }
    let client = a.client.clone();
    let device = a.device.clone();
    if checking() {
        let layout = |t: &CubeTensor<CudaRuntime>| format!("{:?} strides {:?} offset {:?} stream {:?}", t.meta.shape(), t.meta.strides(), t.handle.offset_start, t.handle.stream);
        eprintln!("cuBLASLt operands: a {} b {}", layout(&a), layout(&b));
    }
    // Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ: cuBLASLt's first operand is our `b`.
    let (x, y) = (operand(b), operand(a));
    // Laid out as burn lays out its own outputs (rows may be padded for alignment), so that the
    // fused kernels reading it see the layouts they were written for.
    let out = client.empty_tensor(Shape::new([m, n]), elem);
    let ldd = out.strides[0] as i64;
    let (out, out_strides) = (out.memory, out.strides);
    let workspace = client.empty(WORKSPACE_BYTES);
    let resource = |t: &burn_cubecl::cubecl::server::Handle| client.get_resource(t.clone()).map_err(|e| format!("{e:?}"));
    let (rx, ry, rd, rw) = (resource(&x.tensor.handle)?, resource(&y.tensor.handle)?, resource(&out)?, resource(&workspace)?);
    // After the resources: fetching one made on another cubecl stream (another thread) queues a
    // wait for that stream on ours, which this drains too.
    block_on(client.sync()).map_err(|e| format!("waiting for cubecl's queue: {e:?}"))?;
    let (px, py, pd, pw) = (rx.resource().ptr, ry.resource().ptr, rd.resource().ptr, rw.resource().ptr);

    let mut devices = devices().lock().unwrap_or_else(|p| p.into_inner());
    let dev = match devices.entry(device.index) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => e.insert(open(device.index)?),
    };
    dev.context.bind_to_thread().map_err(|e| format!("CUDA device {}: {e}", device.index))?;
    let problem = Problem {
        dtype: data_type,
        transposed: (x.transposed, y.transposed),
        mnk: (n as u64, m as u64, k as u64),
        lds: (x.ld, y.ld, ldd),
        alignments: (alignment(px), alignment(py), alignment(pd)),
    };
    // SAFETY: descriptors are created and destroyed here; pointers come from live cubecl
    // allocations (held by the resources until the stream has finished), sized by their shapes.
    unsafe {
        let compute = sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let desc = lt::create_matmul_desc(compute, sys::cudaDataType_t::CUDA_R_32F).map_err(|e| format!("cublasLtMatmulDescCreate: {e}"))?;
        let set_op = |attr, t: bool| {
            let op: i32 = t as i32; // CUBLAS_OP_N = 0, CUBLAS_OP_T = 1
            lt::set_matmul_desc_attribute(desc, attr, (&op as *const i32).cast(), 4)
        };
        let layouts = (|| {
            set_op(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, x.transposed)?;
            set_op(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, y.transposed)?;
            let lx = lt::create_matrix_layout(data_type, x.rows, x.cols, x.ld)?;
            let ly = lt::create_matrix_layout(data_type, y.rows, y.cols, y.ld)?;
            let ld = lt::create_matrix_layout(data_type, n as u64, m as u64, ldd)?;
            Ok::<_, lt::CublasError>((lx, ly, ld))
        })();
        let (lx, ly, ld) = match layouts {
            Ok(l) => l,
            Err(e) => {
                let _ = lt::destroy_matmul_desc(desc);
                return Err(format!("cuBLASLt layouts for {problem:?}: {e}"));
            }
        };
        let algorithm = match dev.algorithms.get(&problem) {
            Some(a) => Ok(*a),
            None => pick_algorithm(dev.handle, desc, (lx, ly, ld), problem.alignments).map(|a| *dev.algorithms.entry(problem).or_insert(a)),
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        let run = algorithm.and_then(|algo| {
            lt::matmul(
                dev.handle,
                desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                px as *const _,
                lx,
                py as *const _,
                ly,
                pd as *const _,
                ld,
                pd as *mut _,
                ld,
                &algo,
                pw as *mut _,
                WORKSPACE_BYTES,
                dev.stream.cu_stream() as sys::cudaStream_t,
            )
        });
        let _ = lt::destroy_matrix_layout(lx);
        let _ = lt::destroy_matrix_layout(ly);
        let _ = lt::destroy_matrix_layout(ld);
        let _ = lt::destroy_matmul_desc(desc);
        run.map_err(|e| format!("cublasLtMatmul for {problem:?}: {e}"))?;
    }
    dev.stream.synchronize().map_err(|e| format!("cuBLASLt's stream: {e}"))?;
    drop((rx, ry, rd, rw));
    Ok(CubeTensor::new(client, out, burn_std::Metadata::new(Shape::new([m, n]), out_strides), device, dtype))
}

/// The heuristic's first choice for this problem, with the workspace we give and the operands'
/// real alignments (it assumes 256 bytes otherwise).
unsafe fn pick_algorithm(
    handle: sys::cublasLtHandle_t,
    desc: sys::cublasLtMatmulDesc_t,
    (lx, ly, ld): (sys::cublasLtMatrixLayout_t, sys::cublasLtMatrixLayout_t, sys::cublasLtMatrixLayout_t),
    (ax, ay, ad): (u32, u32, u32),
) -> Result<sys::cublasLtMatmulAlgo_t, lt::CublasError> {
    use sys::cublasLtMatmulPreferenceAttributes_t as P;
    let pref = lt::create_matmul_pref()?;
    let result = (|| {
        let workspace = WORKSPACE_BYTES as u64;
        lt::set_matmul_pref_attribute(pref, P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, (&workspace as *const u64).cast(), 8)?;
        for (attr, value) in [
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, ax),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, ay),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, ad),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, ad),
        ] {
            lt::set_matmul_pref_attribute(pref, attr, (&value as *const u32).cast(), 4)?;
        }
        lt::get_matmul_algo_heuristic(handle, desc, lx, ly, ld, ld, pref).map(|h| h.algo)
    })();
    let _ = lt::destroy_matmul_pref(pref);
    result
}

/// Training: the product's backward is two more products (`dC · Bᵀ`, `Aᵀ · dC`), both routed to
/// cuBLASLt, the transposes being views it reads as they lie.
mod autodiff {
    use super::{register, Primitive};
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{binary, Backward, Ops, OpsKind};
    use burn::backend::autodiff::NodeId;
    use burn::backend::Autodiff;
    use burn::tensor::ops::FloatTensor;
    use burn::prelude::Backend;

    #[derive(Debug)]
    struct LtMatmulBackward;

    impl<B: Backend<FloatTensorPrimitive = Primitive>> Backward<B, 2> for LtMatmulBackward {
        /// Each operand is kept only when the other one needs a gradient.
        type State = (Option<NodeId>, Option<NodeId>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
            let (lhs, rhs) = ops.state;
            let lhs: Option<Primitive> = lhs.map(|id| checkpointer.retrieve_node_output(id));
            let rhs: Option<Primitive> = rhs.map(|id| checkpointer.retrieve_node_output(id));
            binary::<B, _, _>(
                ops.parents,
                ops.node,
                grads,
                |grad| register(grad, B::float_transpose(rhs.expect("the right operand, kept for the left's gradient"))),
                |grad| register(B::float_transpose(lhs.expect("the left operand, kept for the right's gradient")), grad),
            );
        }
    }

    /// `lhs · rhs` on `Autodiff<B, C>` with cuBLASLt's product and backward.
    pub(super) fn matmul<B, C>(lhs: FloatTensor<Autodiff<B, C>>, rhs: FloatTensor<Autodiff<B, C>>) -> FloatTensor<Autodiff<B, C>>
    where
        B: Backend<FloatTensorPrimitive = Primitive>,
        C: CheckpointStrategy,
    {
        let (lhs_tracked, rhs_tracked) = (lhs.is_tracked(), rhs.is_tracked());
        match LtMatmulBackward.prepare::<C>([lhs.node.clone(), rhs.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let lhs_state = rhs_tracked.then(|| prep.checkpoint(&lhs));
                let rhs_state = lhs_tracked.then(|| prep.checkpoint(&rhs));
                prep.finish((lhs_state, rhs_state), register(lhs.primitive, rhs.primitive))
            }
            OpsKind::UnTracked(prep) => prep.finish(register(lhs.primitive, rhs.primitive)),
        }
    }
}

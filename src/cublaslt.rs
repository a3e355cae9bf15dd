//! Matrix products on CUDA through cuBLASLt, loaded at run time, as a custom operation of burn's
//! fused CUDA backend (`burn::backend::Cuda`). burn 0.21's own bf16 GEMM runs at about a quarter
//! of cuBLAS's speed on an H200; this is the faster path [`crate::model::nn::matmul`] takes on
//! burn's CUDA backend, for inference and for training alike, unless `LLAVA_JP_GEMM=burn` is
//! set or libcublasLt cannot be loaded ([`enabled`]). Every other backend keeps burn's path.
//!
//! The product is queued from cubecl's device thread, in order with cubecl's own launches. By
//! default it goes on cubecl's own CUDA stream, so that stream order is all the ordering
//! needed. cubecl 0.10 does not hand that stream out; CUPTI shows it, once per cubecl stream,
//! as the stream of a no-op kernel launched through cubecl ([`crate::cupti`]).
//!
//! Where CUPTI cannot tell (no libcupti, or a profiler holding its subscription), and under
//! `LLAVA_JP_GEMM=cublaslt-flags`, the product runs on a stream of its own, ordered against
//! cubecl's on the device, the host never waiting. That costs ~20 µs of hand-off a product and a
//! spinning block on one SM while the product runs (a full-size stage-2 step lost ~17 ms to
//! them, `model-import/results/kernel-timeline-2026-12-06/`). The ordering: a one-thread kernel
//! queued on cubecl's stream sets a flag in device memory once everything before it (the
//! operands) is written; a one-thread kernel on cuBLASLt's stream spins until it sees that flag,
//! then the product runs, then another one-thread kernel sets a second flag; a one-thread kernel
//! queued on cubecl's stream right after the first spins until it sees the second, so nothing
//! cubecl runs later (a reader of the product, a reuse of the operands' or workspace's memory)
//! starts before the product is written. Each product has its own pair of flags (a ring of
//! [`FLAG_SLOTS`]), so products queued from several cubecl streams cannot release each other.
//! The waits are kernels, not `cuStreamWaitValue` (which returned `CUDA_ERROR_INVALID_VALUE` on
//! the H200 with cubecl's memory). cubecl launches from a device thread of its own; the whole
//! product is queued from that thread (a closure handed to it, the caller not waiting), so
//! the flag kernel is launched before cuBLASLt's stream is told to wait for it: every wait is
//! launched after the kernel that releases it, so nothing that waits for the whole device (lazy
//! kernel loading, say) can deadlock, and the host never waits for the device. A wait that
//! still lasts a minute traps; that leaves the CUDA context broken, and the error surfaces from
//! a later call that need not name these kernels (`LLAVA_JP_GEMM_TRACE=1` prints each
//! product's steps). A product that fails on cubecl's thread stops the process: its output,
//! already handed to burn, was never written.
//!
//! What the ordering covers: the stream the product was queued on. An operand whose memory
//! belongs to another cubecl stream is as safe as cubecl makes its own reads across streams.
//! Several cubecl streams on one GPU share the ring; a slot is reused after [`FLAG_SLOTS`]
//! products, so one stream running 1024 products ahead of another could see the other's flag
//! (this project drives each GPU from one thread).
//! `LLAVA_JP_GEMM=cublaslt-sync` orders by host waits instead (cubecl's queue drained before the
//! product, cuBLASLt's stream after): two round trips per product, which left the GPU idle 40%
//! of a full-size stage-2 step.
//!
//! Training goes through it too: on the autodiff CUDA backends the product is an autodiff
//! operation whose backward is two more cuBLASLt products ([`autodiff`]).
//!
//! Status (H200, 2026-12-02): bf16 products at the LLM's shapes run 1.5-3.2x faster than burn's
//! (`benches/gemm.rs`), f32 products are exact f32 (burn's use TF32). With the route on, the
//! backend fuzzer's matmul, projector, GPT-2, KV-cached decode, LLaVA and training-gradient
//! properties pass on the f32, bf16 and autocast CUDA legs (ordered on the device: bf16 and
//! autocast legs run so far), except one LLaVA case on f32 (GPT-2 width 2 with one-wide heads),
//! whose logits missed by 1.9e-2 whether burn's attention got its operands as they are or
//! row-major; the KV-cached decode failure that was also blamed on this route was burn's attention reading
//! one-head views wrongly (mended in `nn::attention`). That LLaVA case passes on 2026-12-05
//! (H100, replayed from `model-import/scripts/fuzz_regressions.txt`), so the route became the
//! default. Queued from cubecl's device thread, a
//! full-size stage-2 training step (flash attention on) takes 0.40 s against PyTorch's 0.19 s in
//! the same call (0.77 s with host waits), and greedy decode at batch 1 runs at 51.9 tokens/s
//! against transformers' 69.1 (burn's products: 46.2 in another call;
//! `model-import/results/bf16-attention-layout-2026-12-02/`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::backend::autodiff_cuda_backends;
use crate::cuda_kernel::{cast, from_primitive, fused_cuda, on_autodiff_cuda, to_primitive, Fused, Setting};
use burn::backend::ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};
use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::cubecl::device::{DeviceId, DeviceService, ServerUtilitiesHandle};
use burn_cubecl::cubecl::device_handle::DeviceHandle;
use burn_cubecl::cubecl::future::block_on;
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{FusionRuntime, FusionTensor};
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream};

/// The inner (unfused) backend whose handles the fused CUDA backend keeps; its float type does
/// not matter here, a tensor's dtype travels with it.
type Inner = CubeBackend<CudaRuntime, f32, i32, u8>;
type Runtime = FusionCubeRuntime<CudaRuntime>;
/// The float primitive of `Cuda<f32>` and `Cuda<bf16>` alike.
type Primitive = FusionTensor<Runtime>;

/// cuBLASLt's scratch space; 32 MiB is what cuBLAS itself uses on Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

/// Which path a matrix product on burn's CUDA backend takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmRoute {
    /// burn's own product (cubecl's GEMM).
    Burn,
    /// cuBLASLt on cubecl's own stream where CUPTI shows which it is ([`crate::cupti`]),
    /// else as [`GemmRoute::CublasLtFlags`].
    CublasLt,
    /// cuBLASLt between two host waits (cubecl's queue drained before, cuBLASLt's stream
    /// after): the simple ordering, kept to compare against.
    CublasLtHostOrdered,
    /// cuBLASLt on a stream of its own, ordered against cubecl's on the device by flag kernels.
    CublasLtFlags,
}

impl GemmRoute {
    /// The routes, in `NAMES`' order (the default is `default_route`'s pick).
    const ALL: [GemmRoute; 4] = [GemmRoute::Burn, GemmRoute::CublasLt, GemmRoute::CublasLtHostOrdered, GemmRoute::CublasLtFlags];
    /// `LLAVA_JP_GEMM`'s spellings, in `ALL`'s order.
    const NAMES: [&'static str; 4] = ["burn", "cublaslt", "cublaslt-sync", "cublaslt-flags"];

    fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).expect("a listed route")
    }

    /// `LLAVA_JP_GEMM`'s spelling.
    pub fn name(self) -> &'static str {
        Self::NAMES[self.index()]
    }
}

static ROUTE: Setting = Setting::new("LLAVA_JP_GEMM", &GemmRoute::NAMES).defaulting_to(default_route);

/// cuBLASLt where the library loads; burn's GEMM, said once on stderr, where it does not (a
/// CUDA driver without the toolkit's libraries), rather than a panic at the first product.
fn default_route() -> usize {
    // SAFETY: only asks the loader whether the library can be opened.
    if unsafe { sys::is_culib_present() } {
        return GemmRoute::CublasLt.index();
    }
    eprintln!(
        "note: libcublasLt.so could not be loaded, so CUDA matrix products take burn's GEMM (about a quarter of \
         cuBLASLt's speed); put the CUDA toolkit's lib64 on LD_LIBRARY_PATH, or set LLAVA_JP_GEMM=burn to say so"
    );
    GemmRoute::Burn.index()
}

/// Whether matrix products on burn's CUDA backend go through cuBLASLt: `LLAVA_JP_GEMM` =
/// `cublaslt` (the default where libcublasLt loads), `cublaslt-sync` or `burn`, unless
/// [`set_route`] said otherwise. Asked only once a CUDA backend's product is at hand, so that
/// other backends never look for the library.
pub fn enabled() -> bool {
    route_now() != GemmRoute::Burn
}

/// The route products take now.
pub fn route_now() -> GemmRoute {
    GemmRoute::ALL[ROUTE.index()]
}

/// Sets the route for the whole process (benchmarks compare them), over `LLAVA_JP_GEMM`.
pub fn set_route(route: GemmRoute) {
    ROUTE.set(route.index());
}

/// How many of the cubecl streams that queued products on CUDA device `index` so far had them
/// run on cubecl's own CUDA stream, and how many on a stream of their own ordered by flags
/// (where CUPTI could not tell which stream cubecl's was).
pub fn cubecl_streams_found(index: usize) -> (usize, usize) {
    let Some(dev) = devices().lock().unwrap_or_else(|p| p.into_inner()).get(&index).cloned() else { return (0, 0) };
    let guard = dev.lock().unwrap_or_else(|p| p.into_inner());
    let found = guard.cubecl_streams.values().filter(|s| s.is_some()).count();
    (found, guard.cubecl_streams.len() - found)
}

pub(crate) use crate::backend::downcast;

/// `a · b` (`[m, k] x [k, n]`) through cuBLASLt when `B` is burn's fused CUDA backend (with or
/// without autodiff) and the route is enabled; the operands come back untouched otherwise.
#[allow(clippy::type_complexity)]
pub fn try_matmul<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
    if checking() { checked(a, b) } else { route(a, b) }
}

/// The operands [`try_autocast_affine`] hands back when it does not take them.
pub type AffineOperands<B, const D: usize> = (Tensor<B, D>, Tensor<B, 2>, Option<Tensor<B, 1>>);

/// `x · w + bias` under autocast to `compute` (bf16 or f16) as one recorded operation, where
/// [`try_matmul`] would take the product: `x` (`[..., k]`, f32 or already in `compute`), the
/// f32 `w` (`[k, n]`, perhaps a transposed view) and the f32 bias are cast to `compute`,
/// cuBLASLt sums the product in f32, adds the bias, and writes the output in `compute`, as
/// PyTorch's autocast does. Under autodiff the backward is two more products of the output
/// gradient (`dx = dy · wᵀ` in `x`'s dtype, `dw = xᵀ · dy` in f32) and the bias's gradient `dy`
/// summed over rows (in f32); the state keeps the cast operands, only those a gradient needs.
/// Written with burn's operations the same layer is ~8 recorded operations forward (reshape,
/// three casts, the product, the bias's broadcast and add, reshape) and as many backward, and
/// recording them is what bounds a training step (`model-import/results/fused-optim-2026-12-03/`).
/// The operands come back untouched when the route or the fused operations
/// (`LLAVA_JP_FUSED_OPS=0`) are off, `B` is not burn's CUDA backend (with or without autodiff),
/// or they are not of those dtypes and matching widths.
pub fn try_autocast_affine<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    compute: DType,
) -> Result<Tensor<B, D>, AffineOperands<B, D>> {
    let dims = x.dims();
    let [k, n] = w.dims();
    // f32 master weights, or frozen ones already cast (`crate::train::frozen`).
    let of_compute = |dtype: DType| dtype == DType::F32 || dtype == compute;
    let covered = routes::<B>()
        && crate::fused_ops::enabled()
        && !checking()
        && matches!(compute, DType::BF16 | DType::F16)
        && (x.dtype() == DType::F32 || x.dtype() == compute)
        && of_compute(w.dtype())
        && bias.as_ref().is_none_or(|b| of_compute(b.dtype()) && b.dims() == [n])
        && dims[D - 1] == k
        && x.shape().num_elements() > 0
        && n > 0;
    if !covered {
        return Err((x, w, bias));
    }
    let op = AutocastAffine { compute, x_dtype: x.dtype(), w_dtype: w.dtype(), bias_dtype: bias.as_ref().map_or(DType::F32, |b| b.dtype()), x_dims: dims.to_vec() };
    if fused_cuda::<B>() {
        return Ok(from_primitive(op.forward(to_primitive(x), to_primitive(w), bias.map(to_primitive), (false, false)).0));
    }
    let (x, w) = (x.into_primitive().tensor(), w.into_primitive().tensor());
    let out = match bias {
        Some(b) => on_autodiff_cuda::<B, 3, _>(op, [x, w, b.into_primitive().tensor()]).map_err(|_| ()),
        None => on_autodiff_cuda::<B, 2, _>(op, [x, w]).map_err(|_| ()),
    };
    let out = out.unwrap_or_else(|()| unreachable!("routes::<B>() names only the fused CUDA backend and its autodiff ones"));
    Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

/// [`try_autocast_affine`]'s operation: the compute dtype, the operands' dtypes (their
/// gradients') and the input's shape.
#[derive(Debug, Clone)]
struct AutocastAffine {
    compute: DType,
    x_dtype: DType,
    w_dtype: DType,
    bias_dtype: DType,
    x_dims: Vec<usize>,
}


impl AutocastAffine {
    /// The output, and the cast input (`[rows, k]`) and weight when `keep` says a gradient
    /// will need them: `keep.0` the input (for the weight's gradient), `keep.1` the weight
    /// (for the input's).
    fn forward(&self, x: Primitive, w: Primitive, bias: Option<Primitive>, keep: (bool, bool)) -> (Primitive, Option<Primitive>, Option<Primitive>) {
        use burn::tensor::ops::FloatTensorOps;
        let k = *self.x_dims.last().expect("a rank of at least one");
        let rows = self.x_dims.iter().product::<usize>() / k;
        let n = w.shape[1];
        let xc = cast(Fused::float_reshape(x, Shape::new([rows, k])), self.compute);
        // The trained weight and bias as the optimizer also wrote them, where it did.
        let wc = crate::fused_optim::cast_parameter(w, self.compute);
        let y = register_as(xc.clone(), wc.clone(), self.compute, bias.map(|b| crate::fused_optim::cast_parameter(b, self.compute)));
        let mut out_dims = self.x_dims.clone();
        *out_dims.last_mut().expect("a rank of at least one") = n;
        (Fused::float_reshape(y, Shape::from(out_dims)), keep.0.then_some(xc), keep.1.then_some(wc))
    }
}

#[allow(clippy::type_complexity)]
fn route<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
    if !matches!(a.dtype(), DType::F32 | DType::BF16 | DType::F16) || a.dtype() != b.dtype() || !routes::<B>() {
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
pub(crate) fn checking() -> bool {
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

/// The autodiff CUDA backends this crate trains on (`crate::backend::dispatch_autodiff`, and
/// the tests' bf16 one): each gets cuBLASLt's product and backward ([`autodiff::matmul`]).
fn try_autodiff_matmul<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
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
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::{Autodiff, Cuda};
    use burn::tensor::{bf16, f16};
    use std::any::TypeId;
    macro_rules! any_of {
        ($($inner:ty, $strategy:ty);*) => { false $(|| TypeId::of::<B>() == TypeId::of::<Autodiff<$inner, $strategy>>())* };
    }
    (TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<Primitive>() || autodiff_cuda_backends!(any_of)) && enabled()
}

/// Queues the product on the fused backend's stream as a custom operation.
fn register(a: Primitive, b: Primitive) -> Primitive {
    let dtype = a.dtype;
    register_as(a, b, dtype, None)
}

/// [`register`] with the output in `out` (the operands' dtype, or f32: bf16 / f16 operands
/// whose f32 sums are written unrounded), and `bias` (`[n]` in `out`) added to every row of
/// the f32 sums by cuBLASLt's epilogue instead of a pass of its own over the output.
pub(crate) fn register_as(a: Primitive, b: Primitive, out: DType, bias: Option<Primitive>) -> Primitive {
    let (m, n) = (a.shape[0], b.shape[1]);
    let client = a.client.clone();
    let mut inputs = vec![&a, &b];
    inputs.extend(bias.as_ref());
    let streams = OperationStreams::with_inputs(inputs);
    let out = TensorIr::uninit(client.create_empty_handle(), Shape::new([m, n]), out);
    let mut irs = vec![a.into_ir(), b.into_ir()];
    irs.extend(bias.map(|b| b.into_ir()));
    let desc = CustomOpIr::new("cublaslt_matmul", &irs, &[out]);
    client.register(streams, OperationIr::Custom(desc.clone()), LtMatmul { desc }).output()
}

#[derive(Debug)]
struct LtMatmul {
    desc: CustomOpIr,
}

impl Operation<Runtime> for LtMatmul {
    fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
        let (inputs, out) = (&self.desc.inputs, &self.desc.outputs[0]);
        let a = handles.get_float_tensor::<Inner>(&inputs[0]);
        let b = handles.get_float_tensor::<Inner>(&inputs[1]);
        let bias = inputs.get(2).map(|ir| into_contiguous(handles.get_float_tensor::<Inner>(ir)));
        let product = gemm(a, b, out.dtype, bias).unwrap_or_else(|e| panic!("cuBLASLt matmul: {e}"));
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
    /// The column-major matrix's leading dimension.
    ld: i64,
}

fn operand(tensor: CubeTensor<CudaRuntime>) -> Operand {
    let (shape, strides) = (tensor.meta.shape().to_vec(), tensor.meta.strides().to_vec());
    let (r, c) = (shape[0], shape[1]);
    if strides[1] == 1 && strides[0] >= c.max(1) {
        Operand { ld: strides[0] as i64, tensor, transposed: false }
    } else if strides[0] == 1 && strides[1] >= r.max(1) {
        Operand { ld: strides[1] as i64, tensor, transposed: true }
    } else {
        operand(into_contiguous(tensor))
    }
}

/// What a cuBLASLt product needs per device: the primary context (cubecl's), a stream, a handle,
/// a workspace, and a plan for each problem seen (descriptors and the algorithm: the heuristic
/// query costs more than a small product, and a decode step runs ~100 small products).
struct Device {
    context: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    handle: sys::cublasLtHandle_t,
    /// [`WORKSPACE_BYTES`] of device memory, used only on `stream`, whose products run one
    /// after another.
    workspace: u64,
    plans: HashMap<Problem, Plan>,
    /// The device-ordered mode's flags, made on its first product.
    flags: Option<Flags>,
    /// cubecl's CUDA stream for each cubecl stream id products came from (`None`: not found,
    /// those products take the flags), found on the first product from each.
    cubecl_streams: HashMap<u64, Option<CubeclStream>>,
    /// A workspace for each of cubecl's CUDA streams products run on (several stream ids share
    /// a stream, and its products run one after another).
    stream_workspaces: HashMap<usize, u64>,
    /// Work handed to cubecl's device thread for this GPU.
    queue: DeviceHandle<OnCubeclThread>,
}

/// A service on cubecl's device thread (the one that launches this GPU's kernels): closures
/// submitted to it run there, in order with cubecl's own work, without the submitter waiting.
struct OnCubeclThread;

impl DeviceService for OnCubeclThread {
    fn init(_: DeviceId) -> Self {
        OnCubeclThread
    }

    fn utilities(&self) -> ServerUtilitiesHandle {
        Arc::new(())
    }
}

// The handle, plans and workspace are plain data used under the mutex.
unsafe impl Send for Device {}

/// A problem's descriptors, made once and kept for the process.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: (sys::cublasLtMatrixLayout_t, sys::cublasLtMatrixLayout_t, sys::cublasLtMatrixLayout_t),
    algorithm: sys::cublasLtMatmulAlgo_t,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Problem {
    dtype: sys::cudaDataType_t,
    /// The output's type: `dtype`, or f32 for products whose f32 sums are read unrounded.
    out_dtype: sys::cudaDataType_t,
    transposed: (bool, bool),
    /// m, n, k of the column-major product D = op(X) · op(Y).
    mnk: (u64, u64, u64),
    lds: (i64, i64, i64),
    alignments: (u32, u32, u32),
    /// Whether a bias (in the output's type) is added to each output row (cuBLASLt's `BIAS`
    /// epilogue, its vector one per row of the column-major output: per column of ours).
    bias: bool,
}

impl Plan {
    /// Queues `D = X · Y` (beta 0) with this plan's descriptors and algorithm.
    ///
    /// # Safety
    /// `x`, `y` and `d` must be device memory the plan's layouts describe, the workspace
    /// `WORKSPACE_BYTES` long and used by nothing else meanwhile, `stream` in the same context.
    unsafe fn run(&self, handle: sys::cublasLtHandle_t, (x, y, d): (u64, u64, u64), bias: Option<u64>, workspace: u64, stream: sys::cudaStream_t) -> Result<(), lt::CublasError> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        if let Some(bias) = bias {
            // The pointer is the call's, the descriptor the plan's: set under the device's lock,
            // which serialises this plan's runs.
            lt::set_matmul_desc_attribute(self.desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER, (&bias as *const u64).cast(), 8)?;
        }
        lt::matmul(
            handle,
            self.desc,
            (&alpha as *const f32).cast(),
            (&beta as *const f32).cast(),
            x as *const _,
            self.layouts.0,
            y as *const _,
            self.layouts.1,
            d as *const _,
            self.layouts.2,
            d as *mut _,
            self.layouts.2,
            &self.algorithm,
            workspace as *mut _,
            WORKSPACE_BYTES,
            stream,
        )
    }

    /// Descriptors for `problem` and the heuristic's algorithm for them.
    fn new(handle: sys::cublasLtHandle_t, problem: &Problem) -> Result<Plan, String> {
        let Problem { dtype, out_dtype, transposed: (tx, ty), mnk: (m, n, k), lds: (ldx, ldy, ldd), alignments, bias } = *problem;
        // Row counts and column counts of the operands as they lie in memory.
        let (x_dims, y_dims) = (if tx { (k, m) } else { (m, k) }, if ty { (n, k) } else { (k, n) });
        // SAFETY: descriptors made here are destroyed here on failure, or kept in the plan.
        unsafe {
            let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)
                .map_err(|e| format!("cublasLtMatmulDescCreate: {e}"))?;
            let mut made = vec![];
            let result = (|| {
                for (attr, t) in [
                    (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, tx),
                    (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, ty),
                ] {
                    let op: i32 = t as i32; // CUBLAS_OP_N = 0, CUBLAS_OP_T = 1
                    lt::set_matmul_desc_attribute(desc, attr, (&op as *const i32).cast(), 4)?;
                }
                if bias {
                    let epilogue = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as u32;
                    lt::set_matmul_desc_attribute(desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, (&epilogue as *const u32).cast(), 4)?;
                    let bias_type = out_dtype as u32;
                    lt::set_matmul_desc_attribute(desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, (&bias_type as *const u32).cast(), 4)?;
                }
                for (t, rows, cols, ld) in [(dtype, x_dims.0, x_dims.1, ldx), (dtype, y_dims.0, y_dims.1, ldy), (out_dtype, m, n, ldd)] {
                    made.push(lt::create_matrix_layout(t, rows, cols, ld)?);
                }
                let layouts = (made[0], made[1], made[2]);
                let algorithm = pick_algorithm(handle, desc, layouts, alignments)?;
                Ok::<_, lt::CublasError>(Plan { desc, layouts, algorithm })
            })();
            result.map_err(|e| {
                for layout in made {
                    let _ = lt::destroy_matrix_layout(layout);
                }
                let _ = lt::destroy_matmul_desc(desc);
                format!("cuBLASLt plan for {problem:?}: {e}")
            })
        }
    }
}

/// One lock per GPU: each GPU's products come from its own thread (data-parallel replicas), and
/// one GPU's product may wait on the device while another's runs.
fn devices() -> &'static Mutex<HashMap<usize, Arc<Mutex<Device>>>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<Mutex<Device>>>>> = OnceLock::new();
    DEVICES.get_or_init(|| Mutex::new(HashMap::new()))
}

fn device(index: usize) -> Result<Arc<Mutex<Device>>, String> {
    if let Some(dev) = devices().lock().unwrap_or_else(|p| p.into_inner()).get(&index) {
        return Ok(dev.clone());
    }
    // Opened without the lock: registering the queue waits for cubecl's thread.
    let opened = Arc::new(Mutex::new(open(index)?));
    Ok(devices().lock().unwrap_or_else(|p| p.into_inner()).entry(index).or_insert(opened).clone())
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
    // SAFETY: a plain allocation in the bound context, kept for the process.
    let workspace = unsafe { cudarc::driver::result::malloc_sync(WORKSPACE_BYTES) }
        .map_err(|e| format!("cuBLASLt's {WORKSPACE_BYTES}-byte workspace on CUDA device {index}: {e}"))?;
    // cubecl's compute service runs at the same (default, downstream) stage, so this shares its
    // thread.
    let queue = DeviceHandle::<OnCubeclThread>::new(burn_cubecl::cubecl::device::Device::to_id(&burn_cubecl::cubecl::cuda::CudaDevice { index }));
    Ok(Device { context, stream, handle, workspace, plans: HashMap::new(), flags: None, cubecl_streams: HashMap::new(), stream_workspaces: HashMap::new(), queue })
}

/// The largest power of two (up to 256) that divides a device address: what the algorithm
/// heuristic must assume about an operand's alignment.
fn alignment(ptr: u64) -> u32 {
    (1u64 << ptr.trailing_zeros().min(8)) as u32
}

/// A CUDA stream of cubecl's (its `CUstream`) and a workspace for the products queued on it.
#[derive(Debug, Clone, Copy)]
struct CubeclStream {
    stream: usize,
    workspace: u64,
}

/// cubecl's CUDA stream for the products of the calling thread's cubecl stream: found once per
/// cubecl stream id by launching a no-op kernel through cubecl on its device thread, where the
/// launch is made at once, with CUPTI watching ([`crate::cupti::launch_stream`]). `None` (said
/// once on stderr) where CUPTI cannot tell: those products take the flags.
fn cubecl_stream(dev: &Mutex<Device>, client: &Client, index: usize) -> Result<Option<CubeclStream>, String> {
    use burn_cubecl::cubecl::stream_id::StreamId;
    // A task submitted to cubecl's device thread runs under its submitter's stream id, and the
    // product's closure is submitted from this thread: the key the product will launch under.
    let key = StreamId::current().value;
    let queue = {
        let guard = dev.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = guard.cubecl_streams.get(&key) {
            return Ok(*found);
        }
        guard.queue.clone()
    };
    let (marker_client, argument) = (client.clone(), client.empty(8));
    let seen = queue
        .submit_blocking(move |_: &mut OnCubeclThread| {
            crate::cupti::launch_stream(|| {
                use burn_cubecl::cubecl::prelude::CubeCount;
                use burn_cubecl::cubecl::server::{KernelArguments, MetadataBindingInfo};
                let mut args = KernelArguments::new();
                args.buffers = vec![argument.binding()];
                args.info = MetadataBindingInfo::new(vec![0, 0, 0], 3);
                marker_client.launch(Box::new(FlagKernel::StreamMarker), CubeCount::Static(1, 1, 1), args);
            })
        })
        .map_err(|e| format!("cubecl's device thread for CUDA device {index}: {e:?}"))?;
    let found = match seen {
        Ok(stream) => {
            let mut guard = dev.lock().unwrap_or_else(|p| p.into_inner());
            let workspace = match guard.stream_workspaces.get(&stream) {
                Some(workspace) => *workspace,
                None => {
                    guard.context.bind_to_thread().map_err(|e| format!("CUDA device {index}: {e}"))?;
                    // SAFETY: a plain allocation in the bound context, kept for the process.
                    let workspace = unsafe { cudarc::driver::result::malloc_sync(WORKSPACE_BYTES) }
                        .map_err(|e| format!("cuBLASLt's {WORKSPACE_BYTES}-byte workspace on CUDA device {index}: {e}"))?;
                    *guard.stream_workspaces.entry(stream).or_insert(workspace)
                }
            };
            Some(CubeclStream { stream, workspace })
        }
        Err(why) => {
            eprintln!("cuBLASLt products on CUDA device {index} run on a stream of their own, ordered by flag kernels: cubecl's stream is not known ({why})");
            None
        }
    };
    Ok(*dev.lock().unwrap_or_else(|p| p.into_inner()).cubecl_streams.entry(key).or_insert(found))
}

fn gemm(a: CubeTensor<CudaRuntime>, b: CubeTensor<CudaRuntime>, out_dtype: DType, bias: Option<CubeTensor<CudaRuntime>>) -> Result<CubeTensor<CudaRuntime>, String> {
    let dtype = a.dtype;
    let (m, k, n) = (a.meta.shape()[0], a.meta.shape()[1], b.meta.shape()[1]);
    let cuda_type = |dtype: DType| match dtype {
        DType::BF16 => Ok(sys::cudaDataType_t::CUDA_R_16BF),
        DType::F16 => Ok(sys::cudaDataType_t::CUDA_R_16F),
        DType::F32 => Ok(sys::cudaDataType_t::CUDA_R_32F),
        other => Err(format!("{other:?} operands (expected f32, bf16 or f16)")),
    };
    let data_type = cuda_type(dtype)?;
    if out_dtype != dtype && out_dtype != DType::F32 {
        return Err(format!("a {out_dtype:?} product of {dtype:?} operands (expected their dtype or f32)"));
    }
    let (out_type, elem) = (cuda_type(out_dtype)?, out_dtype.size());
    if let Some(bias) = &bias {
        if bias.dtype != out_dtype || bias.meta.shape().to_vec() != [n] {
            return Err(format!("a bias {:?} {:?} for a [{m}, {n}] {out_dtype:?} product (expected [{n}] in the output's dtype)", bias.meta.shape(), bias.dtype));
        }
    }
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
    let dev = self::device(device.index)?;
    let route = route_now();
    let on_cubecl = match route {
        GemmRoute::CublasLt => cubecl_stream(&dev, &client, device.index)?,
        _ => None,
    };
    let flagged = matches!(route, GemmRoute::CublasLt | GemmRoute::CublasLtFlags) && on_cubecl.is_none();
    let (queue, context, stream, needs_flags) = {
        let guard = dev.lock().unwrap_or_else(|p| p.into_inner());
        (guard.queue.clone(), guard.context.clone(), guard.stream.clone(), flagged && guard.flags.is_none())
    };
    if needs_flags {
        // Made (and self-tested, with host waits) before the first product is queued, without
        // the lock: cubecl's thread may want it for a product queued earlier.
        context.bind_to_thread().map_err(|e| format!("CUDA device {}: {e}", device.index))?;
        let flags = Flags::new(&client, &context, &stream)?;
        dev.lock().unwrap_or_else(|p| p.into_inner()).flags.get_or_insert(flags);
    }
    // Laid out as burn lays out its own outputs (rows may be padded for alignment), so that the
    // fused kernels reading it see the layouts they were written for. Made here (cubecl hands
    // out the handle at once), written on cubecl's device thread below.
    let out = client.empty_tensor(Shape::new([m, n]), elem);
    let strides = out.strides.clone();
    let ldd = strides[0] as i64;
    // The product is queued from cubecl's device thread, after everything queued before it,
    // and this thread does not wait: there each cubecl call runs at once (a call made from here
    // would be a round trip of its own, and cubecl's flush waits for the device to reach the
    // previous flush). A failure there stops the process: the output is already burn's, and
    // would be read unwritten (cubecl's thread only logs a panic, so one is caught here too).
    let (task_client, task_dev, memory) = (client.clone(), dev.clone(), out.memory.clone());
    let index = device.index;
    queue.submit(move |_: &mut OnCubeclThread| {
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| enqueue(&task_client, &task_dev, (route, on_cubecl), (x, y, bias.as_ref()), memory, ldd, (m, n, k), (data_type, out_type))));
        let why = match run {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(panic) => panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default(),
        };
        eprintln!("cuBLASLt product [{m}, {k}] x [{k}, {n}] on CUDA device {index} failed on cubecl's device thread: {why}; its output was never written, so the process stops");
        std::process::abort();
    });
    Ok(CubeTensor::new(client, out.memory, burn_std::Metadata::new(Shape::new([m, n]), strides), device, out_dtype))
}

/// Queues the product `[m, k] x [k, n]` (cuBLASLt's operands `x`, `y`: see [`gemm`]) on
/// cubecl's device thread.
#[allow(clippy::too_many_arguments)]
fn enqueue(
    client: &Client,
    dev: &Mutex<Device>,
    (route, on_cubecl): (GemmRoute, Option<CubeclStream>),
    (x, y, bias): (Operand, Operand, Option<&CubeTensor<CudaRuntime>>),
    out: burn_cubecl::cubecl::server::Handle,
    ldd: i64,
    (m, n, k): (usize, usize, usize),
    (data_type, out_type): (sys::cudaDataType_t, sys::cudaDataType_t),
) -> Result<(), String> {
    let resource = |t: &burn_cubecl::cubecl::server::Handle| client.get_resource(t.clone()).map_err(|e| format!("{e:?}"));
    let (rx, ry, rd) = (resource(&x.tensor.handle)?, resource(&y.tensor.handle)?, resource(&out)?);
    let rb = bias.map(|b| resource(&b.handle)).transpose()?;
    if route == GemmRoute::CublasLtHostOrdered {
        // After the resources: fetching one made on another cubecl stream (another thread)
        // queues a wait for that stream on ours, which this drains too.
        block_on(client.sync()).map_err(|e| format!("waiting for cubecl's queue: {e:?}"))?;
    }
    let (px, py, pd) = (rx.resource().ptr, ry.resource().ptr, rd.resource().ptr);
    let pb = rb.as_ref().map(|r| r.resource().ptr);
    let mut guard = dev.lock().unwrap_or_else(|p| p.into_inner());
    let dev = &mut *guard;
    dev.context.bind_to_thread().map_err(|e| format!("CUDA device: {e}"))?;
    // Ordered on the device: cuBLASLt's stream waits for the flag a kernel launched now on
    // cubecl's stream will set (launched, not just queued: this runs on cubecl's thread).
    let flagged = on_cubecl.is_none() && matches!(route, GemmRoute::CublasLt | GemmRoute::CublasLtFlags);
    let order = match flagged {
        false => None,
        true => {
            let flags = dev.flags.as_mut().expect("made before the hand-off");
            let seq = flags.next(client);
            trace(seq, "ready launched on cubecl's stream");
            flags.ring.on_lt_stream(&dev.stream, &flags.wait_ready, seq, FLAG_TIMEOUT_NS)?;
            trace(seq, "wait queued on cuBLASLt's stream");
            Some(seq)
        }
    };
    let problem = Problem {
        dtype: data_type,
        out_dtype: out_type,
        transposed: (x.transposed, y.transposed),
        mnk: (n as u64, m as u64, k as u64),
        lds: (x.ld, y.ld, ldd),
        alignments: (alignment(px), alignment(py), alignment(pd)),
        bias: pb.is_some(),
    };
    let plan = match dev.plans.entry(problem) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => e.insert(Plan::new(dev.handle, &problem)?),
    };
    // SAFETY: the plan's descriptors describe these operands (the problem is their key);
    // pointers come from live cubecl allocations, sized by their shapes, that cubecl hands on
    // only after the product is written (on cubecl's stream: stream order; host-ordered: the
    // resources are held until cuBLASLt's stream has finished; flag-ordered: cubecl's stream
    // waits for the product's flag before anything it queues later); each workspace is used on
    // one stream alone.
    let (workspace, on_stream) = match on_cubecl {
        Some(found) => (found.workspace, found.stream as sys::cudaStream_t),
        None => (dev.workspace, dev.stream.cu_stream() as sys::cudaStream_t),
    };
    let run = unsafe { plan.run(dev.handle, (px, py, pd), pb, workspace, on_stream) };
    if let Err(e) = run {
        // A failed launch leaves the wait kernel spinning for nothing it can miss (its ready
        // flag is launched), so cubecl's stream need not be told anything.
        return Err(format!("cublasLtMatmul for {problem:?}: {e}"));
    }
    match order {
        // On cubecl's stream, in order with its kernels as they are launched from this thread.
        None if on_cubecl.is_some() => {}
        Some(seq) => {
            trace(seq, "product queued");
            let flags = dev.flags.as_ref().expect("made above");
            if let Err(e) = flags.ring.on_lt_stream(&dev.stream, &flags.set_done, seq, FLAG_TIMEOUT_NS) {
                // The product may still run: keep its memory until it has.
                let _ = dev.stream.synchronize();
                return Err(e);
            }
            flags.ring.on_cubecl_stream(client, FlagKernel::ProductDone, seq, FLAG_TIMEOUT_NS);
            trace(seq, "done launched on both streams");
        }
        None => dev.stream.synchronize().map_err(|e| format!("cuBLASLt's stream: {e}"))?,
    }
    // Ordered on the device, cubecl may hand this memory on as soon as it is released: whatever
    // it queues next on this stream runs after the product (stream order on cubecl's stream,
    // `cublaslt_product_done` on the flag route).
    drop((rx, ry, rd, rb));
    Ok(())
}

/// `LLAVA_JP_GEMM_TRACE=1`: each step of the device-ordered product on stderr (where a hang is).
fn trace(seq: u64, what: &str) {
    static TRACE: OnceLock<bool> = OnceLock::new();
    if *TRACE.get_or_init(|| std::env::var_os("LLAVA_JP_GEMM_TRACE").is_some()) {
        eprintln!("cuBLASLt product {seq}: {what}");
    }
}

/// Flags in flight at once, per device, in the device-ordered mode (each product takes the next
/// slot; a slot comes round again only after this many products).
const FLAG_SLOTS: u64 = 1024;
/// How long a flag kernel waits before it traps (a CUDA error instead of a silent hang): a wait
/// only ever covers GPU work already launched between two products.
const FLAG_TIMEOUT_NS: u64 = 60_000_000_000;

type Client = burn_cubecl::cubecl::client::ComputeClient<CudaRuntime>;

/// Two rings of 64-bit flags in device memory (cubecl's, zeroed): `ready[FLAG_SLOTS]` then
/// `done[FLAG_SLOTS]`; a product with sequence number `seq` uses slot `seq % FLAG_SLOTS` and sets
/// both to `seq`, so the values of a slot only grow.
struct Ring {
    memory: burn_cubecl::cubecl::server::Handle,
    /// The device address of `ready[0]`.
    ptr: u64,
}

impl Ring {
    fn new(client: &Client) -> Result<Self, String> {
        let memory = client.create_from_slice(&vec![0u8; 2 * FLAG_SLOTS as usize * 8]);
        let ptr = client.get_resource(memory.clone()).map_err(|e| format!("the cuBLASLt flags: {e:?}"))?.resource().ptr;
        // The zeros are written before cuBLASLt's stream first reads a flag.
        block_on(client.sync()).map_err(|e| format!("waiting for cubecl's queue: {e:?}"))?;
        Ok(Ring { memory, ptr })
    }

    fn on_cubecl_stream(&self, client: &Client, kernel: FlagKernel, seq: u64, timeout_ns: u64) {
        use burn_cubecl::cubecl::prelude::CubeCount;
        use burn_cubecl::cubecl::server::{KernelArguments, MetadataBindingInfo};
        let mut args = KernelArguments::new();
        args.buffers = vec![self.memory.clone().binding()];
        args.info = MetadataBindingInfo::new(vec![seq % FLAG_SLOTS, seq, timeout_ns], 3);
        client.launch(Box::new(kernel), CubeCount::Static(1, 1, 1), args);
    }

    fn on_lt_stream(&self, stream: &Arc<CudaStream>, kernel: &CudaFunction, seq: u64, timeout_ns: u64) -> Result<(), String> {
        use cudarc::driver::{LaunchConfig, PushKernelArg};
        let (ptr, slot) = (self.ptr, seq % FLAG_SLOTS);
        let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the kernels take (u64*, u64, u64, u64) and touch only slot `slot` of the rings,
        // which live as long as `self`.
        unsafe { stream.launch_builder(kernel).arg(&ptr).arg(&slot).arg(&seq).arg(&timeout_ns).launch(one) }
            .map(|_| ())
            .map_err(|e| format!("cuBLASLt's flag kernel: {e}"))
    }

    /// The two flags of `seq`, read back (a sync on cubecl's stream).
    fn read(&self, client: &Client, seq: u64) -> Result<(u64, u64), String> {
        let bytes = client.read_one(self.memory.clone()).map_err(|e| format!("reading the flags: {e:?}"))?;
        let word = |i: u64| u64::from_le_bytes(bytes[i as usize * 8..i as usize * 8 + 8].try_into().expect("8 bytes"));
        Ok((word(seq % FLAG_SLOTS), word(FLAG_SLOTS + seq % FLAG_SLOTS)))
    }
}

/// The device-ordered mode's ring and the two kernels of [`LT_STREAM_SOURCE`] loaded for
/// cuBLASLt's stream.
struct Flags {
    ring: Ring,
    last: u64,
    wait_ready: CudaFunction,
    set_done: CudaFunction,
}

impl Flags {
    fn new(client: &Client, context: &Arc<CudaContext>, stream: &Arc<CudaStream>) -> Result<Self, String> {
        let source = format!("#define FLAG_SLOTS {FLAG_SLOTS}\n{LT_STREAM_SOURCE}");
        let ptx = cudarc::nvrtc::compile_ptx(source).map_err(|e| format!("NVRTC on cuBLASLt's flag kernels: {e:?}"))?;
        let module = context.load_module(ptx).map_err(|e| format!("loading cuBLASLt's flag kernels: {e}"))?;
        let function = |name: &str| module.load_function(name).map_err(|e| format!("kernel {name}: {e}"));
        let flags = Flags { ring: Ring::new(client)?, last: 0, wait_ready: function("cublaslt_wait_ready")?, set_done: function("cublaslt_set_done")? };
        flags.self_test(client, stream)?;
        Ok(flags)
    }

    /// One round trip on a ring of its own, each leg waited for on the host with a bound, so
    /// that a kernel that does not compile, launch or see its arguments is an error naming the
    /// leg, not a hang in the middle of training. Each flag is set before its wait is launched
    /// (the order every product keeps), so this checks the kernels, not a wait across streams.
    fn self_test(&self, client: &Client, stream: &Arc<CudaStream>) -> Result<(), String> {
        let ring = Ring::new(client)?;
        const SHORT: u64 = 2_000_000_000;
        ring.on_cubecl_stream(client, FlagKernel::OperandsReady, 1, SHORT);
        block_on(client.sync()).map_err(|e| format!("the ready-flag kernel on cubecl's stream: {e:?}"))?;
        match ring.read(client, 1)? {
            (1, 0) => {}
            other => return Err(format!("after the ready-flag kernel, the flags (ready, done) read {other:?}, expected (1, 0)")),
        }
        ring.on_lt_stream(stream, &self.wait_ready, 1, SHORT)?;
        ring.on_lt_stream(stream, &self.set_done, 1, SHORT)?;
        let start = std::time::Instant::now();
        loop {
            // SAFETY: a query of our own live stream.
            match unsafe { cudarc::driver::sys::cuStreamQuery(stream.cu_stream()) } {
                cudarc::driver::sys::CUresult::CUDA_SUCCESS => break,
                cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY if start.elapsed().as_secs() < 5 => std::thread::yield_now(),
                other => return Err(format!("cuBLASLt's stream after its flag kernels: {other:?} after {:?}", start.elapsed())),
            }
        }
        match ring.read(client, 1)? {
            (1, 1) => {}
            other => return Err(format!("after cuBLASLt's flag kernels, the flags (ready, done) read {other:?}, expected (1, 1)")),
        }
        ring.on_cubecl_stream(client, FlagKernel::ProductDone, 1, SHORT);
        block_on(client.sync()).map_err(|e| format!("the done-flag wait on cubecl's stream: {e:?}"))
    }

    /// The next product's sequence number, with the kernel that sets its `ready` flag launched
    /// on cubecl's stream. Called on cubecl's device thread, where the launch happens at once:
    /// the wait on cuBLASLt's stream is launched after it, so it never spins for a kernel not
    /// yet launched while this thread sits in a cuBLASLt call that loads a kernel (which waits
    /// for the device to idle). (Called from another thread, cubecl would batch the launch until
    /// a flush, and its flush also waits for the device to reach the previous flush: one host
    /// wait per product, which made decoding 2x slower than burn's own products.)
    fn next(&mut self, client: &Client) -> u64 {
        self.last += 1;
        self.ring.on_cubecl_stream(client, FlagKernel::OperandsReady, self.last, FLAG_TIMEOUT_NS);
        self.last
    }
}

/// The one-thread kernels on cuBLASLt's stream, compiled by NVRTC through cudarc: wait until
/// cubecl's stream has reached the product (`ready[slot]`), and tell it the product is written
/// (`done[slot]`). Stream order puts the product between them.
const LT_STREAM_SOURCE: &str = r#"
typedef unsigned long long u64;

__device__ u64 now_ns() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

extern "C" __global__ void cublaslt_wait_ready(u64* flags, u64 slot, u64 seq, u64 timeout_ns) {
    const volatile u64* ready = flags + slot;
    const u64 start = now_ns();
    while (*ready < seq) {
        if (now_ns() - start > timeout_ns) __trap();
    }
    __threadfence();
}

extern "C" __global__ void cublaslt_set_done(u64* flags, u64 slot, u64 seq, u64 timeout_ns) {
    __threadfence();
    *(volatile u64*)(flags + FLAG_SLOTS + slot) = seq;
}
"#;

/// The two one-thread kernels on cubecl's stream, through cubecl (like [`crate::flash`]'s).
const FLAG_SOURCE: &str = r#"
typedef unsigned long long u64;
struct __align__(8) Params { u64 slot, seq, timeout_ns; };

// Everything queued before it on cubecl's stream (the operands) is written: set ready[slot].
extern "C" __global__ void __launch_bounds__(32) cublaslt_operands_ready(u64* flags, const __grid_constant__ Params p) {
    if (threadIdx.x != 0) return;
    __threadfence();
    *(volatile u64*)(flags + p.slot) = p.seq;
}

// Does nothing: launched once per cubecl stream, for CUPTI to show which CUDA stream that is
// (src/cupti.rs), so that products can be queued on it.
extern "C" __global__ void __launch_bounds__(32) cublaslt_stream_marker(u64* flags, const __grid_constant__ Params p) {}

// Hold cubecl's stream until cuBLASLt's stream has written the product (done[slot]).
extern "C" __global__ void __launch_bounds__(32) cublaslt_product_done(u64* flags, const __grid_constant__ Params p) {
    if (threadIdx.x != 0) return;
    const volatile u64* done = flags + FLAG_SLOTS + p.slot;
    u64 start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    while (*done < p.seq) {
        asm volatile("nanosleep.u32 512;");
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
        if (now - start > p.timeout_ns) __trap();
    }
    __threadfence();
}
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum FlagKernel {
    OperandsReady,
    ProductDone,
    StreamMarker,
}

impl FlagKernel {
    fn entry(self) -> &'static str {
        match self {
            FlagKernel::OperandsReady => "cublaslt_operands_ready",
            FlagKernel::ProductDone => "cublaslt_product_done",
            FlagKernel::StreamMarker => "cublaslt_stream_marker",
        }
    }
}

impl burn_cubecl::cubecl::prelude::KernelMetadata for FlagKernel {
    fn id(&self) -> burn_cubecl::cubecl::prelude::KernelId {
        use burn_cubecl::cubecl::prelude::{CubeDim, KernelId};
        KernelId::new::<Self>().info((*self, crate::flash::fnv1a(FLAG_SOURCE), FLAG_SLOTS)).cube_dim(CubeDim::new_1d(32))
    }

    fn address_type(&self) -> burn_cubecl::cubecl::prelude::StorageType {
        burn_cubecl::cubecl::prelude::AddressType::U64.unsigned_type()
    }
}

impl burn_cubecl::cubecl::CubeTask<burn_cubecl::cubecl::cuda::CudaCompiler> for FlagKernel {
    fn compile(
        &self,
        compiler: &mut burn_cubecl::cubecl::cuda::CudaCompiler,
        options: &<burn_cubecl::cubecl::cuda::CudaCompiler as burn_cubecl::cubecl::Compiler>::CompilationOptions,
        mode: burn_cubecl::cubecl::prelude::ExecutionMode,
        address_type: burn_cubecl::cubecl::prelude::StorageType,
    ) -> Result<burn_cubecl::cubecl::prelude::CompiledKernel<burn_cubecl::cubecl::cuda::CudaCompiler>, burn_cubecl::cubecl::CompilationError> {
        let source = format!("#define FLAG_SLOTS {FLAG_SLOTS}\n{FLAG_SOURCE}");
        crate::flash::compile_source(compiler, options, mode, address_type, self.entry(), source, 32, 0)
    }
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

/// Products on raw device memory for kernels that run outside burn (the graph decoder's
/// prefill): row-major `out[m, n] = a[m, k] · w[k, n]` with bf16 operands and f32 sums and
/// output, queued on the caller's stream. It has its own handle, workspace and plans, in the
/// CUDA context bound to the thread that makes it.
pub(crate) struct RawGemm {
    context: Arc<CudaContext>,
    handle: sys::cublasLtHandle_t,
    workspace: u64,
    plans: HashMap<Problem, Plan>,
}

// Plain data used by one thread at a time (its owner sits behind a mutex).
unsafe impl Send for RawGemm {}

impl RawGemm {
    pub(crate) fn new(context: &Arc<CudaContext>) -> Result<Self, String> {
        // SAFETY: only asks the loader whether the library can be opened.
        if !unsafe { sys::is_culib_present() } {
            return Err("libcublasLt.so could not be loaded (is the CUDA toolkit's lib64 on LD_LIBRARY_PATH?)".into());
        }
        context.bind_to_thread().map_err(|e| format!("CUDA device: {e}"))?;
        let handle = lt::create_handle().map_err(|e| format!("cublasLtCreate: {e}"))?;
        // SAFETY: a plain allocation in the bound context, freed in `drop`.
        let workspace = match unsafe { cudarc::driver::result::malloc_sync(WORKSPACE_BYTES) } {
            Ok(ptr) => ptr,
            Err(e) => {
                // SAFETY: made above, used by nothing.
                let _ = unsafe { lt::destroy_handle(handle) };
                return Err(format!("cuBLASLt's {WORKSPACE_BYTES}-byte workspace: {e}"));
            }
        };
        Ok(RawGemm { context: context.clone(), handle, workspace, plans: HashMap::new() })
    }

    /// Queues `out[m, n] = a[m, k] · w[k, n]` (row-major, bf16 `a` and `w`, f32 `out`) on
    /// `stream`. A plan is kept per shape: a prompt of a new length costs one heuristic query
    /// per product shape.
    ///
    /// # Safety
    /// `a`, `w` and `out` must be device addresses of at least m·k, k·n and m·n elements in
    /// this context, `out` overlapping neither, and `stream` belong to the context; the
    /// product runs after the work queued on `stream` before it.
    pub(crate) unsafe fn bf16_to_f32(&mut self, stream: &CudaStream, a: u64, w: u64, out: u64, (m, k, n): (usize, usize, usize)) -> Result<(), String> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        // Row-major out = a·w is column-major outᵀ = wᵀ·aᵀ: cuBLASLt's first operand is `w`.
        let problem = Problem {
            dtype: sys::cudaDataType_t::CUDA_R_16BF,
            out_dtype: sys::cudaDataType_t::CUDA_R_32F,
            transposed: (false, false),
            mnk: (n as u64, m as u64, k as u64),
            lds: (n as i64, k as i64, n as i64),
            alignments: (alignment(w), alignment(a), alignment(out)),
            bias: false,
        };
        let plan = match self.plans.entry(problem) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(Plan::new(self.handle, &problem)?),
        };
        // SAFETY: the plan describes these operands (the problem is its key); the caller
        // vouches for the memory; the workspace is used on one stream at a time (the owner's).
        plan.run(self.handle, (w, a, out), None, self.workspace, stream.cu_stream() as sys::cudaStream_t)
        .map_err(|e| format!("cublasLtMatmul for {problem:?}: {e}"))
    }
}

impl Drop for RawGemm {
    fn drop(&mut self) {
        if self.context.bind_to_thread().is_ok() {
            // SAFETY: the owner has synchronised its stream; nothing uses these any more.
            unsafe {
                for plan in self.plans.values() {
                    let _ = lt::destroy_matmul_desc(plan.desc);
                    for layout in [plan.layouts.0, plan.layouts.1, plan.layouts.2] {
                        let _ = lt::destroy_matrix_layout(layout);
                    }
                }
                let _ = lt::destroy_handle(self.handle);
                let _ = cudarc::driver::result::free_sync(self.workspace);
            }
        }
    }
}

/// Training: the product's backward is two more products (`dC · Bᵀ`, `Aᵀ · dC`), both routed to
/// cuBLASLt, the transposes being views it reads as they lie.
mod autodiff {
    use super::{cast, register, register_as, AutocastAffine, Fused, Primitive};
    use crate::cuda_kernel::AutodiffCudaOp;
    use burn::prelude::Shape;
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
    /// What the autocast affine's backward keeps: the cast input and weight (each only when
    /// the other's gradient needs it), the compute dtype, and the input's dtype and shape.
    #[derive(Debug, Clone)]
    pub(super) struct AffineState {
        x: Option<Primitive>,
        w: Option<Primitive>,
        op: AutocastAffine,
    }

    #[derive(Debug)]
    struct AutocastAffineBackward;

    /// Over `[x, w]` or `[x, w, bias]`.
    impl<B: Backend<FloatTensorPrimitive = Primitive>, const N: usize> Backward<B, N> for AutocastAffineBackward {
        type State = AffineState;

        fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
            use burn::tensor::ops::FloatTensorOps;
            let AffineState { x, w, op } = ops.state;
            let dy = grads.consume::<B>(&ops.node);
            let n = dy.shape[dy.shape.num_dims() - 1];
            let rows = dy.shape.num_elements() / n;
            let dy = Fused::float_reshape(dy, Shape::new([rows, n]));
            let mut parents = ops.parents.into_iter();
            let (px, pw, pb) = (parents.next().flatten(), parents.next().flatten(), parents.next().flatten());
            // The output's gradient is in the compute dtype (a cast only if a consumer gave
            // another).
            let dy = cast(dy, op.compute);
            if let Some(node) = px {
                let w = w.expect("the weight, kept for the input's gradient");
                let dx = register_as(dy.clone(), Fused::float_transpose(w), op.x_dtype, None);
                grads.register::<B>(node.id, Fused::float_reshape(dx, Shape::from(op.x_dims.clone())));
            }
            if let Some(node) = pw {
                let x = x.expect("the input, kept for the weight's gradient");
                grads.register::<B>(node.id, register_as(Fused::float_transpose(x), dy.clone(), op.w_dtype, None));
            }
            if let Some(node) = pb {
                grads.register::<B>(node.id, crate::fused_ops::column_sum(dy, op.bias_dtype));
            }
        }
    }

    impl<const N: usize> AutodiffCudaOp<N> for AutocastAffine {
        fn run<I, C>(self, inputs: [FloatTensor<Autodiff<I, C>>; N]) -> FloatTensor<Autodiff<I, C>>
        where
            I: Backend<FloatTensorPrimitive = Primitive>,
            C: CheckpointStrategy,
        {
            let nodes = inputs.each_ref().map(|t| t.node.clone());
            let (x_tracked, w_tracked) = (inputs[0].is_tracked(), inputs[1].is_tracked());
            let [x, w, bias] = [0, 1, 2].map(|i| inputs.get(i).map(|t| t.primitive.clone()));
            let (x, w) = (x.expect("the input"), w.expect("the weight"));
            match AutocastAffineBackward.prepare::<C>(nodes).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let (y, xc, wc) = self.forward(x, w, bias, (w_tracked, x_tracked));
                    prep.finish(AffineState { x: xc, w: wc, op: self }, y)
                }
                OpsKind::UnTracked(prep) => prep.finish(self.forward(x, w, bias, (false, false)).0),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn_cubecl::cubecl::cuda::CudaCompiler;
    use burn_cubecl::cubecl::prelude::{ExecutionMode, KernelMetadata};
    use burn_cubecl::cubecl::CubeTask;

    /// The device-ordered mode's flag kernels compile without a GPU to our source, with the ring's
    /// size defined, and have ids of their own.
    #[test]
    fn flag_kernels_compile_to_our_source() {
        for kernel in [FlagKernel::OperandsReady, FlagKernel::ProductDone] {
            let compiled = kernel
                .compile(&mut CudaCompiler::default(), &Default::default(), ExecutionMode::Checked, kernel.address_type())
                .expect("compiles");
            assert_eq!(compiled.entrypoint_name, kernel.entry());
            assert!(compiled.source.starts_with(&format!("#define FLAG_SLOTS {FLAG_SLOTS}\n")));
            assert!(compiled.source.contains(&format!("{}(u64* flags", kernel.entry())));
        }
        assert_ne!(FlagKernel::OperandsReady.id(), FlagKernel::ProductDone.id());
        // The argument lists `Ring::on_lt_stream` and `Ring::on_cubecl_stream` pass.
        for entry in ["cublaslt_wait_ready", "cublaslt_set_done"] {
            assert!(LT_STREAM_SOURCE.contains(&format!("{entry}(u64* flags, u64 slot, u64 seq, u64 timeout_ns)")));
        }
        assert!(FLAG_SOURCE.contains("struct __align__(8) Params { u64 slot, seq, timeout_ns; };"));
    }
}

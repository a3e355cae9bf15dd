//! Batch-1 decoding on CUDA as one CUDA graph per token. burn-fusion's host work per operation
//! bounds eager decoding near 50 tokens/s on an H200, however fast the kernels are; here a decode
//! step's kernels (`src/graph_decode.cu`: five per layer, LayerNorms, bias, activation,
//! residual and the attention's merge folded into the products) are captured once and each
//! token replays them with one launch. On sm_90 and later each kernel after the first is a
//! programmatic dependent of the one before, so it starts early and loads its first weights
//! (or the cache's older rows) while that one finishes. The kernels
//! read the token and its position from device memory and the last one writes the next
//! (greedy) token and position there, so a greedy step costs the host one launch and a 4-byte
//! read.
//!
//! The decoder holds its own copy of the language model's weights (bf16 for a bf16 model, f32
//! otherwise; LoRA adapters folded in) and a key/value cache for every position, all allocated
//! once. A bf16 model's prompt is prefilled here too ([`GraphDecoder::prefill_prompt`]:
//! cuBLASLt's products, the flash attention kernel, and src/graph_prefill.cu's row kernels,
//! launched one by one since the length varies), keys and values going straight into the
//! cache; with [`GraphDecoder::add_vision`] the images are encoded here as well (the vision
//! tower's selected layers and the projector, `graph_decode/vision.rs`), so that the time to
//! the first token is the GPU's, not burn's host work. Otherwise burn prefills and its cache is
//! copied in (device to device on burn's CUDA backend). Activations and their sums are f32
//! throughout (the products' operands bf16), so a bf16 model runs slightly more precisely than
//! burn's bf16 path (which rounds every intermediate).
//!
//! The same step also exists as one persistent kernel (`decode_step_*`, sm_90): one block an
//! SM, all resident. Each block takes its share of every phase's tasks (product tiles,
//! attention chunks, logits rows) in order, and waits only for the counters of the phase it
//! reads, not for the whole grid; one warp of each block streams the weights of its coming
//! tasks into a ring of shared-memory stages (cp.async) meanwhile, so the memory does not
//! idle while the computing warps wait. It computes the same step to f32 rounding (its sums
//! are split and added in other orders). It is the default where it runs;
//! `LLAVA_JP_GRAPH_STEP=kernels` or [`GraphDecoder::set_step_kernel`] replays the step's
//! kernels instead, and [`GraphDecoder::profile`] times both.
//!
//! Built by the caller from the model it will generate with ([`GraphDecoder::new`]) and handed
//! to generation in [`crate::infer::GenerationConfig::graph_decoder`]; generation uses it for
//! a single prompt on a cache (the only case it covers) and keeps burn's path otherwise.

use std::sync::Arc;

use burn::prelude::*;
use burn::tensor::DType;
use std::ffi::c_void;

use cudarc::driver::sys::{self, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{result, CudaContext, CudaFunction, CudaGraph, CudaModule, CudaStream, DriverError};

use crate::model::gpt2::{Gpt2Model, KvCache, LmHead};
use crate::model::nn::{Activation, Conv1D, LayerNorm};

const SOURCE: &str = include_str!("graph_decode.cu");
/// The prefill's kernels between its products, compiled with `SOURCE` (they use its helpers).
const PREFILL_SOURCE: &str = include_str!("graph_prefill.cu");
/// Constants of the source: the attention's threads and keys per thread, the widest head,
/// GEMV's columns per block (also the residual stream's columns per statistics slot).
const ATTN_THREADS: usize = 128;
const ATTN_ITERS: usize = 8;
const MAX_HEAD_DIM: usize = 256;
const GEMV_COLUMNS: usize = 256;
/// A GEMV's row splits: as many blocks as run at once (one wave), each split at least
/// `GEMV_MIN_ROWS` rows, at most `GEMV_MAX_SPLITS` partial sums for the last block to add up.
const GEMV_MAX_SPLITS: usize = 32;
const GEMV_MIN_ROWS: usize = 64;
/// Dynamic shared memory a block may use for its input rows (48 KiB less the static arrays).
const MAX_DYNAMIC_SHARED: usize = 38 * 1024;
/// The step kernel's shape (`STEP_*` in the source): threads per block (eight computing warps
/// and one streaming warp), the ring of weight stages each block streams into, a product
/// tile's columns, ints between two of its counters, and the (head, chunk) pairs an
/// attn.c_proj tile may merge.
const STEP_THREADS: usize = 256 + 32;
const STEP_STAGES: usize = 6;
const STEP_STAGE_BYTES: usize = 32768;
const STEP_COLUMNS: usize = GEMV_COLUMNS;
const STEP_PAD: usize = 32;
const STEP_MERGE: usize = 1024;
/// Shared memory a block may use on sm_90 (228 KiB an SM, 1 KiB of it the driver's).
const STEP_SHARED_LIMIT: usize = 227 * 1024;

/// The GEMV kernel's parameters (`GemvArgs` in the source, same order and layout).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct GemvArgs {
    x: u64,
    h: u64,
    stats: u64,
    gamma: u64,
    beta: u64,
    eps: f32,
    bias: u64,
    parts: u64,
    out: u64,
    counters: u64,
    state: u64,
    chunk_acc: u64,
    chunk_ml: u64,
    head_dim: i32,
    attn_chunk: i32,
    max_chunks: i32,
    k_dim: i32,
    n_dim: i32,
    rows_per_split: i32,
    prologue: i32,
    epilogue: i32,
    activation: i32,
}

/// One layer as the step kernel reads it (`StepLayer` in the source, same layout).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct StepLayerArgs {
    /// c_attn, attn.c_proj, c_fc, mlp.c_proj: weights and biases.
    w: [u64; 4],
    b: [u64; 4],
    ln1_g: u64,
    ln1_b: u64,
    ln2_g: u64,
    ln2_b: u64,
    k_cache: u64,
    v_cache: u64,
    /// c_attn's and c_fc's LayerNorm folded into the product (`STEP_FOLD` in the source): G
    /// and B of c_attn (3 n_embd each), then of c_fc (inner each).
    fold: [u64; 4],
    ln1_eps: f32,
    ln2_eps: f32,
    scale: f32,
    unused: f32,
}

/// The step kernel's parameters (`StepArgs` in the source, same order and layout).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct StepArgs {
    layers: u64,
    wte: u64,
    wpe: u64,
    lm_head: u64,
    lnf_g: u64,
    lnf_b: u64,
    h: u64,
    stats: u64,
    logits: u64,
    best: u64,
    parts: u64,
    chunk_acc: u64,
    chunk_ml: u64,
    state: u64,
    counters: u64,
    lnf_eps: f32,
    n_layer: i32,
    n_embd: i32,
    n_head: i32,
    inner: i32,
    vocab: i32,
    n_positions: i32,
    activation: i32,
    rows: [i32; 4],
    attn_keys: i32,
    max_chunks: i32,
    logits_rows: i32,
    parts_per_layer: i32,
    n_counters: i32,
    xs_floats: i32,
}

/// How the step kernel cuts a model's step into tasks (the source takes these, and its
/// buffers are sized from them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StepTiling {
    /// Rows of a tile of c_attn, attn.c_proj, c_fc, mlp.c_proj: each product in at most as
    /// many tiles as the grid has blocks, so that no block takes two tiles of a phase (the
    /// phase would wait on its second tile's stream) and few partial sums are left to add.
    rows: [usize; 4],
    /// The unit of an attention chunk's keys (as many keys and values as fill one stage; the
    /// kernel takes a multiple of it each step, up to 256, so that the chunks fill the grid),
    /// and chunks of the longest sequence at that unit.
    attn_keys: usize,
    max_chunks: usize,
    /// lm_head rows of a logits task (one stage).
    logits_rows: usize,
    parts_per_layer: usize,
    n_counters: usize,
    /// Floats of a block's input rows (a tile's, or ln_f's whole width).
    xs_floats: usize,
}

/// "a,b,c,d": four positive counts.
fn parse_splits(v: &str) -> Option<[usize; 4]> {
    let counts: Vec<usize> = v.split(',').map(|c| c.trim().parse().ok().filter(|&n| n > 0)).collect::<Option<_>>()?;
    counts.try_into().ok()
}

/// What `LLAVA_JP_GRAPH_STEP` asks for: `Some(asked_by_name)` to try the step kernel (unset, or
/// "kernel"), `None` to keep to the step's kernels ("kernels"), an error for any other value.
fn step_kernel_choice(value: Option<&str>) -> Result<Option<bool>, String> {
    match value {
        None => Ok(Some(false)),
        Some("kernel") => Ok(Some(true)),
        Some("kernels") => Ok(None),
        Some(other) => Err(format!(
            "LLAVA_JP_GRAPH_STEP = {other:?}: expected \"kernel\" (one persistent kernel a step, the default on sm_90) or \"kernels\" (the step's kernels one by one)"
        )),
    }
}

/// (k, n) of c_attn, attn.c_proj, c_fc and mlp.c_proj, in the step kernel's order.
fn step_products(shape: DecoderShape) -> [(usize, usize); 4] {
    let DecoderShape { n_embd, inner, .. } = shape;
    [(n_embd, 3 * n_embd), (n_embd, n_embd), (n_embd, inner), (inner, n_embd)]
}

impl StepTiling {
    /// The tiling for `shape`, or why the step kernel does not take it: its bulk copies move
    /// rows of whole 16-byte units, so every width must be a multiple of 16 bytes.
    /// `splits`: each product's split-K count instead of the most that keeps it within
    /// `blocks` tiles (`LLAVA_JP_GRAPH_STEP_SPLITS`, for measuring other tilings).
    fn new(shape: DecoderShape, bf16: bool, blocks: usize, splits: Option<[usize; 4]>) -> Result<Self, String> {
        let DecoderShape { n_layer, n_embd, n_head, inner, n_positions, .. } = shape;
        let elem = if bf16 { 2 } else { 4 };
        let head_dim = n_embd / n_head;
        for (what, width) in [("n_embd", n_embd), ("the MLP's width", inner), ("head_dim", head_dim)] {
            if width * elem % 16 != 0 {
                return Err(format!("{what} = {width}: rows of {} bytes, not a multiple of 16", width * elem));
            }
        }
        if head_dim > 256 {
            return Err(format!("heads {head_dim} wide (at most 256)"));
        }
        let products = step_products(shape);
        let mut rows = products.map(|(k, n)| {
            let splits = (blocks / n.div_ceil(STEP_COLUMNS)).max(1);
            k.div_ceil(splits).div_ceil(8) * 8
        });
        if let Some(splits) = splits {
            for ((r, (k, _)), s) in rows.iter_mut().zip(products).zip(splits) {
                if s == 0 || s > k {
                    return Err(format!("{s} splits of a product {k} rows deep"));
                }
                *r = k.div_ceil(s).div_ceil(8) * 8;
            }
        }
        let attn_keys = (STEP_STAGE_BYTES / (2 * head_dim * elem)).min(256);
        let max_chunks = n_positions.div_ceil(attn_keys);
        // attn.c_proj's tile: the heads its rows reach (one more where they start mid-head).
        let heads = rows[1].div_ceil(head_dim) + 1;
        if heads * max_chunks > STEP_MERGE || heads > 64 {
            return Err(format!("{heads} heads x {max_chunks} attention chunks to merge in a tile, more than {STEP_MERGE}"));
        }
        let logits_rows = STEP_STAGE_BYTES / (n_embd * elem);
        if logits_rows == 0 {
            return Err(format!("n_embd = {n_embd}: an lm_head row does not fit a {STEP_STAGE_BYTES}-byte stage"));
        }
        let parts_per_layer = products.iter().zip(rows).map(|(&(k, n), r)| k.div_ceil(r) * n).sum();
        // Per layer, as `step_counters` in the source: c_attn's and c_fc's column blocks, the
        // heads, two residual points, and the residual products' column blocks twice.
        let per_layer = (3 * n_embd).div_ceil(STEP_COLUMNS) + n_head + 1 + inner.div_ceil(STEP_COLUMNS) + 1 + 2 * n_embd.div_ceil(STEP_COLUMNS);
        let n_counters = 2 + n_layer * per_layer;
        let xs_floats = n_embd.max(rows.into_iter().max().unwrap_or(0));
        Ok(StepTiling { rows, attn_keys, max_chunks, logits_rows, parts_per_layer, n_counters, xs_floats })
    }

    /// Dynamic shared memory a block takes: the ring and the input rows.
    fn dynamic_shared(&self) -> usize {
        STEP_STAGES * STEP_STAGE_BYTES + self.xs_floats * 4
    }
}

/// The step kernel's grid and buffers, where the device takes it.
struct StepKernel {
    /// Blocks of the grid: one an SM, all resident (a cooperative launch).
    blocks: usize,
    tiling: StepTiling,
    /// The layers' [`StepLayerArgs`].
    layers: u64,
    /// Per layer: the products' partial sums, the attention's chunks.
    parts: u64,
    chunk_acc: u64,
    chunk_ml: u64,
    /// The tasks' counters, `STEP_PAD` ints apart; zero between steps.
    counters: u64,
}

const PROLOGUE_PLAIN: i32 = 0;
const PROLOGUE_LAYERNORM: i32 = 1;
const PROLOGUE_ATTENTION: i32 = 2;
const EPILOGUE_STORE: i32 = 0;
const EPILOGUE_ACTIVATE: i32 = 1;
const EPILOGUE_RESIDUAL: i32 = 2;

/// The attention's layout for heads `head_dim` wide: lanes reading a key (eight dimensions
/// each, a power of two) and keys per block, which is what a block of the kernel covers
/// (ATTN_ITERS keys a thread): the kernel and attn.c_proj's merge take it from here.
fn attention_layout(head_dim: usize) -> (usize, usize) {
    let lanes_per_key = head_dim.div_ceil(8).next_power_of_two().clamp(1, 32);
    (lanes_per_key, ATTN_ITERS * ATTN_THREADS / lanes_per_key)
}

/// The kernels' code for an activation (`activate` in the source).
fn activation_code(activation: Activation) -> i32 {
    match activation {
        Activation::QuickGelu => 0,
        Activation::Gelu => 1,
        Activation::GeluTanh => 2,
        Activation::Relu => 3,
        Activation::Silu => 4,
    }
}

/// NVRTC's `compute_XY` for a capability; NVRTC wants a 'static name, so each one asked for
/// is leaked once.
fn compute_arch(major: i32, minor: i32) -> &'static str {
    static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let name = format!("compute_{major}{minor}");
    let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(known) = names.iter().find(|n| **n == name) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.into_boxed_str());
    names.push(leaked);
    leaked
}

/// What a GEMV reads as its input.
enum Input {
    /// A vector in device memory.
    Vector(u64),
    /// LayerNorm of the residual stream with (gamma, beta, eps).
    LayerNorm(u64, u64, f32),
    /// The attention's chunks, merged.
    Attention,
}

/// Launches `function` on `stream` with `params` (pointers to each argument, in order); with
/// `dependent`, as a programmatic dependent of the kernel before it (sm_90+), which lets it
/// start before that one ends (the kernel waits where it needs its results).
///
/// # Safety
/// `params` must match the kernel's parameters, and every device address in them be valid
/// for what the kernel does with it.
unsafe fn launch_kernel(
    function: &CudaFunction,
    stream: &CudaStream,
    grid: (u32, u32),
    block: u32,
    shared: u32,
    dependent: bool,
    params: &mut [*mut c_void],
) -> Result<(), DriverError> {
    let mut attribute: sys::CUlaunchAttribute = std::mem::zeroed();
    attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attribute.value.programmaticStreamSerializationAllowed = 1;
    launch_with(function, stream, grid, block, shared, dependent.then_some(attribute), params)
}

/// Launches `function` with every block of `blocks` resident at once (a cooperative launch:
/// the launch fails rather than start more blocks than the GPU holds), for the step kernel,
/// whose blocks wait on each other's counters.
///
/// # Safety
/// As [`launch_kernel`].
unsafe fn launch_cooperative(
    function: &CudaFunction,
    stream: &CudaStream,
    blocks: u32,
    block: u32,
    shared: u32,
    params: &mut [*mut c_void],
) -> Result<(), DriverError> {
    let mut attribute: sys::CUlaunchAttribute = std::mem::zeroed();
    attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
    attribute.value.cooperative = 1;
    launch_with(function, stream, (blocks, 1), block, shared, Some(attribute), params)
}

/// `cuLaunchKernelEx` with at most one launch attribute.
///
/// # Safety
/// As [`launch_kernel`].
unsafe fn launch_with(
    function: &CudaFunction,
    stream: &CudaStream,
    grid: (u32, u32),
    block: u32,
    shared: u32,
    attribute: Option<sys::CUlaunchAttribute>,
    params: &mut [*mut c_void],
) -> Result<(), DriverError> {
    let mut attribute = attribute;
    let (attrs, num_attrs) = match attribute.as_mut() {
        Some(a) => (a as *mut sys::CUlaunchAttribute, 1),
        None => (std::ptr::null_mut(), 0),
    };
    let config = sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: 1,
        blockDimX: block,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: shared,
        hStream: stream.cu_stream(),
        attrs,
        numAttrs: num_attrs,
    };
    sys::cuLaunchKernelEx(&config, function.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()).result()
}

/// Kernel parameters as `cuLaunchKernelEx` takes them: the address of each argument. Nothing
/// checks the types: each must be the kernel parameter's exact type (i32, f32, a u64 device
/// address or `GemvArgs`), and live until the launch returns.
macro_rules! params {
    ($($arg:expr),* $(,)?) => { [$(($arg) as *const _ as *mut c_void),*] };
}

// After `params!`, which it uses (macros are in scope from their definition on).
mod vision;

/// Device memory of the decoder, freed with it.
struct Memory {
    context: Arc<CudaContext>,
    blocks: Vec<u64>,
}

impl Memory {
    fn alloc(&mut self, bytes: usize, what: &str) -> Result<u64, String> {
        // SAFETY: a plain allocation in our bound context, freed in `drop`.
        let ptr = unsafe { result::malloc_sync(bytes.max(4)) }.map_err(|e| format!("allocating {bytes} bytes for {what}: {e}"))?;
        self.blocks.push(ptr);
        Ok(ptr)
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        if self.context.bind_to_thread().is_ok() {
            for &ptr in &self.blocks {
                // SAFETY: allocated by `alloc`, freed once; the stream was synchronised by the
                // decoder's drop.
                let _ = unsafe { result::free_sync(ptr) };
            }
        }
    }
}

/// Device addresses of a layer's parameters and cache.
struct Layer {
    ln_1: (u64, u64),
    c_attn: (u64, u64),
    attn_proj: (u64, u64),
    ln_2: (u64, u64),
    c_fc: (u64, u64),
    mlp_proj: (u64, u64),
    k_cache: u64,
    v_cache: u64,
    scale: f32,
    eps: (f32, f32),
}

struct Kernels {
    _module: Arc<CudaModule>,
    /// Launched as programmatic dependents (sm_90+, unless `LLAVA_JP_GRAPH_PDL=0`).
    dependent: bool,
    embed: CudaFunction,
    gemv: CudaFunction,
    attention: CudaFunction,
    logits: CudaFunction,
    /// The whole step as one persistent kernel (`decode_step_*`).
    step: CudaFunction,
    /// Its LayerNorms folded into the products after them, made once (`step_fold_layernorm_*`).
    step_fold: CudaFunction,
    prefill_residual_layernorm: CudaFunction,
    prefill_split_qkv: CudaFunction,
    prefill_bias_activation: CudaFunction,
    prefill_last_row: CudaFunction,
    prefill_splice: CudaFunction,
    vision_patches: CudaFunction,
    vision_embeddings: CudaFunction,
    vision_take_rows: CudaFunction,
    /// The device's compute capability (major, minor).
    capability: (i32, i32),
}

/// Shapes of the language model the decoder was built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecoderShape {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub inner: usize,
    pub vocab: usize,
    pub n_positions: usize,
}

/// [`GraphDecoder::profile`]'s answer (milliseconds).
#[derive(Debug, Clone)]
pub struct DecodeProfile {
    /// One replay of the captured graph (the one generation replays).
    pub graph_step_ms: f64,
    /// One replay of a graph of the step kernel, and of the step's kernels one after another
    /// (None where that one cannot run).
    pub step_kernel_graph_ms: Option<f64>,
    pub kernels_graph_ms: Option<f64>,
    /// The step kernel's blocks (0: not prepared).
    pub step_kernel_blocks: usize,
    /// The kernels launched one by one (launch gaps included, and no overlap between them:
    /// a timing event sits between each two, programmatic launch or not).
    pub launched_step_ms: f64,
    /// Per kernel: total time over the step and how many launches.
    pub kernels: Vec<(String, f64, usize)>,
    /// GEMV blocks per SM, and whether kernels start early (programmatic dependent launch).
    pub gemv_blocks_per_sm: usize,
    pub dependent_launches: bool,
}

/// What a step hands back.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutput {
    /// The arg max of the logits (greedy decoding).
    Token(i64),
    /// The logits, for a sampler on the host.
    Logits(Vec<f32>),
}

pub struct GraphDecoder {
    shape: DecoderShape,
    /// `true`: weights and cache in bf16.
    bf16: bool,
    activation: i32,
    ln_f: (u64, u64, f32),
    wte: u64,
    wpe: u64,
    lm_head: u64,
    layers: Vec<Layer>,
    /// `[token, position, arg max, unused]`.
    state: u64,
    /// The residual stream and its LayerNorm statistics (per `GEMV_COLUMNS` columns).
    h: u64,
    stats: u64,
    qkv: u64,
    fc_out: u64,
    parts: u64,
    chunk_acc: u64,
    chunk_ml: u64,
    /// Which blocks have finished, per GEMV column block (`[0]` also for the logits blocks),
    /// reset by the last.
    counters: u64,
    /// Each logits block's best (value, index).
    best: u64,
    logits_blocks: usize,
    sms: usize,
    /// GEMV blocks an SM runs at once (from the kernel's registers and shared memory).
    gemv_blocks_per_sm: usize,
    logits: u64,
    /// Keys per attention block, lanes per key, chunks of the longest sequence.
    attn_chunk: usize,
    lanes_per_key: usize,
    max_chunks: usize,
    kernels: Kernels,
    /// The step as one kernel, where the device can run its grid (None: kernels only).
    step_kernel: Option<StepKernel>,
    /// Whether the graph replays the step kernel (else the step's kernels one after another).
    use_step_kernel: bool,
    /// The prompt prefill's buffers and products, made by the first prefill.
    prefill: Option<Prefill>,
    /// The vision tower and projector, when [`Self::add_vision`] copied them.
    vision: Option<vision::Vision>,
    /// Whether [`Self::prefill`] runs (`LLAVA_JP_GRAPH_PREFILL=0` or [`Self::set_prefill`]
    /// turn it off, to measure against burn's prefill).
    prefill_on: bool,
    graph: Option<CudaGraph>,
    /// How long the last [`Self::load_cache`] took.
    last_cache_load: std::time::Duration,
    stream: Arc<CudaStream>,
    memory: Memory,
}

// The graph and raw pointers are used by one thread at a time (the decoder sits behind a mutex).
unsafe impl Send for GraphDecoder {}

impl std::fmt::Debug for GraphDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphDecoder").field("shape", &self.shape).field("bf16", &self.bf16).finish()
    }
}

/// `data` as the decoder stores it (bf16 or f32), as bytes; no conversion when it is already.
fn storage_bytes(data: TensorData, bf16: bool) -> std::borrow::Cow<'static, [u8]> {
    let want = if bf16 { DType::BF16 } else { DType::F32 };
    if data.dtype == want {
        return std::borrow::Cow::Owned(data.into_bytes().to_vec());
    }
    let values = data.convert::<f32>().into_vec::<f32>().expect("f32 values");
    let bytes = if bf16 {
        values.iter().flat_map(|&v| burn::tensor::bf16::from_f32(v).to_bits().to_le_bytes()).collect()
    } else {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    };
    std::borrow::Cow::Owned(bytes)
}

/// A burn tensor (a prompt's cache or embeddings) as a copy or kernel reads it: burn's own CUDA
/// storage when the model is on the fused CUDA backend in the decoder's dtype, else bytes on
/// the host.
enum Source {
    /// The device address of the contiguous tensor, held (`_keep`) so that cubecl keeps its memory.
    Device { ptr: u64, _keep: Box<dyn std::any::Any> },
    Host(std::borrow::Cow<'static, [u8]>),
}

impl Source {
    fn of<B: Backend, const D: usize>(tensor: Tensor<B, D>, bf16: bool) -> Result<Self, String> {
        use burn::tensor::TensorPrimitive;
        use burn_cubecl::cubecl::cuda::CudaRuntime;
        use burn_cubecl::cubecl::future::block_on;
        type Fused = burn_fusion::FusionTensor<burn_cubecl::fusion::FusionCubeRuntime<CudaRuntime>>;
        let want = if bf16 { DType::BF16 } else { DType::F32 };
        if tensor.dtype() == want {
            if let TensorPrimitive::Float(primitive) = tensor.clone().into_primitive() {
                if let Ok(fused) = crate::cublaslt::downcast::<_, Fused>(primitive) {
                    let client = fused.client.clone();
                    // Runs what burn has queued for the tensor, then waits for the GPU to write it.
                    let cube = client.resolve_tensor_float::<burn_cubecl::CubeBackend<CudaRuntime, f32, i32, u8>>(fused);
                    let cube = burn_cubecl::kernel::into_contiguous(cube);
                    block_on(cube.client.sync()).map_err(|e| format!("waiting for burn's tensor: {e:?}"))?;
                    let resource = cube.client.get_resource(cube.handle.clone()).map_err(|e| format!("burn's tensor memory: {e:?}"))?;
                    let ptr = resource.resource().ptr;
                    return Ok(Source::Device { ptr, _keep: Box::new((cube, resource)) });
                }
            }
        }
        Ok(Source::Host(storage_bytes(tensor.into_data(), bf16)))
    }

    fn memory_type(&self) -> cudarc::driver::sys::CUmemorytype {
        match self {
            Source::Device { .. } => cudarc::driver::sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            Source::Host(_) => cudarc::driver::sys::CUmemorytype::CU_MEMORYTYPE_HOST,
        }
    }

    fn device_ptr(&self) -> u64 {
        match self {
            Source::Device { ptr, .. } => *ptr,
            Source::Host(_) => 0,
        }
    }

    fn host_ptr(&self) -> *const std::ffi::c_void {
        match self {
            Source::Device { .. } => std::ptr::null(),
            Source::Host(bytes) => bytes.as_ptr().cast(),
        }
    }
}

fn merged_weight<B: Backend>(c: &Conv1D<B>) -> Tensor<B, 2> {
    match &c.lora {
        None => c.weight.val(),
        Some(lora) => c.weight.val() + lora.delta_in_out(),
    }
}

/// Copies parameters to the decoder's memory: weights in the decoder's dtype, biases and
/// LayerNorm parameters in f32.
struct Uploader<'a> {
    memory: &'a mut Memory,
    bf16: bool,
}

impl Uploader<'_> {
    /// `tensor` on the GPU: in the decoder's dtype when it is a weight, f32 otherwise.
    fn values<B: Backend, const D: usize>(&mut self, tensor: Tensor<B, D>, as_weight: bool, what: &str) -> Result<u64, String> {
        let bytes = storage_bytes(tensor.into_data(), as_weight && self.bf16);
        let ptr = self.memory.alloc(bytes.len(), what)?;
        // SAFETY: `ptr` holds `bytes.len()` bytes.
        unsafe { result::memcpy_htod_sync(ptr, &bytes) }.map_err(|e| format!("copying {what} to the GPU: {e}"))?;
        Ok(ptr)
    }

    fn layernorm<B: Backend>(&mut self, ln: &LayerNorm<B>, name: &str) -> Result<(u64, u64), String> {
        Ok((self.values(ln.weight.val(), false, name)?, self.values(ln.bias.val(), false, name)?))
    }

    fn conv<B: Backend>(&mut self, c: &Conv1D<B>, name: &str) -> Result<(u64, u64), String> {
        Ok((self.values(merged_weight(c), true, name)?, self.values(c.bias.val(), false, name)?))
    }
}

/// The flash kernel's parameters (`Params` in src/flash_attention.cu: all 64-bit, in order).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct FlashParams {
    batch: i64,
    heads: i64,
    queries: i64,
    keys: i64,
    q_stride: [i64; 4],
    k_stride: [i64; 4],
    v_stride: [i64; 4],
    mask_stride: [i64; 4],
    do_stride: [i64; 4],
    scale_log2e: i64,
    scale: i64,
    drop_below: i64,
    keep_scale: i64,
    /// Unread by the token-major forward the decoder compiles.
    out_stride: [i64; 3],
    /// 0: no tile map (the kernel stages every tile of the mask itself).
    tile_map: i64,
}

/// The flash kernel's queries per block.
const FLASH_QUERIES: usize = 64;
/// Widest residual stream `prefill_residual_layernorm` takes (256 threads x 16 values).
const PREFILL_MAX_WIDTH: usize = 4096;

/// A whole prompt's prefill on the decoder's weights: cuBLASLt's products, the flash attention
/// kernel, and src/graph_prefill.cu between them, launched one after another on the decoder's
/// stream (a prompt's length changes from call to call, so no graph; ~7 launches a layer cost
/// the host microseconds each, where burn's operations cost tens). Keys and values go straight
/// into the decoder's cache. Its buffers hold the longest prompt the model takes.
struct Prefill {
    gemm: crate::cublaslt::RawGemm,
    _flash_module: Arc<CudaModule>,
    flash: CudaFunction,
    /// The residual stream (f32), the products' sums (f32), LayerNorm or activation outputs
    /// (bf16, the next product's input), q and the attention's output (bf16, [tokens, width]),
    /// the attention's log-sum-exp (unused here, the kernel writes it).
    h: u64,
    y: u64,
    xn: u64,
    q: u64,
    attn: u64,
    lse: u64,
    /// A prompt's input embeddings (bf16, [tokens, width]), its images' features (f32, the
    /// projector's last sums) and where each token's embedding comes from (i32, see
    /// `prefill_splice`).
    embeds: u64,
    features: u64,
    sources: u64,
    /// The causal mask (u8, 1 = hidden), `mask_ld` bytes a row, for every position.
    mask: u64,
    mask_ld: usize,
}

impl Prefill {
    fn new(memory: &mut Memory, kernels: &Kernels, shape: DecoderShape) -> Result<Self, String> {
        let DecoderShape { n_embd, n_head, inner, n_positions, .. } = shape;
        let head_dim = n_embd / n_head;
        let (major, minor) = kernels.capability;
        let source = format!(
            "#define HEAD_DIM {head_dim}\n#define IS_BF16 1\n#define MASK_BYTES 1\n#define DROPOUT 0\n#define OUT_TOKEN_MAJOR 1\n{}",
            crate::flash::source()
        );
        let options = cudarc::nvrtc::CompileOptions { arch: Some(compute_arch(major, minor)), ..Default::default() };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, options).map_err(|e| format!("NVRTC on src/flash_attention.cu (head_dim {head_dim}): {e:?}"))?;
        let module = memory.context.load_module(ptx).map_err(|e| format!("loading the prefill's flash kernel: {e}"))?;
        let flash = module.load_function("flash_attention_forward").map_err(|e| format!("the prefill's flash kernel: {e}"))?;
        let gemm = crate::cublaslt::RawGemm::new(&memory.context)?;
        let widest = (3 * n_embd).max(inner);
        let mask_ld = n_positions.div_ceil(16) * 16;
        let mut mask = vec![0u8; n_positions * mask_ld];
        for (q, row) in mask.chunks_mut(mask_ld).enumerate() {
            row[q + 1..].fill(1);
        }
        let prefill = Prefill {
            gemm,
            _flash_module: module,
            flash,
            h: memory.alloc(n_positions * n_embd * 4, "the prefill's residual stream")?,
            y: memory.alloc(n_positions * widest * 4, "the prefill's product sums")?,
            xn: memory.alloc(n_positions * n_embd.max(inner) * 2, "the prefill's product inputs")?,
            q: memory.alloc(n_positions * n_embd * 2, "the prefill's queries")?,
            attn: memory.alloc(n_positions * n_embd * 2, "the prefill's attention output")?,
            lse: memory.alloc(n_head * n_positions * 4, "the prefill's log-sum-exp")?,
            embeds: memory.alloc(n_positions * n_embd * 2, "the prompt's input embeddings")?,
            features: memory.alloc(n_positions * n_embd * 4, "the prompt's image features")?,
            sources: memory.alloc(n_positions * 4, "the prompt's embedding sources")?,
            mask: memory.alloc(mask.len(), "the prefill's causal mask")?,
            mask_ld,
        };
        // SAFETY: `mask` holds mask.len() bytes.
        unsafe { result::memcpy_htod_sync(prefill.mask, &mask) }.map_err(|e| format!("copying the causal mask: {e}"))?;
        Ok(prefill)
    }
}

/// A decoder for `model` (its vision tower and projector too, where supported), on the CUDA
/// device its weights are on, ready to hand to generation;
/// an error naming the backend when the model is not on burn's CUDA backend.
pub fn for_model<B: Backend>(model: &crate::model::LlavaModel<B>) -> Result<std::sync::Arc<std::sync::Mutex<GraphDecoder>>, String> {
    let device = model.transformer.wte.weight.device();
    let Some(cuda) = (&device as &dyn std::any::Any).downcast_ref::<burn::backend::cuda::CudaDevice>() else {
        return Err(format!("graph decoding runs on the cuda backend, not on {device:?}"));
    };
    let mut decoder = GraphDecoder::new(&model.transformer, model.lm_head.as_ref(), cuda.index)?;
    // Images are encoded here too where the kernels take the tower; burn encodes them otherwise.
    if decoder.vision_unsupported(model).is_none() {
        decoder.add_vision(model)?;
    }
    Ok(std::sync::Arc::new(std::sync::Mutex::new(decoder)))
}

impl GraphDecoder {
    /// Copies `model`'s language model to CUDA device `device_index` (bf16 when the model is
    /// bf16, f32 otherwise) and captures the decode step's graph.
    pub fn new<B: Backend>(transformer: &Gpt2Model<B>, lm_head: Option<&LmHead<B>>, device_index: usize) -> Result<Self, String> {
        let dtype = transformer.wte.weight.val().dtype();
        let bf16 = match dtype {
            DType::BF16 => true,
            DType::F32 | DType::F64 => false,
            other => return Err(format!("graph decoding takes bf16 or f32 models, this one is {other:?}")),
        };
        let [vocab, n_embd] = transformer.wte.weight.dims();
        let n_positions = transformer.wpe.weight.dims()[0];
        let n_layer = transformer.h.len();
        let n_head = transformer.n_head();
        let inner = transformer.h.first().map_or(4 * n_embd, |b| b.mlp.c_fc.weight.dims()[1]);
        if n_layer == 0 || n_embd % n_head != 0 {
            return Err(format!("graph decoding: {n_layer} layers of width {n_embd} in {n_head} heads"));
        }
        let head_dim = n_embd / n_head;
        if head_dim > MAX_HEAD_DIM {
            return Err(format!("graph decoding takes heads up to {MAX_HEAD_DIM} wide, this model's are {head_dim}"));
        }
        let activation = activation_code(transformer.h[0].mlp.activation);
        let shape = DecoderShape { n_layer, n_embd, n_head, inner, vocab, n_positions };

        let context = CudaContext::new(device_index).map_err(|e| format!("CUDA device {device_index}: {e}"))?;
        context.bind_to_thread().map_err(|e| format!("CUDA device {device_index}: {e}"))?;
        let stream = context.new_stream().map_err(|e| format!("a stream on CUDA device {device_index}: {e}"))?;
        let kernels = Kernels::load(&context, bf16)?;
        let mut memory = Memory { context: context.clone(), blocks: vec![] };

        let elem = if bf16 { 2 } else { 4 };
        let mut up = Uploader { memory: &mut memory, bf16 };
        let mut layers = Vec::with_capacity(n_layer);
        for (i, block) in transformer.h.iter().enumerate() {
            let name = |part: &str| format!("transformer.h.{i}.{part}");
            let ln_1 = up.layernorm(&block.ln_1, &name("ln_1"))?;
            let c_attn = up.conv(&block.attn.c_attn, &name("attn.c_attn"))?;
            let attn_proj = up.conv(&block.attn.c_proj, &name("attn.c_proj"))?;
            let ln_2 = up.layernorm(&block.ln_2, &name("ln_2"))?;
            let c_fc = up.conv(&block.mlp.c_fc, &name("mlp.c_fc"))?;
            let mlp_proj = up.conv(&block.mlp.c_proj, &name("mlp.c_proj"))?;
            let cache_bytes = n_positions * n_embd * elem;
            let k_cache = up.memory.alloc(cache_bytes, &name("keys"))?;
            let v_cache = up.memory.alloc(cache_bytes, &name("values"))?;
            layers.push(Layer {
                ln_1,
                c_attn,
                attn_proj,
                ln_2,
                c_fc,
                mlp_proj,
                k_cache,
                v_cache,
                scale: block.attn.scale as f32,
                eps: (block.ln_1.eps as f32, block.ln_2.eps as f32),
            });
        }
        let wte = up.values(transformer.wte.weight.val(), true, "transformer.wte")?;
        let wpe = up.values(transformer.wpe.weight.val(), true, "transformer.wpe")?;
        let lm_head = match lm_head {
            Some(head) => up.values(head.weight.val(), true, "lm_head")?,
            None => wte,
        };
        let ln_f = {
            let (g, b) = up.layernorm(&transformer.ln_f, "transformer.ln_f")?;
            (g, b, transformer.ln_f.eps as f32)
        };
        let widest = (3 * n_embd).max(inner);
        let (lanes_per_key, attn_chunk) = attention_layout(head_dim);
        let max_chunks = n_positions.div_ceil(attn_chunk);
        drop(up);
        let sms = context
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| format!("CUDA device {device_index}: {e}"))? as usize;
        let gemv_blocks_per_sm = kernels
            .gemv
            .occupancy_max_active_blocks_per_multiprocessor(GEMV_COLUMNS as u32, 4096, None)
            .map_err(|e| format!("the decode GEMV's occupancy: {e}"))?
            .max(1) as usize;
        // For measuring: size the products' grids for another number of blocks per SM.
        let gemv_blocks_per_sm =
            std::env::var("LLAVA_JP_GRAPH_GEMV_BLOCKS_PER_SM").ok().and_then(|v| v.parse().ok()).unwrap_or(gemv_blocks_per_sm);
        for (k_dim, n_dim) in [(n_embd, 3 * n_embd), (n_embd, n_embd), (n_embd, inner), (inner, n_embd)] {
            let (_, rows) = gemv_splits(k_dim, n_dim, gemv_blocks_per_sm * sms);
            if rows * 4 > MAX_DYNAMIC_SHARED {
                return Err(format!("graph decoding: a product over {k_dim} rows needs {rows} rows per block, more than shared memory holds"));
            }
        }
        if n_embd * 4 > MAX_DYNAMIC_SHARED {
            return Err(format!("graph decoding: a width of {n_embd} does not fit the logits kernel's shared memory"));
        }
        // Two blocks per SM: call 8 measured a grid sized by occupancy, each warp reading two
        // rows at a time, slower (0.130 against 0.091 ms).
        let logits_blocks = (2 * sms).min(vocab.div_ceil(8)).max(1);
        let state = memory.alloc(16, "the step's state")?;
        let h = memory.alloc(n_embd * 4, "the residual stream")?;
        // The step kernel keeps its two residual points' statistics apart (step_stats).
        let stats = memory.alloc(n_embd.div_ceil(GEMV_COLUMNS) * 2 * 2 * 4, "LayerNorm statistics")?;
        let qkv = memory.alloc(3 * n_embd * 4, "q, k, v")?;
        let fc_out = memory.alloc(inner * 4, "the MLP's activations")?;
        let parts = memory.alloc(GEMV_MAX_SPLITS * widest * 4, "GEMV partial sums")?;
        let chunk_acc = memory.alloc(n_head * max_chunks * head_dim * 4, "attention chunks")?;
        let chunk_ml = memory.alloc(n_head * max_chunks * 2 * 4, "attention chunk maxima")?;
        let n_counters = widest.div_ceil(GEMV_COLUMNS).max(1);
        let counters = memory.alloc(n_counters * 4, "block counters")?;
        // SAFETY: `counters` holds n_counters i32s; the kernels expect them zero.
        unsafe { result::memset_d8_sync(counters, 0, n_counters * 4) }.map_err(|e| format!("zeroing the block counters: {e}"))?;
        let best = memory.alloc(logits_blocks * 2 * 4, "arg max per block")?;
        let logits = memory.alloc(vocab * 4, "logits")?;
        let mut decoder = GraphDecoder {
            shape,
            bf16,
            activation,
            ln_f,
            wte,
            wpe,
            lm_head,
            layers,
            state,
            h,
            stats,
            qkv,
            fc_out,
            parts,
            chunk_acc,
            chunk_ml,
            counters,
            best,
            logits_blocks,
            sms,
            gemv_blocks_per_sm,
            logits,
            attn_chunk,
            lanes_per_key,
            max_chunks,
            kernels,
            step_kernel: None,
            use_step_kernel: false,
            prefill: None,
            vision: None,
            prefill_on: std::env::var("LLAVA_JP_GRAPH_PREFILL").map_or(true, |v| v != "0"),
            graph: None,
            last_cache_load: std::time::Duration::ZERO,
            stream,
            memory,
        };
        // The step kernel is the default where it runs (sm_90 and the model's shape): 12%
        // faster a step than the step's kernels on an H100 (1.275 against 1.448 ms at
        // llm-jp-1.3b), for a second copy of the layers' weights (2.4 GB there).
        // `LLAVA_JP_GRAPH_STEP=kernels` keeps to the step's kernels and that memory.
        let step = std::env::var("LLAVA_JP_GRAPH_STEP").ok();
        if let Some(asked) = step_kernel_choice(step.as_deref())? {
            match decoder.prepare_step_kernel() {
                Ok(()) => decoder.use_step_kernel = true,
                // Said only when asked for by name: elsewhere the fallback is the expected path.
                Err(why) if asked => eprintln!("graph decoding: the step's kernels one by one ({why})"),
                Err(_) => {}
            }
        }
        if let Err(why) = decoder.capture() {
            if !decoder.use_step_kernel {
                return Err(why);
            }
            eprintln!("graph decoding: the step's kernels one by one (the step kernel's graph: {why})");
            decoder.use_step_kernel = false;
            decoder.capture()?;
        }
        Ok(decoder)
    }

    /// The step kernel's grid (one block an SM, all resident), its tiling and buffers, and
    /// the layers' arguments in device memory; an error where the device or the model's shape
    /// does not take it.
    fn prepare_step_kernel(&mut self) -> Result<(), String> {
        // Bulk copies and mbarrier transactions: sm_90, and the source compiled for it.
        if !self.kernels.dependent {
            let (major, minor) = self.kernels.capability;
            return Err(format!("it needs sm_90 and programmatic launches (the device is sm_{major}{minor})"));
        }
        let splits = match std::env::var("LLAVA_JP_GRAPH_STEP_SPLITS") {
            Ok(v) => Some(parse_splits(&v).ok_or_else(|| format!("LLAVA_JP_GRAPH_STEP_SPLITS = {v:?}: expected four counts, as 5,16,4,16"))?),
            Err(_) => None,
        };
        let tiling = StepTiling::new(self.shape, self.bf16, self.sms, splits)?;
        let DecoderShape { n_layer, n_embd, n_head, .. } = self.shape;
        let step = &self.kernels.step;
        let static_shared = step
            .get_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
            .map_err(|e| format!("the step kernel's shared memory: {e}"))? as usize;
        let dynamic = tiling.dynamic_shared();
        if static_shared + dynamic > STEP_SHARED_LIMIT {
            return Err(format!("{} bytes of shared memory a block, more than {STEP_SHARED_LIMIT}", static_shared + dynamic));
        }
        step.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, dynamic as i32)
            .map_err(|e| format!("the step kernel's shared memory ({dynamic} bytes): {e}"))?;
        let per_sm = step
            .occupancy_max_active_blocks_per_multiprocessor(STEP_THREADS as u32, dynamic, None)
            .map_err(|e| format!("the step kernel's occupancy: {e}"))?;
        if per_sm == 0 {
            return Err("no block of the step kernel fits an SM".into());
        }
        let blocks = self.sms;
        // The cache's rows and lm_head's are copied in 16-byte units from where they start
        // (the products from the copies made below).
        for (i, l) in self.layers.iter().enumerate() {
            for (what, at) in [("k cache", l.k_cache), ("v cache", l.v_cache)] {
                if at % 16 != 0 {
                    return Err(format!("layer {i}'s {what} at {at:#x}, not 16-byte aligned"));
                }
            }
        }
        if self.lm_head % 16 != 0 {
            return Err(format!("lm_head at {:#x}, not 16-byte aligned", self.lm_head));
        }
        // The step kernel's own copy of each layer's products, a column block after another
        // (tile_by_column_blocks): a tile's rows are then one stretch of memory, which streams
        // at the memory's speed where rows of 512 bytes far apart do not (call 3).
        self.memory.context.bind_to_thread().map_err(|e| e.to_string())?;
        let elem = if self.bf16 { 2 } else { 4 };
        let shapes = step_products(self.shape);
        let mut tiled = Vec::with_capacity(self.layers.len());
        for (i, l) in self.layers.iter().enumerate() {
            let mut w = [0u64; 4];
            for (j, (at, (k, n))) in [l.c_attn.0, l.attn_proj.0, l.c_fc.0, l.mlp_proj.0].into_iter().zip(shapes).enumerate() {
                w[j] = tile_by_column_blocks(&mut self.memory, at, k, n, elem, &format!("layer {i}'s product {j}, by column blocks"))?;
            }
            tiled.push(w);
        }
        // cuMemcpy2D between device buffers returns before the copy ends, on the legacy stream,
        // which our non-blocking stream does not wait for: the fold below reads these copies.
        self.memory.context.synchronize().map_err(|e| format!("copying the step kernel's products by column blocks: {e}"))?;
        // Each layer's LayerNorms before c_attn and c_fc, folded into those products (G = w^T g,
        // B = bias + w^T b), for the kernel to apply the statistics after the product.
        let inner = self.shape.inner;
        let mut folds = Vec::with_capacity(self.layers.len());
        for i in 0..self.layers.len() {
            let at = self.memory.alloc((2 * 3 * n_embd + 2 * inner) * 4, &format!("layer {i}'s folded LayerNorms"))?;
            let (g1, b1) = (at, at + (3 * n_embd * 4) as u64);
            let (g2, b2) = (b1 + (3 * n_embd * 4) as u64, b1 + ((3 * n_embd + inner) * 4) as u64);
            folds.push([g1, b1, g2, b2]);
        }
        for ((l, w), fold) in self.layers.iter().zip(&tiled).zip(&folds) {
            let products = [(w[0], l.ln_1, l.c_attn.1, shapes[0], fold[0], fold[1]), (w[2], l.ln_2, l.c_fc.1, shapes[2], fold[2], fold[3])];
            for (w, (g, b), bias, (k_dim, n_dim), g_out, b_out) in products {
                let (k_dim, n_dim) = (k_dim as i32, n_dim as i32);
                let mut params = params![&w, &g, &b, &bias, &k_dim, &n_dim, &g_out, &b_out];
                let grid = ((n_dim as u32).div_ceil(256), 1);
                // SAFETY: the arguments match step_fold_layernorm's; every buffer holds what it reads or writes.
                unsafe { launch_kernel(&self.kernels.step_fold, &self.stream, grid, 256, 0, false, &mut params) }
                    .map_err(|e| format!("folding the step kernel's LayerNorms: {e}"))?;
            }
        }
        self.stream.synchronize().map_err(|e| format!("folding the step kernel's LayerNorms: {e}"))?;
        let layers: Vec<StepLayerArgs> = self
            .layers
            .iter()
            .zip(tiled)
            .zip(folds)
            .map(|((l, w), fold)| StepLayerArgs {
                w,
                b: [l.c_attn.1, l.attn_proj.1, l.c_fc.1, l.mlp_proj.1],
                ln1_g: l.ln_1.0,
                ln1_b: l.ln_1.1,
                ln2_g: l.ln_2.0,
                ln2_b: l.ln_2.1,
                k_cache: l.k_cache,
                v_cache: l.v_cache,
                fold,
                ln1_eps: l.eps.0,
                ln2_eps: l.eps.1,
                scale: l.scale,
                unused: 0.0,
            })
            .collect();
        // SAFETY: plain-old-data structs of u64/f32 fields, viewed as their bytes.
        let bytes = unsafe { std::slice::from_raw_parts(layers.as_ptr().cast::<u8>(), std::mem::size_of_val(layers.as_slice())) };
        let layers = self.memory.alloc(bytes.len(), "the step kernel's layers")?;
        // SAFETY: `layers` holds bytes.len() bytes; a synchronous copy from host memory.
        unsafe { result::memcpy_htod_sync(layers, bytes) }.map_err(|e| format!("copying the step kernel's layers: {e}"))?;
        let head_dim = n_embd / n_head;
        // The partial sums, then (8-byte aligned) the kernel's STEP_LL pairs of them; zeroed, so
        // that no pair carries a step's serial before that step writes it.
        let parts_bytes = (3 * n_layer * tiling.parts_per_layer + 2) * 4;
        let parts = self.memory.alloc(parts_bytes, "the step kernel's partial sums")?;
        // The chunks' accumulators and (max, sum), each then (8-byte aligned) as the kernel's
        // STEP_LL=2 pairs, zeroed as the partial sums are.
        let acc_bytes = (3 * n_layer * n_head * tiling.max_chunks * head_dim + 2) * 4;
        let chunk_acc = self.memory.alloc(acc_bytes, "the step kernel's attention chunks")?;
        let ml_bytes = (3 * n_layer * n_head * tiling.max_chunks * 2 + 2) * 4;
        let chunk_ml = self.memory.alloc(ml_bytes, "the step kernel's attention maxima")?;
        let counter_bytes = tiling.n_counters * STEP_PAD * 4;
        let counters = self.memory.alloc(counter_bytes, "the step kernel's counters")?;
        let zeroed = [(parts, parts_bytes, "partial sums"), (chunk_acc, acc_bytes, "attention chunks"), (chunk_ml, ml_bytes, "attention maxima"), (counters, counter_bytes, "counters")];
        for (at, bytes, what) in zeroed {
            // SAFETY: just allocated with that many bytes; the kernel expects them zero.
            unsafe { result::memset_d8_sync(at, 0, bytes) }.map_err(|e| format!("zeroing the step kernel's {what}: {e}"))?;
        }
        // cuMemsetD8 on device memory returns before it ends, on the legacy stream, which the
        // decoder's non-blocking stream does not wait for.
        self.memory.context.synchronize().map_err(|e| format!("zeroing the step kernel's buffers: {e}"))?;
        // The logits phase keeps one (value, index) per block of the grid.
        if blocks > self.logits_blocks {
            self.best = self.memory.alloc(blocks * 2 * 4, "arg max per block")?;
        }
        self.step_kernel = Some(StepKernel { blocks, tiling, layers, parts, chunk_acc, chunk_ml, counters });
        Ok(())
    }

    /// Whether the graph replays the step as one kernel (see [`Self::set_step_kernel`]).
    pub fn uses_step_kernel(&self) -> bool {
        self.use_step_kernel
    }

    /// Replays the step as one kernel (`true`, where the device runs it) or as its kernels one
    /// after another, recapturing the graph; both compute the same step, to f32 rounding.
    pub fn set_step_kernel(&mut self, on: bool) -> Result<(), String> {
        if on && self.step_kernel.is_none() {
            self.prepare_step_kernel()?;
        }
        self.stream.synchronize().map_err(|e| format!("decode stream: {e}"))?;
        let before = self.use_step_kernel;
        self.use_step_kernel = on;
        if let Err(why) = self.capture() {
            self.use_step_kernel = before;
            self.capture()?;
            return Err(why);
        }
        Ok(())
    }

    /// How long the last prompt's cache took to copy in (part of the first decode step).
    pub fn last_cache_load(&self) -> std::time::Duration {
        self.last_cache_load
    }

    /// The device's compute capability (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.kernels.capability
    }

    pub fn shape(&self) -> DecoderShape {
        self.shape
    }

    /// Whether this decoder was built from a model of `transformer`'s shapes (a cheap guard
    /// against handing generation another model's decoder).
    pub fn fits<B: Backend>(&self, transformer: &Gpt2Model<B>) -> bool {
        let [vocab, n_embd] = transformer.wte.weight.dims();
        self.shape.vocab == vocab
            && self.shape.n_embd == n_embd
            && self.shape.n_layer == transformer.h.len()
            && self.shape.n_head == transformer.n_head()
            && self.shape.n_positions == transformer.wpe.weight.dims()[0]
    }

    /// Copies a single prompt's prefilled cache (`[1, heads, tokens, head_dim]` per layer) in:
    /// device to device when the model is on burn's fused CUDA backend, through the host
    /// otherwise.
    pub fn load_cache<B: Backend>(&mut self, cache: &KvCache<B>) -> Result<(), String> {
        let DecoderShape { n_embd, n_head, n_positions, .. } = self.shape;
        let started = std::time::Instant::now();
        let layers = cache.layers();
        if layers.len() != self.layers.len() {
            return Err(format!("a cache of {} layers for a decoder of {}", layers.len(), self.layers.len()));
        }
        self.memory.context.bind_to_thread().map_err(|e| e.to_string())?;
        let elem = if self.bf16 { 2 } else { 4 };
        // What the copies read, kept until the stream has finished them.
        let mut sources: Vec<Source> = Vec::with_capacity(2 * layers.len());
        for (i, (slot, layer)) in layers.iter().zip(&self.layers).enumerate() {
            let Some((k, v)) = slot else { return Err(format!("layer {i}'s cache is empty")) };
            let [b, h, t, d] = k.dims();
            if b != 1 || h != n_head || h * d != n_embd || t > n_positions || v.dims() != k.dims() {
                return Err(format!("layer {i}'s cache is {:?}, expected [1, {n_head}, <= {n_positions}, {}]", k.dims(), n_embd / n_head));
            }
            for (tensor, ptr) in [(k, layer.k_cache), (v, layer.v_cache)] {
                let source = Source::of(tensor.clone(), self.bf16)?;
                // Each head's `t` rows land at the start of its `n_positions` rows.
                let row = t * d * elem;
                let copy = cudarc::driver::sys::CUDA_MEMCPY2D {
                    srcXInBytes: 0,
                    srcY: 0,
                    srcMemoryType: source.memory_type(),
                    srcHost: source.host_ptr(),
                    srcDevice: source.device_ptr(),
                    srcArray: std::ptr::null_mut(),
                    srcPitch: row,
                    dstXInBytes: 0,
                    dstY: 0,
                    dstMemoryType: cudarc::driver::sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                    dstHost: std::ptr::null_mut(),
                    dstDevice: ptr,
                    dstArray: std::ptr::null_mut(),
                    dstPitch: n_positions * d * elem,
                    WidthInBytes: row,
                    Height: h,
                };
                if row > 0 {
                    // SAFETY: the source holds h rows of `row` bytes (contiguous [1, h, t, d] in
                    // the decoder's dtype, checked by `Source::of`) and lives in `sources` until
                    // the stream is synchronised below; the destination holds h x n_positions x d.
                    unsafe { cudarc::driver::sys::cuMemcpy2DAsync_v2(&copy, self.stream.cu_stream()) }
                        .result()
                        .map_err(|e| format!("copying layer {i}'s cache to the decoder: {e}"))?;
                }
                sources.push(source);
            }
        }
        self.stream.synchronize().map_err(|e| format!("copying the prompt's cache: {e}"))?;
        drop(sources);
        self.last_cache_load = started.elapsed();
        Ok(())
    }

    /// Why this decoder cannot prefill a prompt itself, if it cannot: it needs a bf16 model,
    /// heads a multiple of 16 up to 128 wide (the flash kernel's), a width up to 4096 and an
    /// sm_80+ GPU, and not to be turned off (then burn prefills instead).
    pub fn prefill_unsupported(&self) -> Option<String> {
        let DecoderShape { n_embd, n_head, .. } = self.shape;
        let head_dim = n_embd / n_head;
        if !self.prefill_on {
            Some("turned off (LLAVA_JP_GRAPH_PREFILL=0 or set_prefill)".into())
        } else if !self.bf16 {
            Some("the model is f32 (the prefill's products and attention are bf16)".into())
        } else if head_dim % 16 != 0 || head_dim > 128 {
            Some(format!("heads are {head_dim} wide (the flash kernel takes multiples of 16 up to 128)"))
        } else if n_embd > PREFILL_MAX_WIDTH {
            Some(format!("the width {n_embd} is over {PREFILL_MAX_WIDTH}"))
        } else if self.kernels.capability.0 < 8 {
            Some(format!("the GPU is sm_{}{} (the flash kernel needs sm_80+)", self.kernels.capability.0, self.kernels.capability.1))
        } else {
            None
        }
    }

    /// Turns the decoder's own prefill on or off (off: generation prefills with burn and copies
    /// burn's cache in).
    pub fn set_prefill(&mut self, on: bool) {
        self.prefill_on = on;
    }

    /// Copies `model`'s vision tower (the layers its features come from) and projector in,
    /// so that [`Self::prefill_prompt`] encodes images too; errors when
    /// [`Self::vision_unsupported`] says why not.
    pub fn add_vision<B: Backend>(&mut self, model: &crate::model::LlavaModel<B>) -> Result<(), String> {
        if let Some(why) = self.vision_unsupported(model) {
            return Err(format!("vision: {why}"));
        }
        self.memory.context.bind_to_thread().map_err(|e| e.to_string())?;
        self.vision = Some(vision::Vision::new(model, &mut self.memory, self.kernels.capability)?);
        Ok(())
    }

    /// Why this decoder cannot encode `model`'s images itself, if it cannot (the same needs as
    /// the prefill's).
    pub fn vision_unsupported<B: Backend>(&self, model: &crate::model::LlavaModel<B>) -> Option<String> {
        vision::unsupported(model, self.bf16, self.kernels.capability)
    }

    /// Whether [`Self::prefill_prompt`] takes a prompt with `images` images.
    pub fn prefills_prompt(&self, images: usize) -> bool {
        self.prefill_unsupported().is_none() && (images == 0 || self.vision.is_some())
    }

    /// Prefills a single prompt from its token ids (-200 where each image goes, as
    /// [`crate::infer::Prompt`] has them) and images (`[3, size, size]` pixel values each),
    /// encoding the images here too; fills the cache for the decode steps that follow and
    /// returns the last position's arg max (`greedy`) or logits.
    pub fn prefill_prompt(&mut self, input_ids: &[i64], images: &[Vec<f32>], greedy: bool) -> Result<StepOutput, String> {
        if let Some(why) = self.prefill_unsupported() {
            return Err(format!("prefill: {why}"));
        }
        let DecoderShape { n_embd, vocab, n_positions, .. } = self.shape;
        let placeholders = input_ids.iter().filter(|&&id| id == crate::model::IMAGE_TOKEN_INDEX).count();
        if placeholders != images.len() {
            return Err(format!("prefill: {placeholders} image placeholder(s) but {} image(s)", images.len()));
        }
        if !images.is_empty() && self.vision.is_none() {
            return Err("prefill: the prompt has images but the decoder has no vision tower (add_vision)".into());
        }
        let image_tokens = self.vision.as_ref().map_or(0, |v| v.image_tokens());
        let mut sources: Vec<i32> = Vec::with_capacity(input_ids.len() + placeholders * image_tokens);
        let mut image = 0usize;
        for (i, &id) in input_ids.iter().enumerate() {
            if id == crate::model::IMAGE_TOKEN_INDEX {
                sources.extend((0..image_tokens).map(|r| -((image * image_tokens + r) as i32) - 1));
                image += 1;
            } else if id < 0 || id as usize >= vocab {
                return Err(format!("prefill: token {i} is {id}, outside the vocabulary of {vocab}"));
            } else {
                sources.push(id as i32);
            }
        }
        let tokens = sources.len();
        if tokens == 0 || tokens > n_positions {
            return Err(format!("prefill: a prompt of {tokens} tokens (images included), expected 1..={n_positions}"));
        }
        self.memory.context.bind_to_thread().map_err(|e| e.to_string())?;
        if self.prefill.is_none() {
            self.prefill = Some(Prefill::new(&mut self.memory, &self.kernels, self.shape)?);
        }
        let pf = self.prefill.as_mut().expect("made above");
        let s = &self.stream;
        for (j, pixels) in images.iter().enumerate() {
            let vision = self.vision.as_ref().expect("checked above");
            let at = pf.features + (j * image_tokens * n_embd * 4) as u64;
            vision.encode(&self.kernels, &mut pf.gemm, s, pixels, at).map_err(|e| format!("prefill: image {j}: {e}"))?;
        }
        // SAFETY: `sources` holds tokens <= n_positions i32s, as the buffer does; the copy is
        // synchronous with respect to the host vector.
        unsafe { result::memcpy_htod_async(pf.sources, &sources, s.cu_stream()) }.map_err(|e| format!("prefill: copying the prompt: {e}"))?;
        let bias = self.vision.as_ref().map_or(0, |v| v.last_bias());
        let (t, w) = (tokens as i32, n_embd as i32);
        let mut params = params![&pf.sources, &self.wte, &pf.features, &bias, &pf.embeds, &t, &w];
        let grid = ((tokens * n_embd).div_ceil(256) as u32, 1);
        // SAFETY: the kernel's parameters in order; buffers sized for n_positions tokens.
        unsafe { launch_kernel(&self.kernels.prefill_splice, s, grid, 256, 0, false, &mut params) }.map_err(|e| format!("prefill kernel splice: {e}"))?;
        let embeds = pf.embeds;
        self.run_prefill(embeds, tokens, greedy)
    }

    /// Prefills a single prompt from its input embeddings (`[tokens, n_embd]`: text and image
    /// features spliced by burn, no positions added), filling the cache for the decode steps
    /// that follow, and returns the last position's arg max (`greedy`) or logits. Errors when
    /// [`Self::prefill_unsupported`] says why not.
    pub fn prefill<B: Backend>(&mut self, inputs_embeds: Tensor<B, 2>, greedy: bool) -> Result<StepOutput, String> {
        if let Some(why) = self.prefill_unsupported() {
            return Err(format!("prefill: {why}"));
        }
        let DecoderShape { n_embd, n_positions, .. } = self.shape;
        let [tokens, width] = inputs_embeds.dims();
        if width != n_embd || tokens == 0 || tokens > n_positions {
            return Err(format!("prefill: embeddings of shape [{tokens}, {width}], expected [1..={n_positions}, {n_embd}]"));
        }
        self.memory.context.bind_to_thread().map_err(|e| e.to_string())?;
        if self.prefill.is_none() {
            self.prefill = Some(Prefill::new(&mut self.memory, &self.kernels, self.shape)?);
        }
        let embeds = Source::of(inputs_embeds, true)?;
        let ptr = match &embeds {
            Source::Device { ptr, .. } => *ptr,
            Source::Host(bytes) => {
                let pf = self.prefill.as_ref().expect("made above");
                // SAFETY: `embeds` holds n_positions x n_embd bf16s, `bytes` tokens x n_embd.
                unsafe { result::memcpy_htod_sync(pf.embeds, bytes.as_ref()) }.map_err(|e| format!("copying the prompt's embeddings: {e}"))?;
                pf.embeds
            }
        };
        let output = self.run_prefill(ptr, tokens, greedy);
        // burn's memory is held until the stream has read it (`run_prefill` waits for it).
        drop(embeds);
        output
    }

    /// The language model over `tokens` input embeddings at `embeds` (bf16, device), then the
    /// last position's logits; waits for the stream.
    fn run_prefill(&mut self, embeds_ptr: u64, tokens: usize, greedy: bool) -> Result<StepOutput, String> {
        let DecoderShape { n_embd, n_head, inner, n_positions, .. } = self.shape;
        let pf = self.prefill.as_mut().expect("made above");
        let k = &self.kernels;
        let s = &self.stream;
        let head_dim = n_embd / n_head;
        let (t, w, inner_i, hd, n_pos) = (tokens as i32, n_embd as i32, inner as i32, head_dim as i32, n_positions as i32);
        let null = 0u64;
        let rows_grid = (tokens as u32, 1);
        let elementwise = |count: usize| ((count.div_ceil(256)) as u32, 1);
        let run = |name: &str, r: Result<(), DriverError>| r.map_err(|e| format!("prefill kernel {name}: {e}"));
        // SAFETY (every launch and product): the parameters are the kernels' in order, device
        // addresses of buffers sized for n_positions tokens (`Prefill::new`, `new`), and
        // `tokens` <= n_positions; everything runs in order on the decoder's stream.
        let (gamma, beta) = self.layers[0].ln_1;
        let eps = self.layers[0].eps.0;
        let mut params = params![&pf.h, &embeds_ptr, &self.wpe, &null, &null, &gamma, &beta, &eps, &pf.xn, &w];
        run("embeddings + ln_1", unsafe { launch_kernel(&k.prefill_residual_layernorm, s, rows_grid, 256, 0, false, &mut params) })?;
        for (i, layer) in self.layers.iter().enumerate() {
            unsafe { pf.gemm.bf16_to_f32(s, pf.xn, layer.c_attn.0, pf.y, (tokens, n_embd, 3 * n_embd)) }?;
            let mut params = params![&pf.y, &layer.c_attn.1, &pf.q, &layer.k_cache, &layer.v_cache, &t, &w, &hd, &n_pos];
            run("split q, k, v", unsafe { launch_kernel(&k.prefill_split_qkv, s, elementwise(tokens * 3 * n_embd), 256, 0, false, &mut params) })?;
            let cache_head = (n_positions * head_dim) as i64;
            let flash = FlashParams {
                batch: 1,
                heads: n_head as i64,
                queries: tokens as i64,
                keys: tokens as i64,
                q_stride: [(tokens * n_embd) as i64, head_dim as i64, n_embd as i64, 1],
                k_stride: [n_head as i64 * cache_head, cache_head, head_dim as i64, 1],
                v_stride: [n_head as i64 * cache_head, cache_head, head_dim as i64, 1],
                mask_stride: [0, 0, pf.mask_ld as i64, 1],
                do_stride: [0; 4],
                scale_log2e: ((layer.scale as f64 * std::f64::consts::LOG2_E) as f32).to_bits() as i64,
                scale: layer.scale.to_bits() as i64,
                drop_below: 0,
                keep_scale: 1f32.to_bits() as i64,
                out_stride: [0; 3],
                tile_map: 0,
            };
            // The seed's and the tile map's places, unread, filled by `q`.
            let mut params = params![&pf.q, &layer.k_cache, &layer.v_cache, &pf.mask, &pf.q, &pf.q, &pf.attn, &pf.lse, &flash];
            let grid = (tokens.div_ceil(FLASH_QUERIES) as u32, n_head as u32);
            run("flash attention", unsafe { launch_kernel(&pf.flash, s, grid, 128, 0, false, &mut params) })?;
            unsafe { pf.gemm.bf16_to_f32(s, pf.attn, layer.attn_proj.0, pf.y, (tokens, n_embd, n_embd)) }?;
            let (gamma, beta) = layer.ln_2;
            let eps = layer.eps.1;
            let mut params = params![&pf.h, &null, &null, &pf.y, &layer.attn_proj.1, &gamma, &beta, &eps, &pf.xn, &w];
            run("attention residual + ln_2", unsafe { launch_kernel(&k.prefill_residual_layernorm, s, rows_grid, 256, 0, false, &mut params) })?;
            unsafe { pf.gemm.bf16_to_f32(s, pf.xn, layer.c_fc.0, pf.y, (tokens, n_embd, inner)) }?;
            let mut params = params![&pf.y, &layer.c_fc.1, &pf.xn, &t, &inner_i, &self.activation];
            run("c_fc bias + activation", unsafe { launch_kernel(&k.prefill_bias_activation, s, elementwise(tokens * inner), 256, 0, false, &mut params) })?;
            unsafe { pf.gemm.bf16_to_f32(s, pf.xn, layer.mlp_proj.0, pf.y, (tokens, inner, n_embd)) }?;
            // The next layer's ln_1; after the last layer, the logits kernel normalises the one
            // row it reads itself.
            let ((gamma, beta), eps) = match self.layers.get(i + 1) {
                Some(next) => (next.ln_1, next.eps.0),
                None => ((0, 0), 0.0),
            };
            let mut params = params![&pf.h, &null, &null, &pf.y, &layer.mlp_proj.1, &gamma, &beta, &eps, &pf.xn, &w];
            run("mlp residual + ln_1", unsafe { launch_kernel(&k.prefill_residual_layernorm, s, rows_grid, 256, 0, false, &mut params) })?;
        }
        let last = t - 1;
        let mut params = params![&pf.h, &last, &self.h, &self.stats, &w];
        let grid = (n_embd.div_ceil(GEMV_COLUMNS) as u32, 1);
        run("last row", unsafe { launch_kernel(&k.prefill_last_row, s, grid, GEMV_COLUMNS as u32, 0, false, &mut params) })?;
        // The logits kernel moves the state on from the last prompt position, as a step does.
        let state = [0i32, last, 0, 0];
        // SAFETY: as in `step`.
        unsafe { result::memcpy_htod_async(self.state, &state, s.cu_stream()) }.map_err(|e| format!("prefill state: {e}"))?;
        self.launch_logits(false).map_err(|e| format!("prefill kernel ln_f + logits: {e}"))?;
        self.read_output(greedy)
    }

    /// Runs one step: `token` at `position` (both must follow the cache), and returns the next
    /// token (`greedy`) or the logits.
    pub fn step(&mut self, token: i64, position: usize, greedy: bool) -> Result<StepOutput, String> {
        if token < 0 || token as usize >= self.shape.vocab {
            return Err(format!("token {token} outside the vocabulary of {}", self.shape.vocab));
        }
        if position >= self.shape.n_positions {
            return Err(format!("position {position} beyond the model's {} positions", self.shape.n_positions));
        }
        let state = [token as i32, position as i32, 0, 0];
        let stream = self.stream.cu_stream();
        // SAFETY: `state` is 16 bytes on the device; the copy finishes before the stream
        // synchronises below, and `state` lives until then.
        unsafe { result::memcpy_htod_async(self.state, &state, stream) }.map_err(|e| format!("step state: {e}"))?;
        self.graph.as_ref().expect("captured in new").launch().map_err(|e| format!("decode graph launch: {e}"))?;
        self.read_output(greedy)
    }

    /// Waits for the stream and reads what the logits kernel left: the arg max (`greedy`) or
    /// the logits.
    fn read_output(&self, greedy: bool) -> Result<StepOutput, String> {
        let stream = self.stream.cu_stream();
        if greedy {
            let mut out = [0i32; 4];
            // SAFETY: reads the 16-byte state after the graph, on the same stream.
            unsafe { result::memcpy_dtoh_async(&mut out, self.state, stream) }.map_err(|e| format!("reading the token: {e}"))?;
            self.stream.synchronize().map_err(|e| format!("decode step: {e}"))?;
            Ok(StepOutput::Token(out[2] as i64))
        } else {
            let mut logits = vec![0f32; self.shape.vocab];
            // SAFETY: `logits` holds vocab f32s, as the device buffer does.
            unsafe { result::memcpy_dtoh_async(&mut logits, self.logits, stream) }.map_err(|e| format!("reading the logits: {e}"))?;
            self.stream.synchronize().map_err(|e| format!("decode step: {e}"))?;
            Ok(StepOutput::Logits(logits))
        }
    }

    /// Captures the graph generation replays (the step kernel or the kernels, as
    /// `use_step_kernel` says); the graph before stays where the capture fails.
    fn capture(&mut self) -> Result<(), String> {
        self.graph = Some(self.capture_graph(self.use_step_kernel)?);
        Ok(())
    }

    /// A graph of one step: the step kernel (`step_kernel`, where prepared) or the kernels.
    fn capture_graph(&self, step_kernel: bool) -> Result<CudaGraph, String> {
        self.memory.context.bind_to_thread().map_err(|e| e.to_string())?;
        // Relaxed: other threads (cubecl's) may allocate or load modules meanwhile.
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(|e| format!("beginning the decode graph's capture: {e}"))?;
        let launched = match (step_kernel, &self.step_kernel) {
            (true, Some(step)) => self.launch_step_kernel(step),
            (true, None) => Err("the step kernel was not prepared".into()),
            (false, _) => self.launch_step(None),
        };
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0)).map_err(|e| format!("ending the decode graph's capture: {e}"))?;
        launched?;
        let graph = graph.ok_or("the decode graph's capture recorded nothing")?;
        graph.upload().map_err(|e| format!("uploading the decode graph: {e}"))?;
        Ok(graph)
    }

    /// Where a step's time goes at `position` (with whatever the cache holds): each kernel
    /// launched on its own between timing events, summed per kernel over the layers, and the
    /// captured graph's time per step over `replays` replays (from `position` on).
    pub fn profile(&mut self, position: usize, replays: usize) -> Result<DecodeProfile, String> {
        if position + replays >= self.shape.n_positions {
            return Err(format!("profiling {replays} steps from position {position} passes the model's {} positions", self.shape.n_positions));
        }
        let stream = self.stream.cu_stream();
        let state = [0i32, position as i32, 0, 0];
        let event = || self.stream.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| e.to_string());
        // SAFETY: as in `step`.
        unsafe { result::memcpy_htod_async(self.state, &state, stream) }.map_err(|e| e.to_string())?;
        let marks = std::cell::RefCell::new(vec![("start", event()?)]);
        self.launch_step(Some(&marks))?;
        self.stream.synchronize().map_err(|e| e.to_string())?;
        let marks = marks.into_inner();
        let mut kernels: Vec<(String, f64, usize)> = vec![];
        for pair in marks.windows(2) {
            let ms = pair[0].1.elapsed_ms(&pair[1].1).map_err(|e| e.to_string())? as f64;
            match kernels.iter_mut().find(|k| k.0 == pair[1].0) {
                Some(k) => {
                    k.1 += ms;
                    k.2 += 1;
                }
                None => kernels.push((pair[1].0.to_string(), ms, 1)),
            }
        }
        let time_graph = |graph: &CudaGraph| -> Result<f64, String> {
            // SAFETY: as in `step`.
            unsafe { result::memcpy_htod_async(self.state, &state, stream) }.map_err(|e| e.to_string())?;
            let start = event()?;
            for _ in 0..replays {
                graph.launch().map_err(|e| e.to_string())?;
            }
            let end = event()?;
            Ok(start.elapsed_ms(&end).map_err(|e| e.to_string())? as f64 / replays.max(1) as f64)
        };
        let graph_ms = time_graph(self.graph.as_ref().expect("captured in new"))?;
        // The other way of running the step, in the same process, where it can be captured.
        let other_ms = match self.capture_graph(!self.use_step_kernel) {
            Ok(other) => {
                let ms = time_graph(&other);
                self.stream.synchronize().map_err(|e| e.to_string())?;
                Some(ms?)
            }
            Err(_) => None,
        };
        let launched_ms = kernels.iter().map(|k| k.1).sum();
        let (step_ms, kernels_ms) = if self.use_step_kernel { (Some(graph_ms), other_ms) } else { (other_ms, Some(graph_ms)) };
        Ok(DecodeProfile {
            graph_step_ms: graph_ms,
            step_kernel_graph_ms: step_ms,
            kernels_graph_ms: kernels_ms,
            step_kernel_blocks: self.step_kernel.as_ref().map_or(0, |k| k.blocks),
            launched_step_ms: launched_ms,
            kernels,
            gemv_blocks_per_sm: self.gemv_blocks_per_sm,
            dependent_launches: self.kernels.dependent,
        })
    }

    /// The step's kernels in order: captured into the graph, or launched one by one between
    /// timing events (`marks`, for [`Self::profile`]).
    fn launch_step(&self, marks: Option<&std::cell::RefCell<Vec<(&'static str, cudarc::driver::CudaEvent)>>>) -> Result<(), String> {
        let DecoderShape { n_embd, n_head, n_positions, .. } = self.shape;
        self.memory.context.bind_to_thread().map_err(|e| e.to_string())?;
        let k = &self.kernels;
        let s = &self.stream;
        let launch = |name: &'static str, result: Result<(), DriverError>| {
            result.map_err(|e| format!("decode kernel {name}: {e}"))?;
            if let Some(marks) = marks {
                let event = s.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| e.to_string())?;
                marks.borrow_mut().push((name, event));
            }
            Ok::<(), String>(())
        };
        let (d, head_dim) = (n_embd as i32, (n_embd / n_head) as i32);
        let (attn_chunk, lanes_per_key, max_chunks) = (self.attn_chunk as i32, self.lanes_per_key as i32, self.max_chunks as i32);
        let n_pos = n_positions as i32;
        // The first kernel follows the host's copy of the state, not a kernel.
        let grid = (n_embd.div_ceil(GEMV_COLUMNS) as u32, 1);
        let mut params = params![&self.state, &self.wte, &self.wpe, &self.h, &self.stats, &d];
        // SAFETY (every launch): the parameters are the kernels' in order, device addresses of
        // buffers sized in `new` for these shapes.
        launch("embed", unsafe { launch_kernel(&k.embed, s, grid, GEMV_COLUMNS as u32, 0, false, &mut params) })?;
        let gemv = |name: &'static str, w: u64, args: GemvArgs| {
            let (args, splits) = with_splits(args, self.gemv_blocks_per_sm * self.sms);
            let grid = (args.n_dim.max(1) as usize).div_ceil(GEMV_COLUMNS) as u32;
            let mut params = params![&args, &w];
            let shared = (args.rows_per_split * 4) as u32;
            launch(name, unsafe { launch_kernel(&k.gemv, s, (grid, splits as u32), GEMV_COLUMNS as u32, shared, k.dependent, &mut params) })
        };
        for layer in &self.layers {
            let [c_attn, attn_proj, c_fc, mlp_proj] = self.layer_products(layer);
            gemv(c_attn.0, c_attn.1, c_attn.2)?;
            let mut params = params![
                &self.state,
                &self.qkv,
                &layer.k_cache,
                &layer.v_cache,
                &self.chunk_acc,
                &self.chunk_ml,
                &d,
                &head_dim,
                &n_pos,
                &max_chunks,
                &attn_chunk,
                &lanes_per_key,
                &layer.scale,
            ];
            let grid = (n_head as u32, max_chunks as u32);
            launch("attention", unsafe { launch_kernel(&k.attention, s, grid, ATTN_THREADS as u32, 0, k.dependent, &mut params) })?;
            for (name, w, args) in [attn_proj, c_fc, mlp_proj] {
                gemv(name, w, args)?;
            }
        }
        launch("ln_f + logits + arg max", self.launch_logits(k.dependent))
    }

    /// A layer's four products in order (c_attn, attn.c_proj, c_fc, mlp.c_proj): name,
    /// weights and arguments, rows per split not yet set (they follow the grid).
    fn layer_products(&self, layer: &Layer) -> [(&'static str, u64, GemvArgs); 4] {
        let DecoderShape { n_embd, n_head, inner, .. } = self.shape;
        let base = GemvArgs {
            x: 0,
            h: self.h,
            stats: self.stats,
            gamma: 0,
            beta: 0,
            eps: 0.0,
            bias: 0,
            parts: self.parts,
            out: 0,
            counters: self.counters,
            state: self.state,
            chunk_acc: self.chunk_acc,
            chunk_ml: self.chunk_ml,
            head_dim: (n_embd / n_head) as i32,
            attn_chunk: self.attn_chunk as i32,
            max_chunks: self.max_chunks as i32,
            k_dim: 0,
            n_dim: 0,
            rows_per_split: 0,
            prologue: PROLOGUE_PLAIN,
            epilogue: EPILOGUE_STORE,
            activation: self.activation,
        };
        let product = |(w, bias): (u64, u64), k_dim: usize, n_dim: usize, input: Input, epilogue: i32, out: u64| {
            let mut args = GemvArgs { bias, out, k_dim: k_dim as i32, n_dim: n_dim as i32, epilogue, ..base };
            match input {
                Input::Vector(x) => args.x = x,
                Input::LayerNorm(gamma, beta, eps) => {
                    args.prologue = PROLOGUE_LAYERNORM;
                    (args.gamma, args.beta, args.eps) = (gamma, beta, eps);
                }
                Input::Attention => args.prologue = PROLOGUE_ATTENTION,
            }
            (w, args)
        };
        let ln_1 = Input::LayerNorm(layer.ln_1.0, layer.ln_1.1, layer.eps.0);
        let ln_2 = Input::LayerNorm(layer.ln_2.0, layer.ln_2.1, layer.eps.1);
        let c_attn = product(layer.c_attn, n_embd, 3 * n_embd, ln_1, EPILOGUE_STORE, self.qkv);
        let attn_proj = product(layer.attn_proj, n_embd, n_embd, Input::Attention, EPILOGUE_RESIDUAL, 0);
        let c_fc = product(layer.c_fc, n_embd, inner, ln_2, EPILOGUE_ACTIVATE, self.fc_out);
        let mlp_proj = product(layer.mlp_proj, inner, n_embd, Input::Vector(self.fc_out), EPILOGUE_RESIDUAL, 0);
        [
            ("attn.c_attn", c_attn.0, c_attn.1),
            ("attn.c_proj", attn_proj.0, attn_proj.1),
            ("mlp.c_fc", c_fc.0, c_fc.1),
            ("mlp.c_proj", mlp_proj.0, mlp_proj.1),
        ]
    }

    /// The whole step as one cooperative launch of the step kernel.
    fn launch_step_kernel(&self, step: &StepKernel) -> Result<(), String> {
        let DecoderShape { n_layer, n_embd, n_head, inner, vocab, n_positions } = self.shape;
        let t = &step.tiling;
        let args = StepArgs {
            layers: step.layers,
            wte: self.wte,
            wpe: self.wpe,
            lm_head: self.lm_head,
            lnf_g: self.ln_f.0,
            lnf_b: self.ln_f.1,
            h: self.h,
            stats: self.stats,
            logits: self.logits,
            best: self.best,
            parts: step.parts,
            chunk_acc: step.chunk_acc,
            chunk_ml: step.chunk_ml,
            state: self.state,
            counters: step.counters,
            lnf_eps: self.ln_f.2,
            n_layer: n_layer as i32,
            n_embd: n_embd as i32,
            n_head: n_head as i32,
            inner: inner as i32,
            vocab: vocab as i32,
            n_positions: n_positions as i32,
            activation: self.activation,
            rows: t.rows.map(|r| r as i32),
            attn_keys: t.attn_keys as i32,
            max_chunks: t.max_chunks as i32,
            logits_rows: t.logits_rows as i32,
            parts_per_layer: t.parts_per_layer as i32,
            n_counters: t.n_counters as i32,
            xs_floats: t.xs_floats as i32,
        };
        let mut params = params![&args];
        let shared = t.dynamic_shared() as u32;
        // SAFETY: `StepArgs` mirrors the kernel's parameter; its addresses are the decoder's
        // buffers and the step kernel's, sized in `new` / `prepare_step_kernel` from `t`.
        unsafe { launch_cooperative(&self.kernels.step, &self.stream, step.blocks as u32, STEP_THREADS as u32, shared, &mut params) }
            .map_err(|e| format!("decode step kernel ({} blocks): {e}", step.blocks))
    }

    /// ln_f, the logits and their arg max, from `h` and its statistics; the arg max becomes the
    /// state's next token and the position moves on.
    fn launch_logits(&self, dependent: bool) -> Result<(), DriverError> {
        let DecoderShape { n_embd, vocab, .. } = self.shape;
        let (v, d) = (vocab as i32, n_embd as i32);
        let (gamma, beta, eps) = self.ln_f;
        let mut params = params![
            &self.h,
            &self.stats,
            &gamma,
            &beta,
            &eps,
            &self.lm_head,
            &self.logits,
            &self.best,
            &self.counters,
            &self.state,
            &v,
            &d,
        ];
        let grid = (self.logits_blocks as u32, 1);
        let shared = (n_embd * 4) as u32;
        // SAFETY: the parameters are the kernel's in order, device addresses of buffers sized
        // in `new`.
        unsafe { launch_kernel(&self.kernels.logits, &self.stream, grid, 256, shared, dependent, &mut params) }
    }
}

/// A copy of `w` ([k, n] row-major, `elem` bytes a value) by column blocks: block c (columns
/// from `STEP_COLUMNS` x c, at most that many) as a [k, its width] matrix of its own, the
/// blocks one after another, so that any rows of one block are one contiguous stretch.
fn tile_by_column_blocks(memory: &mut Memory, w: u64, k: usize, n: usize, elem: usize, what: &str) -> Result<u64, String> {
    let tiled = memory.alloc(k * n * elem, what)?;
    for c in 0..n.div_ceil(STEP_COLUMNS) {
        let cols = STEP_COLUMNS.min(n - c * STEP_COLUMNS);
        let copy = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            srcHost: std::ptr::null(),
            srcDevice: w + (c * STEP_COLUMNS * elem) as u64,
            srcArray: std::ptr::null_mut(),
            srcPitch: n * elem,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            dstHost: std::ptr::null_mut(),
            dstDevice: tiled + (c * STEP_COLUMNS * k * elem) as u64,
            dstArray: std::ptr::null_mut(),
            dstPitch: cols * elem,
            WidthInBytes: cols * elem,
            Height: k,
        };
        // SAFETY: both ranges lie in allocations of k x n values (`w` the decoder's weights).
        unsafe { sys::cuMemcpy2D_v2(&copy) }.result().map_err(|e| format!("copying {what}: {e}"))?;
    }
    Ok(tiled)
}

/// `args` with its rows per split for a grid of `slots` blocks at once, and its splits.
fn with_splits(mut args: GemvArgs, slots: usize) -> (GemvArgs, usize) {
    let (splits, rows) = gemv_splits(args.k_dim as usize, args.n_dim as usize, slots);
    args.rows_per_split = rows as i32;
    (args, splits)
}

/// A product's row splits and rows per split: no more blocks than `slots` (the GPU's blocks
/// at once: a second, partial wave would cost a whole one's latency), each split a multiple
/// of eight rows (one per warp of the block).
fn gemv_splits(k_dim: usize, n_dim: usize, slots: usize) -> (usize, usize) {
    let column_blocks = n_dim.div_ceil(GEMV_COLUMNS).max(1);
    let splits = (slots / column_blocks).clamp(1, GEMV_MAX_SPLITS).min(k_dim.div_ceil(GEMV_MIN_ROWS).max(1));
    let rows = k_dim.div_ceil(splits).div_ceil(8) * 8;
    (k_dim.div_ceil(rows).max(1), rows.max(8))
}

impl Drop for GraphDecoder {
    fn drop(&mut self) {
        // The graph goes before the memory it reads; nothing may still run on it.
        let _ = self.stream.synchronize();
        self.graph = None;
    }
}

impl Kernels {
    fn load(context: &Arc<CudaContext>, bf16: bool) -> Result<Self, String> {
        let major = context
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .map_err(|e| format!("the CUDA device's compute capability: {e}"))?;
        // Programmatic dependent launches need sm_90's `griddepcontrol`; the switch is there to
        // measure what they bring.
        let dependent = major >= 9 && std::env::var("LLAVA_JP_GRAPH_PDL").map_or(true, |v| v != "0");
        let mut options: Vec<String> = if dependent { vec!["-DGRAPH_DECODE_PDL=1".into()] } else { vec![] };
        // For measuring variants without a rebuild, e.g. "-DGEMV_UNROLL=16".
        if let Ok(extra) = std::env::var("LLAVA_JP_GRAPH_NVRTC_OPTIONS") {
            options.extend(extra.split_whitespace().map(String::from));
        }
        let options = cudarc::nvrtc::CompileOptions { arch: dependent.then_some("compute_90"), options, ..Default::default() };
        let minor = context
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
            .map_err(|e| format!("the CUDA device's compute capability: {e}"))?;
        // `LLAVA_JP_GRAPH_SOURCE`: a variant of src/graph_decode.cu (same entry points and
        // arguments) read from a file, to time it on the GPU machine without another build.
        let decode_source = crate::cuda_kernel::source_or_file("LLAVA_JP_GRAPH_SOURCE", SOURCE)?;
        let source = format!("{decode_source}\n{PREFILL_SOURCE}");
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, options)
            .map_err(|e| format!("NVRTC on src/graph_decode.cu and src/graph_prefill.cu: {e:?}"))?;
        let module = context.load_module(ptx).map_err(|e| format!("loading the decode kernels: {e}"))?;
        let suffix = if bf16 { "bf16" } else { "f32" };
        let function = |name: String| module.load_function(&name).map_err(|e| format!("decode kernel {name}: {e}"));
        Ok(Kernels {
            dependent,
            embed: function(format!("embed_{suffix}"))?,
            gemv: function(format!("gemv_{suffix}"))?,
            attention: function(format!("attention_{suffix}"))?,
            logits: function(format!("logits_{suffix}"))?,
            step: function(format!("decode_step_{suffix}"))?,
            step_fold: function(format!("step_fold_layernorm_{suffix}"))?,
            prefill_residual_layernorm: function("prefill_residual_layernorm".into())?,
            prefill_split_qkv: function("prefill_split_qkv".into())?,
            prefill_bias_activation: function("prefill_bias_activation".into())?,
            prefill_last_row: function("prefill_last_row".into())?,
            prefill_splice: function("prefill_splice".into())?,
            vision_patches: function("vision_patches".into())?,
            vision_embeddings: function("vision_embeddings".into())?,
            vision_take_rows: function("vision_take_rows".into())?,
            capability: (major, minor),
            _module: module,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fields of `struct name` in `source` as C lays them out: (name, offset), and the
    /// struct's size and alignment. Knows what the decode source's argument structs are made
    /// of: int, float, unsigned, pointers, arrays of them, and structs defined before.
    fn c_layout(source: &str, name: &str) -> (Vec<(String, usize)>, usize, usize) {
        let start = source.find(&format!("\nstruct {name} {{")).unwrap_or_else(|| panic!("struct {name} is not in the source"));
        let body = &source[start..];
        let body = &body[body.find('{').unwrap() + 1..body.find("};").unwrap()];
        let body: Vec<&str> = body.lines().map(|l| l.split("//").next().unwrap()).collect();
        let (mut fields, mut offset, mut align) = (vec![], 0usize, 1usize);
        for decl in body.join(" ").split(';').map(str::trim).filter(|d| !d.is_empty()) {
            // `[const] type declarator, declarator`: a declarator is `*`s, a name, maybe `[n]`.
            let decl = decl.strip_prefix("const ").unwrap_or(decl).replace('*', " * ");
            let (type_name, declarators) = decl.trim().split_once(' ').unwrap();
            let (size, al) = match type_name {
                "int" | "float" | "unsigned" => (4, 4),
                "void" | "bf16" => (0, 1),
                other => {
                    let (_, size, al) = c_layout(source, other);
                    (size, al)
                }
            };
            for declarator in declarators.split(',') {
                let pointer = declarator.contains('*');
                let declarator = declarator.replace('*', "");
                let (field, count) = match declarator.trim().split_once('[') {
                    Some((f, n)) => (f.trim().to_string(), n.trim_end_matches(']').parse::<usize>().unwrap()),
                    None => (declarator.trim().to_string(), 1),
                };
                let (size, al) = if pointer { (8, 8) } else { (size, al) };
                assert!(size > 0, "struct {name}: field {field} has no size");
                offset = offset.div_ceil(al) * al;
                fields.push((field, offset));
                offset += size * count;
                align = align.max(al);
            }
        }
        (fields, offset.div_ceil(align) * align, align)
    }

    /// The parser against layouts a C compiler gives: padding before a pointer, arrays, a
    /// nested struct's alignment, several declarators on one line, `const` and comments.
    #[test]
    fn c_layout_lays_out_as_c_does() {
        let source = "\nstruct Inner {\n    int a;\n    const float* p;  // 8-aligned\n};\n\
                      \nstruct Outer {\n    float x;\n    Inner inner;\n    int *q, r[3];\n    unsigned u;\n};\n";
        let (inner, size, align) = c_layout(source, "Inner");
        assert_eq!(inner, vec![("a".to_string(), 0), ("p".to_string(), 8)]);
        assert_eq!((size, align), (16, 8));
        let (outer, size, align) = c_layout(source, "Outer");
        let names_offsets = [("x", 0), ("inner", 8), ("q", 24), ("r", 32), ("u", 44)];
        assert_eq!(outer, names_offsets.map(|(n, o)| (n.to_string(), o)).to_vec());
        assert_eq!((size, align), (48, 8));
    }

    /// The step kernel unless told otherwise; a misspelt value refused by name.
    #[test]
    fn step_kernel_choice_reads_the_variable() {
        assert_eq!(step_kernel_choice(None), Ok(Some(false)));
        assert_eq!(step_kernel_choice(Some("kernel")), Ok(Some(true)));
        assert_eq!(step_kernel_choice(Some("kernels")), Ok(None));
        let why = step_kernel_choice(Some("Kernel")).unwrap_err();
        assert!(why.contains("LLAVA_JP_GRAPH_STEP = \"Kernel\"") && why.contains("\"kernels\""), "{why}");
    }

    /// llm-jp-1.3b's step on an H100 / H200 (132 SMs): every product in at most one tile a
    /// block, the attention's chunks and the logits' rows one stage each, the ring and input
    /// rows within an SM's shared memory (with ~22 KB of static arrays); and widths the bulk
    /// copies cannot move refused by name.
    #[test]
    fn step_tiling_at_full_size() {
        let shape = DecoderShape { n_layer: 24, n_embd: 2048, n_head: 16, inner: 8192, vocab: 50688, n_positions: 2048 };
        let t = StepTiling::new(shape, true, 132, None).unwrap();
        assert_eq!(t.rows, [416, 128, 512, 512]);
        let products: [(usize, usize); 4] = [(2048, 6144), (2048, 2048), (2048, 8192), (8192, 2048)];
        for ((k, n), rows) in products.into_iter().zip(t.rows) {
            assert!(k.div_ceil(rows) * n.div_ceil(STEP_COLUMNS) <= 132, "{k}x{n} in tiles of {rows} rows");
        }
        assert_eq!((t.attn_keys, t.max_chunks, t.logits_rows), (64, 32, 8));
        assert_eq!(t.parts_per_layer, 5 * 6144 + 16 * 2048 + 4 * 8192 + 16 * 2048);
        assert_eq!(t.n_counters, 2 + 24 * (24 + 16 + 1 + 32 + 1 + 2 * 8));
        assert!(t.dynamic_shared() + 23 * 1024 <= STEP_SHARED_LIMIT, "{} bytes of dynamic shared memory", t.dynamic_shared());
        let odd = DecoderShape { n_embd: 13, n_head: 1, inner: 52, ..shape };
        let why = StepTiling::new(odd, true, 132, None).unwrap_err();
        assert!(why.contains("n_embd = 13"), "{why}");
        // Other split counts: c_fc's and mlp.c_proj's tiles halved.
        let halved = StepTiling::new(shape, true, 132, Some([5, 16, 8, 32])).unwrap();
        assert_eq!(halved.rows, [416, 128, 256, 256]);
        assert_eq!(parse_splits("5, 16,8,32"), Some([5, 16, 8, 32]));
        assert_eq!(parse_splits("5,16,8"), None);
        assert_eq!(parse_splits("5,0,8,3"), None);
        let deeper = StepTiling::new(shape, true, 132, Some([5, 16, 4, 9000])).unwrap_err();
        assert!(deeper.contains("9000 splits of a product 8192 rows deep"), "{deeper}");
    }

    /// Each Rust mirror of a kernel's argument struct has the source's fields, in its order, at
    /// its offsets, and its size: a field added to one side only would shift every later one
    /// without any error at launch.
    #[test]
    fn argument_structs_match_the_source() {
        macro_rules! rust_layout {
            ($t:ty: $($f:ident),* $(,)?) => {
                (vec![$((stringify!($f).to_string(), std::mem::offset_of!($t, $f))),*], std::mem::size_of::<$t>())
            };
        }
        let cases = [
            ("GemvArgs", rust_layout!(GemvArgs: x, h, stats, gamma, beta, eps, bias, parts, out, counters, state, chunk_acc, chunk_ml,
                head_dim, attn_chunk, max_chunks, k_dim, n_dim, rows_per_split, prologue, epilogue, activation)),
            ("StepLayer", rust_layout!(StepLayerArgs: w, b, ln1_g, ln1_b, ln2_g, ln2_b, k_cache, v_cache, fold, ln1_eps, ln2_eps, scale, unused)),
            ("StepArgs", rust_layout!(StepArgs: layers, wte, wpe, lm_head, lnf_g, lnf_b, h, stats, logits, best, parts, chunk_acc, chunk_ml,
                state, counters, lnf_eps, n_layer, n_embd, n_head, inner, vocab, n_positions, activation, rows, attn_keys, max_chunks,
                logits_rows, parts_per_layer, n_counters, xs_floats)),
        ];
        for (name, (rust_fields, rust_size)) in cases {
            let (c_fields, c_size, _) = c_layout(SOURCE, name);
            assert_eq!(rust_fields, c_fields, "struct {name}: (field, offset) in src/graph_decode.rs against src/graph_decode.cu");
            assert_eq!(rust_size, c_size, "struct {name}: size in src/graph_decode.rs against src/graph_decode.cu");
        }
    }
}

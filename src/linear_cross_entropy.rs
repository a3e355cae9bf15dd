//! The language model's head and its mean cross-entropy as one operation on CUDA, without the
//! `[tokens, vocabulary]` logits ever existing at once (the idea of Liger's fused linear
//! cross-entropy and Apple's cut cross-entropy, done with cuBLASLt products and kernels of our
//! own, `src/linear_cross_entropy.cu`).
//!
//! At stage 2's 1024 tokens the f32 logits are 207 MB, and burn's log-softmax, its gather and
//! their backward make several more of that size; at 8 x 1024 tokens each is 1.66 GB. cubecl
//! puts a buffer of 70-561 MB in a page of 2.24 GB on the H200 (of 4.5-8.9 GB above that) and
//! keeps the page, so the loss alone decided whether stage 2 fitted a 24 GB card
//! (`model-import/results/block-recompute-2026-12-04/`).
//!
//! Here the vocabulary is walked in chunks whose logits stay under [`MAX_CHUNK_ELEMENTS`]:
//! - forward: the chunk's weight rows cast to the compute dtype, its f32 logits by cuBLASLt,
//!   and a kernel folding them into each token's running maximum and sum of exponentials and
//!   picking the target's logit; then each token's log-sum-exp and the loss.
//! - backward: the chunk's logits again (one more product of the head), a kernel writing the
//!   score gradients `(softmax - one-hot) · upstream / count` in the compute dtype, and the two
//!   products that take them: the hidden states' gradient (summed over chunks) and the
//!   chunk's rows of the weight's gradient.
//!
//! The state between them is the hidden states in the compute dtype and one f32 per token.
//! Numbers are those of [`crate::model::nn::cross_entropy`] over f32 logits of the operands
//! rounded to bf16 (f32 sums of bf16 products, the softmax in f32, the score gradients rounded
//! to bf16 for the backward's products); what differs is the order of sums: the hidden
//! states' gradient is added up over chunks in f32. The other route, [`crate::model::nn::affine`]
//! under autocast, writes the logits in bf16 (as PyTorch's autocast does before its loss casts
//! them to f32), so it rounds them once more.
//! The weight's gradient is made in f32 chunks and then joined, so it is held twice for a
//! moment (415 MB each at llm-jp-1.3b's size).

use burn::backend::ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};
use burn::prelude::*;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, Slice, TensorPrimitive};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::cubecl::prelude::CubeCount;
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::CubeBackend;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::FusionRuntime;

use crate::cublaslt::{downcast, register_as};
use crate::cuda_kernel::{autodiff_cuda, cast, contiguous, float_code, from_primitive, fused_cuda, on_autodiff_cuda, to_primitive, Cube, Fused, KernelSource, Primitive, SourceKernel};
use crate::flash::{empty, tensor_cores};

type Inner = CubeBackend<CudaRuntime, f32, i32, u8>;
type Runtime = FusionCubeRuntime<CudaRuntime>;

/// Specialised on the score gradients' type (`ELEM`, [`float_code`]'s codes).
static SOURCE: KernelSource = KernelSource::new("ELEM", include_str!("linear_cross_entropy.cu"));
/// Threads per block (the launch bounds in the source); the statistics take a warp per token.
const THREADS: u32 = 256;
const ROWS_PER_BLOCK: usize = 8;
/// Row entries one block of the gradient kernel covers (four a thread).
const GRAD_ENTRIES_PER_BLOCK: usize = 1024;

/// The most elements a chunk's logits (and a chunk of the weight's f32 gradient) may have:
/// 64 MiB of f32, under the 70 MB above which cubecl takes 2.24 GB pages on the H200.
pub const MAX_CHUNK_ELEMENTS: usize = 1 << 24;

/// Vocabulary entries per chunk for `tokens` tokens of width `width`: as many as keep the
/// chunk's logits `[tokens, chunk]` and its weight gradient `[chunk, width]` within
/// `max_elements`, a multiple of 64 (at least 64), and no more than the vocabulary.
pub fn chunk_entries(tokens: usize, width: usize, vocab: usize, max_elements: usize) -> usize {
    let fitting = max_elements / tokens.max(width).max(1);
    (fitting / 64 * 64).max(64).min(vocab)
}

/// The operands [`try_linear_cross_entropy`] hands back when it does not take them.
pub type Operands<B> = (Tensor<B, 2>, Tensor<B, 2>);

/// The mean over tokens with a target of `-log softmax(hidden · weightᵀ)[target]` (`hidden`
/// `[tokens, width]`, `weight` `[vocabulary, width]`, `targets` one per token, negative for a
/// token without one; 0 when no token has one), with the products under autocast to `compute`
/// (bf16 or f16), by chunks of the vocabulary whose logits have at most `max_chunk_elements`
/// entries ([`MAX_CHUNK_ELEMENTS`] is what training uses). Taken where cuBLASLt takes `B`'s
/// products (burn's CUDA backend, with autodiff or not), the fused operations are on, the GPU
/// has tensor cores and the operands are f32 or of the compute dtype; the operands come back
/// untouched otherwise.
///
/// # Panics
/// When a target is not below the vocabulary's size, or their number is not the tokens'.
pub fn try_linear_cross_entropy<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: &[i64],
    compute: DType,
    max_chunk_elements: usize,
) -> Result<Tensor<B, 1>, Operands<B>> {
    let ([tokens, width], [vocab, weight_width]) = (hidden.dims(), weight.dims());
    assert_eq!(targets.len(), tokens, "{} targets for {tokens} tokens", targets.len());
    assert_eq!(width, weight_width, "hidden states of width {width}, head weight [{vocab}, {weight_width}]");
    if let Some(bad) = targets.iter().find(|&&t| t >= vocab as i64) {
        panic!("target {bad} is outside the vocabulary of {vocab}");
    }
    let of_compute = |dtype: DType| dtype == DType::F32 || dtype == compute;
    let covered = (fused_cuda::<B>() || autodiff_cuda::<B>())
        && crate::cublaslt::routes::<B>()
        && crate::fused_ops::enabled()
        && !crate::cublaslt::checking()
        && matches!(compute, DType::BF16 | DType::F16)
        && of_compute(hidden.dtype())
        && of_compute(weight.dtype())
        && tokens > 0
        && vocab > 0
        && width > 0
        && vocab <= i32::MAX as usize
        && tensor_cores(&hidden.device());
    if !covered {
        return Err((hidden, weight));
    }
    let device = hidden.device();
    let words: Vec<i32> = targets.iter().map(|&t| if t < 0 { -1 } else { t as i32 }).collect();
    let count = words.iter().filter(|&&t| t >= 0).count();
    let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(words, [tokens]), &device);
    let targets = downcast::<_, Primitive>(targets.into_primitive()).ok().expect("burn's fused CUDA backend's int tensor");
    let chunk = chunk_entries(tokens, width, vocab, max_chunk_elements);
    let op = LinearCrossEntropy { compute, targets, count, chunk };
    if fused_cuda::<B>() {
        return Ok(from_primitive(op.forward(to_primitive(hidden), to_primitive(weight)).0));
    }
    match on_autodiff_cuda::<B, 2, _>(op, [hidden.into_primitive().tensor(), weight.into_primitive().tensor()]) {
        Ok(loss) => Ok(Tensor::from_primitive(TensorPrimitive::Float(loss))),
        Err(_) => unreachable!("autodiff_cuda::<B>() was checked above"),
    }
}

/// `(first, entries)` of each chunk of `chunk` entries of a vocabulary of `vocab` (the last
/// one shorter where `chunk` does not divide it).
fn chunk_ranges(vocab: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..vocab).step_by(chunk).map(move |first| (first, chunk.min(vocab - first)))
}

/// The operation: the compute dtype, the targets (i32 on the device, -1 for none), how many
/// tokens have one, and the vocabulary entries per chunk.
#[derive(Debug, Clone)]
struct LinearCrossEntropy {
    compute: DType,
    targets: Primitive,
    count: usize,
    chunk: usize,
}

impl LinearCrossEntropy {
    /// Rows `first..first + entries` of the weight, in the compute dtype.
    fn weight_rows(&self, w: &Primitive, first: usize, entries: usize) -> Primitive {
        let rows = [Slice::new(first as isize, Some((first + entries) as isize), 1), Slice::full()];
        // The optimizer's copy of the (tied, trained) weight where it wrote one; else only
        // these rows are cast.
        match crate::fused_optim::compute_copy(w, self.compute) {
            Some(copy) => Fused::float_slice(copy, &rows),
            None => cast(Fused::float_slice(w.clone(), &rows), self.compute),
        }
    }

    /// `1 / count` as the kernels' f32 bits (a count of 0 gives a loss and gradients of 0).
    fn count_inv(&self) -> u64 {
        (1.0f32 / self.count.max(1) as f32).to_bits() as u64
    }

    /// The loss (`[1]` f32), the hidden states in the compute dtype and each token's
    /// log-sum-exp (f32 `[tokens]`), the backward's state.
    fn forward(&self, hidden: Primitive, w: Primitive) -> (Primitive, Primitive, Primitive) {
        let hc = cast(hidden, self.compute);
        let vocab = w.shape[0];
        let mut stats: Option<Primitive> = None;
        for (first, entries) in chunk_ranges(vocab, self.chunk) {
            let wc = self.weight_rows(&w, first, entries);
            let logits = register_as(hc.clone(), Fused::float_transpose(wc), DType::F32, None);
            stats = Some(register_kernel(Step::Stats { first, entries }, self, vec![logits, self.targets.clone()], stats));
        }
        let stats = stats.expect("a vocabulary of at least one entry");
        let mut out = register_finish(self, stats);
        let lse = out.remove(0);
        (out.remove(0), hc, lse)
    }

    /// The gradients of the loss times `upstream` (`[1]`) with respect to the hidden states
    /// (when `hidden` gives their dtype and shape) and the weight (when `weight`).
    fn backward(&self, state: &State, upstream: Primitive, hidden: Option<(DType, Shape)>, weight: bool) -> (Option<Primitive>, Option<Primitive>) {
        let upstream = cast(upstream, DType::F32);
        let vocab = state.w.shape[0];
        let mut dh: Option<Primitive> = None;
        let mut dw_rows = Vec::new();
        for (first, entries) in chunk_ranges(vocab, self.chunk) {
            let wc = self.weight_rows(&state.w, first, entries);
            let logits = register_as(state.hc.clone(), Fused::float_transpose(wc.clone()), DType::F32, None);
            let scores = register_kernel(
                Step::Grad { first, entries },
                self,
                vec![logits, self.targets.clone(), state.lse.clone(), upstream.clone()],
                None,
            );
            if hidden.is_some() {
                let part = register_as(scores.clone(), wc, DType::F32, None);
                dh = Some(match dh {
                    None => part,
                    Some(sum) => Fused::float_add(sum, part),
                });
            }
            if weight {
                dw_rows.push(register_as(Fused::float_transpose(scores), state.hc.clone(), DType::F32, None));
            }
        }
        let dh = hidden.zip(dh).map(|((dtype, shape), dh)| Fused::float_reshape(cast(dh, dtype), shape));
        let dw = weight.then(|| {
            let dw = if dw_rows.len() == 1 { dw_rows.remove(0) } else { Fused::float_cat(dw_rows, 0) };
            cast(dw, state.w.dtype)
        });
        (dh, dw)
    }
}

/// What the backward keeps: the hidden states in the compute dtype, the weight (the
/// parameter itself), and each token's log-sum-exp.
#[derive(Debug, Clone)]
struct State {
    hc: Primitive,
    w: Primitive,
    lse: Primitive,
}

/// A kernel of the source over one chunk.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Fold the chunk's logits into the running statistics (`[tokens, 3]` f32).
    Stats { first: usize, entries: usize },
    /// The chunk's score gradients (`[tokens, entries]` in the compute dtype).
    Grad { first: usize, entries: usize },
}

/// Queues `step` over `inputs` (the chunk's logits first, then the targets, then for the
/// gradients the log-sum-exp and the upstream gradient) and, for the statistics, the previous
/// chunk's.
fn register_kernel(step: Step, op: &LinearCrossEntropy, mut inputs: Vec<Primitive>, prev: Option<Primitive>) -> Primitive {
    let tokens = inputs[0].shape[0];
    inputs.extend(prev);
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter());
    let (shape, dtype) = match step {
        Step::Stats { .. } => (Shape::new([tokens, 3]), DType::F32),
        Step::Grad { entries, .. } => (Shape::new([tokens, entries]), op.compute),
    };
    let output = TensorIr::uninit(client.create_empty_handle(), shape, dtype);
    let irs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let name = match step {
        Step::Stats { .. } => "cross_entropy_chunk_stats",
        Step::Grad { .. } => "cross_entropy_chunk_grad",
    };
    let desc = CustomOpIr::new(name, &irs, &[output]);
    let kernel = ChunkKernel { desc: desc.clone(), step, compute: op.compute, count_inv: op.count_inv() };
    client.register(streams, OperationIr::Custom(desc), kernel).output()
}

/// Queues the last step: each token's log-sum-exp, then the loss.
fn register_finish(op: &LinearCrossEntropy, stats: Primitive) -> Vec<Primitive> {
    let tokens = stats.shape[0];
    let client = stats.client.clone();
    let streams = OperationStreams::with_inputs([&stats, &op.targets]);
    let outputs = [
        TensorIr::uninit(client.create_empty_handle(), Shape::new([tokens]), DType::F32),
        TensorIr::uninit(client.create_empty_handle(), Shape::new([1]), DType::F32),
    ];
    let desc = CustomOpIr::new("cross_entropy_finish", &[stats.into_ir(), op.targets.clone().into_ir()], &outputs);
    let kernel = Finish { desc: desc.clone(), count_inv: op.count_inv() };
    client.register(streams, OperationIr::Custom(desc), kernel).into_iter().collect()
}

/// The targets as the kernels read them: contiguous i32.
fn targets_of(handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>, ir: &TensorIr) -> Cube {
    let targets = contiguous(handles.get_int_tensor::<Inner>(ir));
    assert_eq!(targets.dtype, DType::I32, "the loss kernels read i32 targets");
    targets
}

/// A chunk's logits as the kernels read them: rows of unit stride, `strides[0]` apart.
fn logits_of(handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>, ir: &TensorIr) -> (Cube, usize) {
    let mut logits = handles.get_float_tensor::<Inner>(ir);
    if logits.meta.strides()[1] != 1 || logits.meta.strides()[0] < logits.meta.shape()[1] {
        logits = contiguous(logits);
    }
    assert_eq!(logits.dtype, DType::F32, "the loss kernels read f32 logits");
    let ld = logits.meta.strides()[0];
    (logits, ld)
}

fn launch(entry: &'static str, elem: u8, buffers: Vec<&Cube>, words: Vec<u64>, count: CubeCount) {
    SourceKernel { source: &SOURCE, entry, code: elem, threads: THREADS }.launch(buffers, words, count);
}

#[derive(Debug)]
struct ChunkKernel {
    desc: CustomOpIr,
    step: Step,
    compute: DType,
    count_inv: u64,
}

impl Operation<Runtime> for ChunkKernel {
    fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
        let inputs = &self.desc.inputs;
        let (logits, ld) = logits_of(handles, &inputs[0]);
        let targets = targets_of(handles, &inputs[1]);
        let tokens = logits.meta.shape()[0];
        let elem = float_code(self.compute).expect("bf16 or f16");
        match self.step {
            Step::Stats { first, entries } => {
                // The first chunk has no previous statistics: the kernel does not read the
                // buffer in their place (`first` is 0).
                let prev = match inputs.get(2) {
                    Some(ir) => contiguous(handles.get_float_tensor::<Inner>(ir)),
                    None => logits.clone(),
                };
                let next = empty(&logits, [tokens, 3], DType::F32);
                let words = vec![tokens as u64, entries as u64, ld as u64, first as u64, self.count_inv];
                let blocks = tokens.div_ceil(ROWS_PER_BLOCK) as u32;
                launch("cross_entropy_chunk_stats", elem, vec![&logits, &targets, &prev, &next], words, CubeCount::Static(blocks, 1, 1));
                handles.register_float_tensor::<Inner>(&self.desc.outputs[0].id, next);
            }
            Step::Grad { first, entries } => {
                let lse = contiguous(handles.get_float_tensor::<Inner>(&inputs[2]));
                let upstream = contiguous(handles.get_float_tensor::<Inner>(&inputs[3]));
                let scores = empty(&logits, [tokens, entries], self.compute);
                let words = vec![tokens as u64, entries as u64, ld as u64, first as u64, self.count_inv];
                let across = entries.div_ceil(GRAD_ENTRIES_PER_BLOCK) as u32;
                let down = tokens.min(65_535) as u32;
                launch("cross_entropy_chunk_grad", elem, vec![&logits, &targets, &lse, &upstream, &scores], words, CubeCount::Static(across, down, 1));
                handles.register_float_tensor::<Inner>(&self.desc.outputs[0].id, scores);
            }
        }
    }
}

#[derive(Debug)]
struct Finish {
    desc: CustomOpIr,
    count_inv: u64,
}

impl Operation<Runtime> for Finish {
    fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
        let inputs = &self.desc.inputs;
        let stats = contiguous(handles.get_float_tensor::<Inner>(&inputs[0]));
        let targets = targets_of(handles, &inputs[1]);
        let tokens = stats.meta.shape()[0];
        let lse = empty(&stats, [tokens], DType::F32);
        let loss = empty(&stats, [1], DType::F32);
        let words = vec![tokens as u64, 0, 0, 0, self.count_inv];
        // The element type does not enter this kernel; the f32 build of the source serves.
        launch("cross_entropy_finish", 0, vec![&stats, &targets, &lse, &loss], words, CubeCount::Static(1, 1, 1));
        for (output, tensor) in self.desc.outputs.iter().zip([lse, loss]) {
            handles.register_float_tensor::<Inner>(&output.id, tensor);
        }
    }
}

impl crate::cuda_kernel::AutodiffCudaOp<2> for LinearCrossEntropy {
    fn run<I, C>(self, [hidden, weight]: [burn::tensor::ops::FloatTensor<burn::backend::Autodiff<I, C>>; 2]) -> burn::tensor::ops::FloatTensor<burn::backend::Autodiff<I, C>>
    where
        I: Backend<FloatTensorPrimitive = Primitive>,
        C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy,
    {
        use burn::backend::autodiff::ops::{Backward, OpsKind};
        let nodes = [hidden.node.clone(), weight.node.clone()];
        match LinearCrossEntropyBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let hidden_form = (hidden.primitive.dtype, hidden.primitive.shape.clone());
                let (loss, hc, lse) = self.forward(hidden.primitive, weight.primitive.clone());
                let state = (self, State { hc, w: weight.primitive, lse }, hidden_form);
                prep.finish(state, loss)
            }
            OpsKind::UnTracked(prep) => prep.finish(self.forward(hidden.primitive, weight.primitive).0),
        }
    }
}

#[derive(Debug)]
struct LinearCrossEntropyBackward;

impl<B: Backend<FloatTensorPrimitive = Primitive>> burn::backend::autodiff::ops::Backward<B, 2> for LinearCrossEntropyBackward {
    type State = (LinearCrossEntropy, State, (DType, Shape));

    fn backward(
        self,
        ops: burn::backend::autodiff::ops::Ops<Self::State, 2>,
        grads: &mut burn::backend::autodiff::grads::Gradients,
        _checkpointer: &mut burn::backend::autodiff::checkpoint::base::Checkpointer,
    ) {
        let upstream = grads.consume::<B>(&ops.node);
        let (op, state, hidden_form) = ops.state;
        let [hidden, weight] = ops.parents;
        let (dh, dw) = op.backward(&state, upstream, hidden.is_some().then_some(hidden_form), weight.is_some());
        if let (Some(node), Some(dh)) = (hidden, dh) {
            grads.register::<B>(node.id, dh);
        }
        if let (Some(node), Some(dw)) = (weight, dw) {
            grads.register::<B>(node.id, dw);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_keep_logits_and_weight_rows_within_the_bound() {
        // Stage 2 at 1 x 1024 tokens of width 2048: the weight gradient's rows bound it.
        assert_eq!(chunk_entries(1024, 2048, 50_688, MAX_CHUNK_ELEMENTS), 8192);
        // 8 x 1024 tokens: the logits bound it.
        assert_eq!(chunk_entries(8192, 2048, 50_688, MAX_CHUNK_ELEMENTS), 2048);
        // A vocabulary smaller than a chunk is one chunk.
        assert_eq!(chunk_entries(16, 32, 100, MAX_CHUNK_ELEMENTS), 100);
        // Never under 64 entries, whatever the bound.
        assert_eq!(chunk_entries(1 << 20, 2048, 50_688, MAX_CHUNK_ELEMENTS), 64);
        assert_eq!(chunk_entries(10, 8, 1000, 640), 64);
    }

    #[test]
    fn chunks_cover_the_vocabulary_once() {
        assert_eq!(chunk_ranges(50_688, 8192).collect::<Vec<_>>().last(), Some(&(49_152, 1536)));
        for (vocab, chunk) in [(100, 100), (100, 64), (50_688, 2048), (7, 64)] {
            let mut next = 0;
            for (first, entries) in chunk_ranges(vocab, chunk) {
                assert_eq!(first, next);
                assert!(entries > 0 && entries <= chunk);
                next = first + entries;
            }
            assert_eq!(next, vocab);
        }
    }

    /// Every entry point the launches name is in the source, with the launch bounds they assume.
    #[test]
    fn entry_points_are_in_the_source() {
        for entry in ["cross_entropy_chunk_stats", "cross_entropy_finish", "cross_entropy_chunk_grad"] {
            assert!(SOURCE.specialised(1).contains(&format!("__launch_bounds__({THREADS}) {entry}(")), "{entry}");
        }
    }
}

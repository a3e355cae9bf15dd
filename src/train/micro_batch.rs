//! The forward and backward pass of one micro-batch, optionally with the GPT-2 blocks'
//! activations recomputed in the backward pass (transformers' `gradient_checkpointing`).
//!
//! With recomputation, the forward runs the blocks untracked and keeps only each block's
//! input. The backward then goes down the blocks one at a time: it reruns a block under
//! autodiff from its kept input, backpropagates the gradient of the block's output through it,
//! and hands the gradient of the block's input to the block below. Memory holds one block's
//! activations instead of every block's, for one more forward pass of the blocks.
//!
//! Each part (the embedding, each block) draws its dropout masks from a seed of its own, set
//! just before it runs. The rerun of a block therefore draws the masks its first run drew, and
//! a run with recomputation follows the same run without it.

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use crate::model::llava::{LlavaModel, Sample};
use crate::model::nn::has_trainable;

thread_local! {
    static BLOCK_RERUNS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many GPT-2 blocks this thread has rerun under autodiff in recomputing backward passes:
/// what shows a test that recomputation ran (a run that skipped it would equal the plain run
/// too). Training on one device runs on the caller's thread.
pub fn block_reruns() -> u64 {
    BLOCK_RERUNS.get()
}

/// The seed of part `index` of a run seeded `seed` (splitmix64 of the two), so that parts draw
/// unrelated masks.
pub fn derive_seed(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How one micro-batch is run.
#[derive(Debug, Clone, Copy)]
pub struct MicroBatchRun {
    /// The micro-batch's dropout seed.
    pub seed: u64,
    /// The loss is multiplied by this before its backward pass (1 / micro-batches per step).
    pub loss_scale: f64,
    /// Multiplies the loss itself, as reported too: 1, or NaN to test the non-finite stop.
    pub loss_factor: f32,
    /// Recompute the blocks' activations in the backward pass.
    pub recompute: bool,
}

/// Forward and backward of the micro-batch `samples` (its images in `pixel_values`): adds the
/// gradients of `loss · loss_scale` to `grads` and returns the loss (`[1]`, left on the device)
/// and the host seconds spent recording the forward pass up to the loss. A micro-batch whose
/// loss reaches no trainable parameter (stage 1, a batch without images) adds no gradients.
pub fn accumulate_gradients<B: AutodiffBackend>(
    model: &LlavaModel<B>,
    samples: &[Sample],
    pixel_values: Option<Tensor<B, 4>>,
    run: MicroBatchRun,
    grads: &mut GradientsAccumulator<LlavaModel<B>>,
) -> (Tensor<B::InnerBackend, 1>, f64) {
    let started = std::time::Instant::now();
    let device = model.transformer.wte.weight.device();
    let with_images = pixel_values.is_some();
    B::seed(&device, derive_seed(run.seed, 0));
    let inputs = model.training_inputs(samples, pixel_values);
    let blocks = &model.transformer.h;
    // upstream[l]: whether the input of block l (l = blocks.len(): of the head) depends on a
    // trainable parameter, so that gradients must flow down through it.
    let mut upstream = vec![model.trains_before_blocks(with_images)];
    for block in blocks {
        let below = *upstream.last().expect("non-empty");
        upstream.push(below || has_trainable(block));
    }
    let head_tracked = upstream[blocks.len()] || model.trains_after_blocks();
    let scaled = |loss: Tensor<B, 1>| loss * run.loss_scale;

    if !run.recompute {
        let mut hidden = inputs.hidden;
        for (l, block) in blocks.iter().enumerate() {
            B::seed(&device, derive_seed(run.seed, l as u64 + 1));
            hidden = block.forward(hidden, inputs.masked.clone(), None);
        }
        let loss = model.loss_from_hidden(hidden, &inputs.labels) * run.loss_factor;
        let value = (loss.clone().inner(), started.elapsed().as_secs_f64());
        if head_tracked {
            grads.accumulate(model, GradientsParams::from_grads(scaled(loss).backward(), model));
        }
        return value;
    }

    // The first pass: untracked, keeping each block's input.
    let mut kept: Vec<Tensor<B::InnerBackend, 3>> = Vec::with_capacity(blocks.len() + 1);
    kept.push(inputs.hidden.clone().inner());
    for (l, block) in blocks.iter().enumerate() {
        B::seed(&device, derive_seed(run.seed, l as u64 + 1));
        let input = Tensor::<B, 3>::from_inner(kept[l].clone());
        let output = block.clone().no_grad().forward(input, inputs.masked.clone(), None);
        kept.push(output.inner());
    }
    // A kept activation back under autodiff, as a leaf when gradients must reach it.
    let leaf = |l: usize| {
        let x = Tensor::<B, 3>::from_inner(kept[l].clone());
        if upstream[l] {
            x.require_grad()
        } else {
            x
        }
    };

    let last = leaf(blocks.len());
    let loss = model.loss_from_hidden(last.clone(), &inputs.labels) * run.loss_factor;
    let value = (loss.clone().inner(), started.elapsed().as_secs_f64());
    if !head_tracked {
        return value;
    }
    let backward = scaled(loss).backward();
    let mut output_grad = upstream[blocks.len()].then(|| last.grad(&backward).expect("the head's input is a tracked leaf"));
    grads.accumulate(model, GradientsParams::from_grads(backward, model));

    for (l, block) in blocks.iter().enumerate().rev() {
        let Some(grad) = output_grad.take() else { break };
        B::seed(&device, derive_seed(run.seed, l as u64 + 1));
        let input = leaf(l);
        let output = block.forward(input.clone(), inputs.masked.clone(), None);
        BLOCK_RERUNS.set(BLOCK_RERUNS.get() + 1);
        // d/d(output) of sum(output · grad) is grad itself: the rerun block's backward starts
        // from the gradient that reached its output.
        let backward = (output * Tensor::from_inner(grad)).sum().backward();
        output_grad = upstream[l].then(|| input.grad(&backward).expect("the block's input is a tracked leaf"));
        grads.accumulate(model, GradientsParams::from_grads(backward, model));
    }
    if let Some(grad) = output_grad {
        let backward = (inputs.hidden * Tensor::from_inner(grad)).sum().backward();
        grads.accumulate(model, GradientsParams::from_grads(backward, model));
    }
    value
}

//! An epoch's batches with their pixels sent to their replica's device a step ahead.
//!
//! Sending a stage-1 batch's pixels (43 MB) costs cubecl ~50 ms of host work (a copy into a
//! pageable buffer, then the transfer from it). Done by the training thread at the start of a
//! step, the device sat idle for all of it. Here a thread of its own does it while the
//! device works through the previous step; on CUDA the transfer goes on that thread's stream,
//! and cubecl makes the training thread's stream wait for it where the pixels are first used.
//! The other way round nothing waits: that stream reuses a buffer once it is freed, so the
//! trainer holds each step's buffers until its loss read (`trainer::local_gradients`).
//! Stage 1 at 32 x 608 went from 0.82x PyTorch's step to 0.99x on an H100
//! (`model-import/results/upload-ahead-2026-12-05/`).

use std::time::Instant;

use burn::prelude::*;

use crate::data::{Batch, DataReport, Prefetched, ReadAhead, Rejection};

/// A batch whose pixels are on their device (or on their way there).
pub struct DeviceBatch<B: Backend> {
    /// The batch, its `pixel_values` taken.
    pub batch: Batch,
    /// The pixels, flat and in f32 ([`crate::backend::upload_pixels_flat`]); `None` without images.
    pub pixels: Option<Tensor<B, 1>>,
    /// Seconds the upload thread spent sending them.
    pub upload_s: f64,
}

/// The batches of [`Prefetched`], each with its pixels on the device of the replica that
/// trains it: batch `n` of the epoch is micro-batch `k = n % per_step` of its step and goes to
/// replica `k % devices.len()` (the trainer's split). At most `per_step` batches wait
/// uploaded (one step's pixels in device memory) besides the step being trained.
pub struct DeviceBatches<B: Backend> {
    uploads: ReadAhead<Uploads<B>>,
    order_len: usize,
}

/// What the upload thread runs: the batches, each uploaded as it comes.
struct Uploads<B: Backend> {
    batches: Prefetched,
    devices: Vec<B::Device>,
    per_step: usize,
    image_size: usize,
    /// Batches handed out so far.
    n: usize,
}

impl<B: Backend> Iterator for Uploads<B> {
    type Item = Result<DeviceBatch<B>, Rejection>;

    fn next(&mut self) -> Option<Self::Item> {
        let item = self.batches.next()?;
        let device = &self.devices[(self.n % self.per_step) % self.devices.len()];
        self.n += 1;
        Some(item.map(|mut batch| {
            let started = Instant::now();
            let pixels = (batch.images > 0).then(|| {
                let values = std::mem::take(&mut batch.pixel_values);
                crate::backend::upload_pixels_flat::<B>(values, batch.images, self.image_size, device)
            });
            DeviceBatch { batch, pixels, upload_s: started.elapsed().as_secs_f64() }
        }))
    }
}

impl<B: Backend> DeviceBatches<B> {
    pub fn new(batches: Prefetched, devices: Vec<B::Device>, per_step: usize, image_size: usize) -> Self {
        assert!(!devices.is_empty() && per_step > 0, "device batches need a device and a step of at least one batch");
        let order_len = batches.order_len();
        // One batch is held uploaded by the thread while it waits to send, so `per_step - 1`
        // in the channel makes a whole step ahead.
        let uploads = Uploads { batches, devices, per_step, image_size, n: 0 };
        Self { uploads: ReadAhead::new(uploads, per_step - 1, "uploads"), order_len }
    }

    /// Samples in this epoch's order (accepted or not).
    pub fn order_len(&self) -> usize {
        self.order_len
    }

    /// Stops uploading and returns what the batches taken used and left out ([`Prefetched::finish`]):
    /// a batch uploaded but not taken counts as never read.
    pub fn finish(self) -> DataReport {
        let (uploads, unsent) = self.uploads.stop();
        let untaken: Vec<Batch> = unsent.into_iter().filter_map(|item| item.ok().map(|b| b.batch)).collect();
        uploads.batches.finish_with_untaken(&untaken)
    }
}

impl<B: Backend> Iterator for DeviceBatches<B> {
    type Item = Result<DeviceBatch<B>, Rejection>;

    fn next(&mut self) -> Option<Self::Item> {
        self.uploads.next()
    }
}

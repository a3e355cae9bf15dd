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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use burn::prelude::*;

use crate::data::{Batch, DataReport, Prefetched, Rejection};

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
    rx: Option<Receiver<Result<DeviceBatch<B>, Rejection>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<(Prefetched, Vec<Batch>)>>,
    order_len: usize,
}

impl<B: Backend> DeviceBatches<B> {
    pub fn new(batches: Prefetched, devices: Vec<B::Device>, per_step: usize, image_size: usize) -> Self {
        assert!(!devices.is_empty() && per_step > 0, "device batches need a device and a step of at least one batch");
        let order_len = batches.order_len();
        // One batch is held uploaded by the thread while it waits to send, so `per_step - 1`
        // in the channel makes a whole step ahead.
        let (tx, rx) = sync_channel(per_step - 1);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let handle = std::thread::Builder::new()
            .name("uploads".into())
            .spawn(move || {
                let mut batches = batches;
                let mut untaken = Vec::new();
                let mut n = 0usize;
                while !stopped.load(Ordering::SeqCst) {
                    let Some(item) = batches.next() else { break };
                    let device = &devices[(n % per_step) % devices.len()];
                    n += 1;
                    let item = item.map(|mut batch| {
                        let started = Instant::now();
                        let pixels = (batch.images > 0).then(|| {
                            let values = std::mem::take(&mut batch.pixel_values);
                            crate::backend::upload_pixels_flat::<B>(values, batch.images, image_size, device)
                        });
                        DeviceBatch { batch, pixels, upload_s: started.elapsed().as_secs_f64() }
                    });
                    if let Err(refused) = tx.send(item) {
                        untaken.extend(refused.0.ok().map(|b| b.batch));
                        break;
                    }
                }
                (batches, untaken)
            })
            .expect("spawning the upload thread");
        Self { rx: Some(rx), stop, handle: Some(handle), order_len }
    }

    /// Samples in this epoch's order (accepted or not).
    pub fn order_len(&self) -> usize {
        self.order_len
    }

    /// Stops uploading and returns what the batches taken used and left out ([`Prefetched::finish`]):
    /// a batch uploaded but not taken counts as never read.
    pub fn finish(mut self) -> DataReport {
        self.stop.store(true, Ordering::SeqCst);
        // Until the thread has stopped and dropped its end: whatever it still sends is untaken.
        let mut untaken: Vec<Batch> = self.rx.take().expect("open").iter().filter_map(|item| item.ok().map(|b| b.batch)).collect();
        let (batches, refused) = self.handle.take().expect("running").join().expect("the upload thread panicked");
        untaken.extend(refused);
        batches.finish_with_untaken(&untaken)
    }
}

impl<B: Backend> Iterator for DeviceBatches<B> {
    type Item = Result<DeviceBatch<B>, Rejection>;

    fn next(&mut self) -> Option<Self::Item> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl<B: Backend> Drop for DeviceBatches<B> {
    fn drop(&mut self) {
        // The thread stops at its next send (the receiver gone) or its next batch.
        self.stop.store(true, Ordering::SeqCst);
        self.rx.take();
    }
}

//! Batches for the trainer: an epoch's sample order (shuffled by seed, optionally grouped by
//! length), worker threads that tokenize, decode and preprocess ahead of the consumer, and
//! collation. Output does not depend on thread timing: samples come back in the order's order, and
//! a batch is filled from the next accepted samples, so the same seed gives the same batches, and a
//! run resumed at a position sees exactly the batches it would have seen.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::ahead::ReadAhead;
use super::dataset::{BadSamplePolicy, DataReport, Example, LlavaDataset, Rejection, SampleBuilder};
use crate::model::{Sample, IGNORE_INDEX};

#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub shuffle: bool,
    pub seed: u64,
    /// Batches drawn from groups of similar length (and of one modality: with or without image),
    /// as HF's `group_by_length` / LLaVA's `group_by_modality_length`, to waste less on padding.
    pub group_by_length: bool,
    /// Threads decoding and preprocessing; 0 means one per core.
    pub workers: usize,
    /// How many batches the workers may run ahead of the consumer.
    pub prefetch_batches: usize,
    pub drop_last: bool,
    pub policy: BadSamplePolicy,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 1,
            shuffle: true,
            seed: 42,
            group_by_length: false,
            workers: 0,
            prefetch_batches: 4,
            drop_last: false,
            policy: BadSamplePolicy::Skip,
        }
    }
}

/// HF's `LengthGroupedSampler` sorts megabatches of this many batches by length.
const MEGABATCH_MULT: usize = 50;

/// The order in which an epoch visits the dataset's records.
pub fn epoch_order(dataset: &LlavaDataset, config: &LoaderConfig, image_tokens: usize, epoch: usize) -> Vec<usize> {
    let n = dataset.len();
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order: Vec<usize> = (0..n).collect();
    if !config.group_by_length {
        if config.shuffle {
            order.shuffle(&mut rng);
        }
        return order;
    }
    // Per modality: shuffle, cut into megabatches, sort each by length (longest first), cut into
    // batches. Then the full batches of both modalities are shuffled together and the partial ones
    // go last.
    let bs = config.batch_size.max(1);
    let mut full: Vec<Vec<usize>> = Vec::new();
    let mut partial: Vec<Vec<usize>> = Vec::new();
    for with_image in [true, false] {
        let mut group: Vec<usize> = order.iter().copied().filter(|&i| dataset.has_image(i) == with_image).collect();
        if config.shuffle {
            group.shuffle(&mut rng);
        }
        for mega in group.chunks(bs * MEGABATCH_MULT) {
            let mut mega = mega.to_vec();
            mega.sort_by_key(|&i| std::cmp::Reverse(dataset.length_estimate(i, image_tokens)));
            for batch in mega.chunks(bs) {
                if batch.len() == bs { full.push(batch.to_vec()) } else { partial.push(batch.to_vec()) }
            }
        }
    }
    if config.shuffle {
        full.shuffle(&mut rng);
    }
    order = full.into_iter().chain(partial).flatten().collect();
    order
}

/// One collated batch.
#[derive(Debug, Clone)]
pub struct Batch {
    pub examples: Vec<Example>,
    /// `[images, 3, size, size]` pixels of the examples that have an image, in order.
    pub pixel_values: Vec<f32>,
    pub images: usize,
    pub epoch: usize,
    /// Where in the epoch's order the next batch starts (what a checkpoint records).
    pub next_position: usize,
    /// Samples left out while this batch was filled.
    pub rejections: Vec<Rejection>,
}

impl Batch {
    fn collate(examples: Vec<Example>, epoch: usize, next_position: usize, rejections: Vec<Rejection>) -> Self {
        let images = examples.iter().filter(|e| e.pixel_values.is_some()).count();
        let mut pixel_values = Vec::with_capacity(examples.iter().filter_map(|e| e.pixel_values.as_ref()).map(Vec::len).sum());
        for e in &examples {
            if let Some(p) = &e.pixel_values {
                pixel_values.extend_from_slice(p);
            }
        }
        Self { examples, pixel_values, images, epoch, next_position, rejections }
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The samples as the model takes them (it splices, truncates and pads).
    pub fn samples(&self) -> Vec<Sample> {
        self.examples.iter().map(|e| Sample { input_ids: e.input_ids.clone(), labels: Some(e.labels.clone()) }).collect()
    }

    /// Trained tokens in the batch (labels other than -100).
    pub fn target_tokens(&self) -> usize {
        self.examples.iter().map(|e| e.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()).sum()
    }

    /// The reference collator's tensors, before splicing: ids and labels cut to `max_length` and
    /// padded to the longest (ids with `pad_id`, labels with -100) on the given side, and the
    /// attention mask from the real lengths (the reference's `ids != pad_id` would also hide a real
    /// id 0).
    pub fn padded(&self, max_length: usize, pad_id: i64, pad_left: bool) -> PaddedBatch {
        let longest = self.examples.iter().map(|e| e.input_ids.len().min(max_length)).max().unwrap_or(0);
        let mut out = PaddedBatch { input_ids: vec![], labels: vec![], attention_mask: vec![], width: longest };
        for e in &self.examples {
            let n = e.input_ids.len().min(max_length);
            let pad = longest - n;
            let row = |values: &[i64], fill: i64| -> Vec<i64> {
                let (mut v, tail) = if pad_left { (vec![fill; pad], vec![]) } else { (vec![], vec![fill; pad]) };
                v.extend_from_slice(&values[..n]);
                v.extend(tail);
                v
            };
            out.input_ids.push(row(&e.input_ids, pad_id));
            out.labels.push(row(&e.labels, IGNORE_INDEX));
            let mask: Vec<bool> =
                if pad_left { (0..longest).map(|j| j >= pad).collect() } else { (0..longest).map(|j| j < n).collect() };
            out.attention_mask.push(mask);
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PaddedBatch {
    pub input_ids: Vec<Vec<i64>>,
    pub labels: Vec<Vec<i64>>,
    pub attention_mask: Vec<Vec<bool>>,
    pub width: usize,
}

/// Reads batches from a dataset through a [`SampleBuilder`] on worker threads.
pub struct DataLoader {
    pub dataset: Arc<LlavaDataset>,
    pub builder: Arc<SampleBuilder>,
    pub config: LoaderConfig,
}

impl DataLoader {
    pub fn new(dataset: Arc<LlavaDataset>, builder: Arc<SampleBuilder>, config: LoaderConfig) -> Self {
        Self { dataset, builder, config }
    }

    /// Batches of `epoch`, starting `position` samples into its order (0 for a fresh epoch; a
    /// resumed run passes the `next_position` of the last batch it trained on).
    pub fn epoch(&self, epoch: usize, position: usize) -> EpochIter {
        let order = Arc::new(epoch_order(&self.dataset, &self.config, self.builder.image_tokens, epoch));
        let workers = match self.config.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let window = (self.config.prefetch_batches.max(1) * self.config.batch_size.max(1)).max(workers);
        let shared = Arc::new(Shared {
            next: AtomicUsize::new(position),
            consumed: Mutex::new(position),
            advanced: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let (tx, rx) = channel();
        let handles = (0..workers)
            .map(|_| {
                let (order, shared, tx) = (order.clone(), shared.clone(), tx.clone());
                let (dataset, builder) = (self.dataset.clone(), self.builder.clone());
                std::thread::spawn(move || loop {
                    let seq = shared.next.fetch_add(1, Ordering::SeqCst);
                    if seq >= order.len() {
                        return;
                    }
                    {
                        let mut consumed = shared.consumed.lock().unwrap();
                        while seq >= *consumed + window && !shared.stop.load(Ordering::SeqCst) {
                            consumed = shared.advanced.wait(consumed).unwrap();
                        }
                    }
                    if shared.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    // A decoder that panics on a strange file costs that sample, not the run.
                    let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| builder.build(&dataset, order[seq])))
                        .unwrap_or_else(|panic| Err(builder.panicked(&dataset, order[seq], panic.as_ref())));
                    if tx.send((seq, built)).is_err() {
                        return;
                    }
                })
            })
            .collect();
        EpochIter {
            epoch,
            order,
            batch_size: self.config.batch_size.max(1),
            drop_last: self.config.drop_last,
            policy: self.config.policy,
            expect: position,
            pending: BTreeMap::new(),
            rx: Some(rx),
            shared,
            handles,
            report: DataReport::default(),
            failed: false,
        }
    }
}

struct Shared {
    /// Next position of the order a worker takes.
    next: AtomicUsize,
    /// Positions the consumer has taken; workers stay within a window ahead of it.
    consumed: Mutex<usize>,
    advanced: Condvar,
    stop: AtomicBool,
}

type Built = Result<Example, Rejection>;

pub struct EpochIter {
    pub epoch: usize,
    order: Arc<Vec<usize>>,
    batch_size: usize,
    drop_last: bool,
    policy: BadSamplePolicy,
    expect: usize,
    pending: BTreeMap<usize, Built>,
    rx: Option<Receiver<(usize, Built)>>,
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
    /// What this epoch used and left out so far.
    pub report: DataReport,
    failed: bool,
}

impl EpochIter {
    /// Samples in this epoch's order (accepted or not).
    pub fn order_len(&self) -> usize {
        self.order.len()
    }

    /// These batches gathered `ahead` batches in advance on a thread of their own.
    pub fn prefetched(self, ahead: usize) -> Prefetched {
        let order_len = self.order_len();
        Prefetched { batches: ReadAhead::new(self, ahead.max(1), "batches"), order_len }
    }

    fn take(&mut self, seq: usize) -> Built {
        loop {
            if let Some(built) = self.pending.remove(&seq) {
                return built;
            }
            let (s, built) = self.rx.as_ref().expect("open").recv().expect("a worker died while preparing a sample");
            self.pending.insert(s, built);
        }
    }

    fn advance(&mut self) {
        self.expect += 1;
        *self.shared.consumed.lock().unwrap() = self.expect;
        self.shared.advanced.notify_all();
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch, Rejection>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let mut examples = Vec::with_capacity(self.batch_size);
        let mut rejections = Vec::new();
        while examples.len() < self.batch_size && self.expect < self.order.len() {
            let built = self.take(self.expect);
            self.advance();
            match built {
                Ok(example) => {
                    self.report.accepted += 1;
                    examples.push(example);
                }
                Err(rejection) => {
                    if self.policy == BadSamplePolicy::Fail {
                        self.failed = true;
                        return Some(Err(rejection));
                    }
                    self.report.reject(rejection.clone());
                    rejections.push(rejection);
                }
            }
        }
        if examples.is_empty() || (self.drop_last && examples.len() < self.batch_size) {
            return None;
        }
        Some(Ok(Batch::collate(examples, self.epoch, self.expect, rejections)))
    }
}

/// An epoch's batches gathered ahead on a thread of their own ([`EpochIter::prefetched`]), so
/// that waiting for samples and collating them (a batch's pixels copied into one buffer, ~40 MB
/// at stage 1's 32 images) overlap the device's work on the step before instead of keeping it
/// idle. The same batches in the same order; [`Self::finish`] reports only the batches taken.
pub struct Prefetched {
    batches: ReadAhead<EpochIter>,
    order_len: usize,
}

impl Prefetched {
    /// Samples in this epoch's order (accepted or not).
    pub fn order_len(&self) -> usize {
        self.order_len
    }

    /// Stops gathering and returns what the batches taken used and left out: a batch gathered
    /// ahead but not taken counts as never read.
    pub fn finish(self) -> DataReport {
        self.finish_with_untaken(&[])
    }

    /// [`Self::finish`], where `untaken` are batches this iterator handed out that were not
    /// trained on after all (a consumer that reads ahead in turn).
    pub fn finish_with_untaken(self, untaken: &[Batch]) -> DataReport {
        let (batches, unsent) = self.batches.stop();
        let mut report = batches.report.clone();
        for batch in unsent.iter().flatten().chain(untaken) {
            report.accepted -= batch.len();
            report.forget_last(&batch.rejections);
        }
        report
    }
}

impl Iterator for Prefetched {
    type Item = Result<Batch, Rejection>;

    fn next(&mut self) -> Option<Self::Item> {
        self.batches.next()
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        {
            // Under the lock, so a worker cannot miss the wake-up between its check and its wait.
            let _consumed = self.shared.consumed.lock().unwrap();
            self.shared.stop.store(true, Ordering::SeqCst);
        }
        self.shared.advanced.notify_all();
        self.rx.take();
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

//! The training loop, generic over autodiff backends: both LLaVA stages as the reference recipe
//! runs them (HF Trainer semantics: gradient accumulation by dividing each micro-batch's mean
//! loss, global-norm clipping, AdamW, cosine schedule with warmup, one scheduler step per
//! optimizer step), with checkpoints that resume to the same losses.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use burn::collective::{all_reduce, finish_collective, register, reset_collective, CollectiveConfig, PeerId, ReduceOperation};
use burn::module::{ModuleMapper, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

use super::checkpoint::{self, latest, save_atomically, TrainerState};
use super::frozen::FrozenCasts;
use super::config::TrainConfig;
use super::device_batches::{DeviceBatch, DeviceBatches};
use super::micro_batch::{accumulate_gradients, derive_seed, MicroBatchRun};
use super::optim::{clip_scale, cosine_lr, global_grad_norm, AdamW, AdamWConfig, StepRates};
use crate::backend::DeviceMemory;
use crate::config::LlavaConfig;
use crate::data::{AspectMode, Batch, DataLoader, DataReport, ImageProcessor, LlavaDataset, LoaderConfig, SampleBuilder, Template, TextTokenizer};
use crate::model::nn::autocast;
use crate::model::{LlavaModel, ProjectorKind};

/// A loss or gradient norm that is not a finite number.
#[derive(Debug, thiserror::Error)]
#[error("step {step}: the {what} is {value} (not finite); stopped, the last good checkpoint is {last_checkpoint}")]
pub struct NonFinite {
    pub step: u64,
    pub what: &'static str,
    pub value: f64,
    pub last_checkpoint: String,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub samples: usize,
    /// Tokens after splicing (text + image features), padding excluded.
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
    pub rss_mb: f64,
    /// Device memory cubecl's allocator holds on a CUDA device after the step: reserved from
    /// the driver, and in use by live tensors. Pages are rarely handed back, so the reserved
    /// figure is close to the run's peak so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_mb: Option<DeviceMemory>,
    #[serde(default)]
    pub skipped: bool,
    /// The sample ids of each micro-batch, so that another implementation can replay the run.
    #[serde(default)]
    pub batches: Vec<Vec<String>>,
    /// Where the step's wall time went, as the host saw it.
    #[serde(default)]
    pub times: StepTimes,
}

/// Host seconds of a step's parts. On a GPU the work is queued, so these say where the host
/// thread spent the step: recording operations (`forward_s`, `backward_s`, `optimizer_s`) or
/// waiting for the device (`loss_read_s`, `grad_norm_s`, each a read of one number). When
/// recording dominates, the step is bound by the host, not by the GPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepTimes {
    /// Waiting for the micro-batches (gathered, their pixels sent to the device, ahead).
    pub data_s: f64,
    /// Seconds the upload thread spent sending the step's pixels to the device, a step ahead
    /// and overlapping the previous step (not part of this thread's time).
    #[serde(default)]
    pub upload_s: f64,
    /// The forward passes and losses of every micro-batch (with gradient checkpointing, the
    /// first pass; the blocks' reruns count as backward).
    pub forward_s: f64,
    /// Their backward passes and the gradients' accumulation.
    pub backward_s: f64,
    /// Reading the losses back (waits for the device to finish the backward passes).
    pub loss_read_s: f64,
    /// The all-reduce (several devices) and the global gradient norm, read back.
    pub grad_norm_s: f64,
    /// The optimizer's update of every parameter.
    pub optimizer_s: f64,
}

pub struct TrainOutcome {
    pub state: TrainerState,
    pub metrics: Vec<StepMetrics>,
    pub checkpoint: Option<PathBuf>,
    pub interrupted: bool,
    pub data_report: DataReport,
}

/// What the caller can change while a run goes on.
#[derive(Clone, Default)]
pub struct TrainControl {
    /// Set (by Ctrl-C) to save a checkpoint and stop after the current step.
    pub stop: Arc<AtomicBool>,
    /// Print progress to stderr.
    pub progress: bool,
    /// Test hook: a NaN is put into the pixels (or, without images, the loss) of this step's
    /// (1-based) first micro-batch.
    pub poison_step: Option<u64>,
    /// Test hook: let data-parallel replicas share a fused device, which `train` refuses
    /// otherwise, to reproduce burn-fusion's bug with them.
    pub replicas_share_fused_device: bool,
}

/// Sets whether each float parameter is trained (`require_grad`), by its path in the module.
struct Trainable<F: Fn(&str) -> bool> {
    path: Vec<String>,
    trainable: F,
}

impl<B: Backend, F: Fn(&str) -> bool> ModuleMapper<B> for Trainable<F> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let trainable = (self.trainable)(&self.path.join("."));
        Param::from_mapped_value(id, tensor.set_require_grad(trainable), mapper)
    }
}

pub fn set_trainable<B: Backend, M: Module<B>>(module: M, trainable: bool) -> M {
    set_trainable_where(module, |_: &str| trainable)
}

/// Trains the parameters whose path (inside `module`) passes `trainable`, freezes the rest.
pub fn set_trainable_where<B: Backend, M: Module<B>>(module: M, trainable: impl Fn(&str) -> bool) -> M {
    module.map(&mut Trainable { path: vec![], trainable })
}

/// Freezes and unfreezes the parts as the run's stage says: the projector always trains, the
/// LLM in stage 2 (only its LoRA adapters when LoRA is on), the tower when unfrozen.
pub fn apply_stage<B: Backend>(mut model: LlavaModel<B>, cfg: &TrainConfig) -> LlavaModel<B> {
    model.mm_projector = set_trainable(model.mm_projector, true);
    model.vision_tower = set_trainable(model.vision_tower, !cfg.freeze_vision_tower);
    let llm = cfg.stage == 2;
    if cfg.lora_enable {
        model.transformer = set_trainable_where(model.transformer, super::lora::is_lora);
    } else {
        model.transformer = set_trainable(model.transformer, llm);
    }
    model.lm_head = model.lm_head.map(|h| set_trainable(h, llm && !cfg.lora_enable));
    model
}

/// Our model file at `path`: a checkpoint directory (or a merged LoRA model), or a run directory
/// (its latest checkpoint). `None` for anything else (a reference checkpoint, an export, which
/// uses the reference's names, a projector file).
pub fn our_model_file(path: &Path) -> Option<PathBuf> {
    native_model_file(path).or_else(|| latest(path).and_then(|d| native_model_file(&d)))
}

/// The model file of one of our checkpoints (module paths as names), if `dir` holds one. Only
/// the safetensors header is read, not the (possibly gigabytes of) weights.
pub fn native_model_file(dir: &Path) -> Option<PathBuf> {
    use std::io::Read;
    let file = dir.join("model.safetensors");
    let mut reader = std::fs::File::open(&file).ok()?;
    let mut len = [0u8; 8];
    reader.read_exact(&mut len).ok()?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return None;
    }
    let mut header = vec![0u8; len as usize];
    reader.read_exact(&mut header).ok()?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header).ok()?;
    header.keys().any(|k| k.starts_with("vision_tower.") || k.starts_with("mm_projector.")).then_some(file)
}

/// The model a run starts from: a whole checkpoint (ours or a reference one), or parts.
pub fn initial_model<B: Backend>(cfg: &TrainConfig, config: &LlavaConfig, device: &B::Device) -> anyhow::Result<LlavaModel<B>> {
    let mut model = LlavaModel::<B>::new(config, device);
    if let Some(init) = &cfg.init_from {
        model = match our_model_file(init) {
            Some(file) => {
                checkpoint::load_model(&mut model, &file, None)?;
                model
            }
            None => crate::weights::load_llava_weights(model, config, init).with_context(|| format!("init_from = {}", init.display()))?.0,
        };
    } else {
        if let Some(path) = &cfg.vision_tower {
            let ckpt = llava_jp_import::Checkpoint::open(path)?;
            model.vision_tower = llava_jp_import::load_module(model.vision_tower, &ckpt, llava_jp_import::Layout::Clip, false)?.0;
        }
        if let Some(path) = &cfg.language_model {
            let lm = crate::model::Gpt2LmHeadModel { transformer: model.transformer, lm_head: model.lm_head };
            let has_head = lm.lm_head.is_some();
            let ckpt = llava_jp_import::Checkpoint::open(path)?;
            let lm = llava_jp_import::load_module(lm, &ckpt, llava_jp_import::Layout::Gpt2, has_head)?.0;
            model.transformer = lm.transformer;
            model.lm_head = lm.lm_head;
        }
    }
    if let Some(path) = &cfg.pretrain_mm_mlp_adapter {
        match our_model_file(path) {
            Some(file) => {
                checkpoint::load_model(&mut model, &file, Some(r"^mm_projector\."))?;
            }
            None => {
                let kind = ProjectorKind::parse(&config.mm_projector_type).map_err(anyhow::Error::msg)?;
                model.mm_projector = crate::weights::load_projector(model.mm_projector, kind, path)?.0;
            }
        }
    }
    Ok(model)
}

/// The model config as trained: dropout off when the run asks for it.
pub fn training_model_config(cfg: &TrainConfig) -> anyhow::Result<LlavaConfig> {
    let mut config = LlavaConfig::from_file(&cfg.model_config)?;
    if !cfg.dropout {
        config.text.resid_pdrop = 0.0;
        config.text.embd_pdrop = 0.0;
        config.text.attn_pdrop = 0.0;
        if let Some(v) = config.vision_config.as_mut() {
            v.attention_dropout = 0.0;
        }
    }
    Ok(config)
}

pub fn sample_builder(cfg: &TrainConfig, config: &LlavaConfig) -> anyhow::Result<SampleBuilder> {
    let mode = AspectMode::parse(&config.image_aspect_ratio).map_err(anyhow::Error::msg)?;
    Ok(SampleBuilder {
        tokenizer: TextTokenizer::from_file(&cfg.tokenizer)?,
        template: Template::by_name(&cfg.template).map_err(anyhow::Error::msg)?,
        image_processor: ImageProcessor::clip(config.vision().image_size, mode),
        image_folder: cfg.image_folder.clone(),
        max_length: config.max_length(),
        image_tokens: config.image_tokens(),
        truncate_long: cfg.truncate_long,
    })
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<f64>().ok()))
        .map_or(0.0, |pages| pages * 4096.0 / 1048576.0)
}

/// Tokens the model sees: text plus image features, cut to the maximum length as the model cuts.
fn spliced_tokens(batch: &Batch, image_tokens: usize, max_length: usize) -> usize {
    batch
        .examples
        .iter()
        .map(|e| (e.input_ids.len() + if e.pixel_values.is_some() { image_tokens - 1 } else { 0 }).min(max_length))
        .sum()
}

/// A text progress bar line.
fn progress_line(m: &StepMetrics, total: u64, eta_s: f64) -> String {
    let width = 24;
    let done = ((m.step as f64 / total.max(1) as f64) * width as f64).round() as usize;
    format!(
        "[{}{}] step {}/{} | loss {:.4} | lr {:.2e} | {:.0} tok/s | {:.0} MB{} | ETA {}",
        "#".repeat(done.min(width)),
        ".".repeat(width - done.min(width)),
        m.step,
        total,
        m.loss,
        m.lr,
        m.tokens_per_s,
        m.rss_mb,
        m.device_mb.map_or(String::new(), |d| format!(" (device {:.0} MB)", d.reserved)),
        format_duration(eta_s)
    )
}

pub fn format_duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// Runs (or resumes, from `resume`: a checkpoint directory or an output directory's latest) the
/// training `cfg` describes, on `device`.
/// Work for one data-parallel replica in one optimizer step.
struct ReplicaWork<B: Backend> {
    /// This replica's micro-batches (the step's `k`-th goes to replica `k % num_devices`).
    micro: Vec<DeviceBatch<B>>,
    /// The step's micro-batch count over all replicas: each loss is divided by it, so that the
    /// summed gradients are the mean over the step's micro-batches, as accumulation on one
    /// device makes them.
    micro_batches: f64,
    /// 0-based optimizer step (the schedule's position).
    step: u64,
}

/// Forward and backward over one replica's micro-batches: the gradients (each micro-batch's
/// mean loss divided by `micro_batches`) and the sum of the micro-batch losses. Micro-batch k
/// draws its dropout from `derive_seed(seed, k)`.
#[allow(clippy::too_many_arguments)]
fn local_gradients<B: AutodiffBackend>(
    model: &LlavaModel<B>,
    micro: &mut [DeviceBatch<B>],
    micro_batches: f64,
    size: usize,
    seed: u64,
    recompute: bool,
    poison: bool,
    times: &mut StepTimes,
) -> (GradientsParams, f64) {
    let mut accumulator = GradientsAccumulator::<LlavaModel<B>>::new();
    // Read back only once every backward is queued: a read waits for the device, and one between
    // a forward and its backward would leave the device idle while the backward is recorded.
    let mut losses = Vec::with_capacity(micro.len());
    // The pixels' buffers came from the upload thread's stream, whose next upload may reuse a
    // buffer as soon as it is freed: each is held until the loss read has seen this thread's
    // stream past its last use (freed on release, it was overwritten before the cast read it
    // when the stream still had the previous step's optimizer queued).
    let mut uploaded = Vec::with_capacity(micro.len());
    for (k, item) in micro.iter_mut().enumerate() {
        let poison = poison && k == 0;
        let batch = &item.batch;
        times.upload_s += item.upload_s;
        let started = Instant::now();
        let pixels = item.pixels.take().map(|flat| {
            uploaded.push(flat.clone());
            let flat = match poison {
                true => {
                    let nan = Tensor::<B, 1>::from_data(TensorData::new(vec![f32::NAN], [1]), (&flat.device(), burn::tensor::DType::F32));
                    flat.slice_assign([0..1], nan)
                }
                false => flat,
            };
            crate::backend::shape_pixels(flat, batch.images, size)
        });
        let run = MicroBatchRun {
            seed: derive_seed(seed, k as u64),
            loss_scale: 1.0 / micro_batches,
            loss_factor: if poison && batch.images == 0 { f32::NAN } else { 1.0 },
            recompute,
        };
        let (loss, forward_s) = accumulate_gradients(model, &batch.samples(), pixels, run, &mut accumulator);
        losses.push(loss);
        times.forward_s += forward_s;
        times.backward_s += started.elapsed().as_secs_f64() - forward_s;
    }
    // One read for all of them (a replica left without micro-batches at an epoch's end has none).
    let started = Instant::now();
    let loss_sum = match losses.is_empty() {
        true => 0.0,
        false => Tensor::cat(losses, 0).into_data().convert::<f32>().iter::<f32>().map(f64::from).sum(),
    };
    times.loss_read_s += started.elapsed().as_secs_f64();
    drop(uploaded);
    (accumulator.grads(), loss_sum)
}

/// Zero gradients for trainable parameters the loss did not reach on this replica (a batch
/// without pictures leaves the projector untouched), so that every replica all-reduces the
/// same parameters in the same order; returns, per trainable parameter in module order, 1 where
/// this replica's loss did reach it.
fn complete_gradients<B: AutodiffBackend>(model: &LlavaModel<B>, grads: &mut GradientsParams, device: &B::Device) -> Vec<f32> {
    struct Zeros<'a, B: AutodiffBackend> {
        grads: &'a mut GradientsParams,
        device: &'a B::Device,
        reached: Vec<f32>,
    }
    impl<B: AutodiffBackend> burn::module::ModuleVisitor<B> for Zeros<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if !param.is_require_grad() {
                return;
            }
            let reached = self.grads.get::<B::InnerBackend, D>(param.id).is_some();
            if !reached {
                let zeros = Tensor::<B::InnerBackend, D>::zeros(param.shape(), self.device);
                self.grads.register::<B::InnerBackend, D>(param.id, zeros);
            }
            self.reached.push(if reached { 1.0 } else { 0.0 });
        }
    }
    let mut zeros = Zeros::<B> { grads, device, reached: Vec::new() };
    model.visit(&mut zeros);
    zeros.reached
}

/// Removes the gradients of trainable parameters (in module order) that no replica reached, so
/// that, as on one device, the optimizer leaves them alone (no moment update, no decay).
fn drop_unreached<B: AutodiffBackend>(model: &LlavaModel<B>, grads: &mut GradientsParams, reached: &[f32]) {
    struct Unreached<'a> {
        grads: &'a mut GradientsParams,
        reached: &'a [f32],
        at: usize,
    }
    impl<B: AutodiffBackend> burn::module::ModuleVisitor<B> for Unreached<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if param.is_require_grad() {
                if self.reached[self.at] == 0.0 {
                    self.grads.remove::<B::InnerBackend, D>(param.id);
                }
                self.at += 1;
            }
        }
    }
    model.visit(&mut Unreached { grads, reached, at: 0 });
}

/// With several replicas: the gradients and the loss sum, summed over all of them (every
/// replica calls this once per step, in the same order).
fn all_reduce_step<B: AutodiffBackend>(
    peer: Option<PeerId>,
    model: &LlavaModel<B>,
    mut grads: GradientsParams,
    loss_sum: f64,
    device: &B::Device,
) -> anyhow::Result<(GradientsParams, f64)> {
    let Some(peer) = peer else { return Ok((grads, loss_sum)) };
    let reached = complete_gradients(model, &mut grads, device);
    let mut grads = grads.all_reduce::<B::InnerBackend>(peer, ReduceOperation::Sum).map_err(|e| anyhow::anyhow!("all-reduce of the gradients (replica {peer:?}): {e:?}"))?;
    // One vector: the loss sum, then how many replicas reached each trainable parameter.
    let mut values = vec![loss_sum as f32];
    values.extend(&reached);
    let n = values.len();
    let summed = Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(values, [n]), device);
    let summed = all_reduce::<B::InnerBackend>(peer, summed.into_primitive().tensor(), ReduceOperation::Sum)
        .map_err(|e| anyhow::anyhow!("all-reduce of the loss (replica {peer:?}): {e:?}"))?;
    let summed: Vec<f32> = Tensor::<B::InnerBackend, 1>::from_primitive(burn::tensor::TensorPrimitive::Float(summed)).into_data().to_vec().expect("f32 values");
    drop_unreached(model, &mut grads, &summed[1..]);
    Ok((grads, f64::from(summed[0])))
}

/// The learning rates and clipping of step `step` (0-based).
fn step_rates(cfg: &TrainConfig, step: u64, total_steps: u64, grad_norm: f64) -> StepRates {
    StepRates {
        lr: cosine_lr(cfg.learning_rate, step, total_steps, cfg.warmup_ratio),
        projector_lr: cfg.mm_projector_lr.map(|base| cosine_lr(base, step, total_steps, cfg.warmup_ratio)),
        grad_scale: clip_scale(grad_norm, cfg.max_grad_norm),
    }
}

fn new_optimizer<B: Backend>(cfg: &TrainConfig) -> AdamW<B> {
    let mut optim = AdamW::new(AdamWConfig { beta1: cfg.adam_beta1, beta2: cfg.adam_beta2, epsilon: cfg.adam_epsilon, weight_decay: cfg.weight_decay });
    optim.compute_copies = cfg.compute_dtype();
    optim
}

/// Drops the optimizer's compute-dtype copies of the parameters when a run ends, however it
/// ends (they are device memory the size of the trained weights).
struct DropComputeCopies;

impl Drop for DropComputeCopies {
    fn drop(&mut self) {
        #[cfg(feature = "cuda")]
        crate::fused_optim::drop_compute_copies();
    }
}

/// The frozen linear layers' casts for a run on `device` (see `super::frozen`), made now, in
/// allocations of their own as the weights are.
fn frozen_casts<B: AutodiffBackend>(model: &LlavaModel<B>, device: &B::Device, cfg: &TrainConfig) -> anyhow::Result<FrozenCasts<B>> {
    let make = |(mut frozen, model): (FrozenCasts<B>, LlavaModel<B>)| {
        frozen.prepare(model);
        // Queued casts run (and allocate) now, while allocations are persistent.
        B::sync(device).map(|_| frozen)
    };
    B::memory_persistent_allocations(device, (FrozenCasts::new(cfg.compute_dtype()), model.clone()), make)
        .map_err(|e| anyhow::anyhow!("casting the frozen layers' weights to {:?} on {device:?}: {e:?}", cfg.compute_dtype()))
}

/// The dropout seed of a step on a replica: it depends on the step (so a resumed run draws the
/// same masks) and the replica (so replicas do not share masks). Hashed, so that no replica's
/// micro-batch seed (`derive_seed` of this and the micro-batch's index) is another's.
fn dropout_seed(cfg: &TrainConfig, step: u64, rank: usize) -> u64 {
    derive_seed(cfg.seed.wrapping_mul(1_000_003).wrapping_add(step), rank as u64)
}

/// A data-parallel replica other than the first: it receives its share of each step, joins the
/// all-reduce, and takes the same optimizer step as every replica (the summed gradients are the
/// same everywhere, so the weights stay equal). It ends when the first replica hangs up.
#[allow(clippy::too_many_arguments)]
fn replica_loop<B: AutodiffBackend>(
    rank: usize,
    mut model: LlavaModel<B>,
    mut optim: AdamW<B::InnerBackend>,
    device: B::Device,
    cfg: TrainConfig,
    total_steps: u64,
    size: usize,
    collective: CollectiveConfig,
    work: std::sync::mpsc::Receiver<ReplicaWork<B>>,
) -> anyhow::Result<()> {
    let peer = PeerId::from(rank);
    let _release = ReleaseOnFailure::<B::InnerBackend>::new();
    register::<B::InnerBackend>(peer, device.clone(), collective).map_err(|e| anyhow::anyhow!("replica {rank}: joining the collective: {e:?}"))?;
    // The autocast guard is per thread.
    let _autocast = autocast(cfg.compute_dtype());
    let mut frozen = frozen_casts(&model, &device, &cfg)?;
    while let Ok(mut w) = work.recv() {
        let seed = dropout_seed(&cfg, w.step, rank);
        let (grads, loss_sum) =
            local_gradients(&frozen.apply(model.clone()), &mut w.micro, w.micro_batches, size, seed, cfg.gradient_checkpointing, false, &mut StepTimes::default());
        let (grads, loss_sum) = all_reduce_step(Some(peer), &model, grads, loss_sum, &device)?;
        let grad_norm = global_grad_norm(&model, &grads);
        if loss_sum.is_finite() && grad_norm.is_finite() {
            model = optim.step(model, grads, step_rates(&cfg, w.step, total_steps, grad_norm));
        } else if cfg.on_nonfinite == "stop" {
            break;
        }
    }
    finish_collective::<B::InnerBackend>(peer).map_err(|e| anyhow::anyhow!("replica {rank}: leaving the collective: {e:?}"))?;
    _release.disarm();
    Ok(())
}

/// Resets the process's collective when dropped armed (an error or a panic left this replica's
/// loop early), so that the replicas waiting in an all-reduce for it get an error instead of
/// waiting for ever, and a later run starts from a clean collective.
struct ReleaseOnFailure<B: Backend> {
    armed: std::cell::Cell<bool>,
    backend: std::marker::PhantomData<B>,
}

impl<B: Backend> ReleaseOnFailure<B> {
    fn new() -> Self {
        Self { armed: std::cell::Cell::new(true), backend: std::marker::PhantomData }
    }
    fn disarm(&self) {
        self.armed.set(false);
    }
}

impl<B: Backend> Drop for ReleaseOnFailure<B> {
    fn drop(&mut self) {
        if self.armed.get() {
            reset_collective::<B>();
        }
    }
}

/// Runs (or resumes) a training run on `devices`: one, or `cfg.num_devices` data-parallel
/// replicas, the first of which loads the data, logs and writes the checkpoints.
pub fn train<B: AutodiffBackend>(cfg: &TrainConfig, resume: Option<&Path>, devices: &[B::Device], control: &TrainControl) -> anyhow::Result<TrainOutcome> {
    anyhow::ensure!(
        devices.len() == cfg.num_devices,
        "num_devices = {} but {} device(s) were given to the trainer",
        cfg.num_devices,
        devices.len()
    );
    let device = &devices[0];
    let world = devices.len();
    // burn-fusion mixes up tensors that replicas' threads use on one device (tracel-ai/burn#4328,
    // #4347): the summed gradients come out wrong, or its device thread panics
    // (model-import/results/replicas-one-device-2026-12-06/). Flex has no fusion and is fine.
    if B::name(device).contains("fusion") && !control.replicas_share_fused_device {
        for (i, a) in devices.iter().enumerate() {
            if let Some(j) = devices[..i].iter().position(|b| b == a) {
                anyhow::bail!(
                    "num_devices = {world}: replicas {j} and {i} are both on {a:?}, and {} cannot run two replicas on one device \
                     (burn-fusion shares their tensors across threads and the gradient sums come out wrong); give each replica a device of its own",
                    B::name(device)
                );
            }
        }
    }
    let config = training_model_config(cfg)?;
    // Replicas share burn's one random generator (seeding it is process-wide), so a block rerun
    // for gradient checkpointing could draw other dropout masks than its first run drew.
    let block_dropout = config.text.resid_pdrop > 0.0 || config.text.attn_pdrop > 0.0 || cfg.lora().is_some_and(|l| l.dropout > 0.0);
    anyhow::ensure!(
        !(world > 1 && cfg.gradient_checkpointing && block_dropout),
        "gradient_checkpointing with dropout in the GPT-2 blocks works on one device only (num_devices = {world}): the replicas share one \
         random generator, so a block's rerun could draw other dropout masks than its first run; set dropout = false (and lora_dropout = 0) \
         or gradient_checkpointing = false"
    );
    let resume_dir = match resume {
        None => None,
        Some(p) if p.join("trainer_state.json").is_file() => Some(p.to_path_buf()),
        Some(p) => Some(latest(p).with_context(|| format!("--resume {}: no checkpoint there (no `latest`)", p.display()))?),
    };
    // Fresh weights (whatever no checkpoint provides) are drawn from the run's seed.
    B::seed(device, cfg.seed);
    // The weights go in allocations of their own size (cubecl's persistent memory on GPUs), and
    // so then does every later tensor of a weight's size: gradients and AdamW moments. In
    // cubecl's sliced pools they would share pages of up to a quarter of the GPU's memory.
    let build = |()| -> anyhow::Result<LlavaModel<B>> {
        let mut model: LlavaModel<B> = match &resume_dir {
            Some(_) => LlavaModel::new(&config, device),
            None => initial_model(cfg, &config, device)?,
        };
        if let Some(lora) = cfg.lora() {
            model.transformer = super::lora::add_lora(model.transformer, &lora, device).map_err(anyhow::Error::msg)?;
        }
        if let Some(dir) = &resume_dir {
            checkpoint::load_model(&mut model, &dir.join("model.safetensors"), None)?;
        }
        // Queued operations run (and allocate) now, while allocations are persistent.
        B::sync(device).map_err(|e| anyhow::anyhow!("building the model on {device:?}: {e:?}"))?;
        Ok(model)
    };
    let mut model = apply_stage(B::memory_persistent_allocations(device, (), build)?, cfg);

    let builder = Arc::new(sample_builder(cfg, &config)?);
    let dataset = Arc::new(LlavaDataset::open(&cfg.data, cfg.policy())?);
    for r in dataset.load_report.rejections.iter().take(20) {
        eprintln!("left out: {r}");
    }
    anyhow::ensure!(!dataset.is_empty(), "no usable record in {:?}", cfg.data);
    let loader = DataLoader::new(
        dataset.clone(),
        builder.clone(),
        LoaderConfig {
            batch_size: cfg.per_device_train_batch_size,
            shuffle: true,
            seed: cfg.seed,
            group_by_length: cfg.group_by_modality_length,
            workers: cfg.dataloader_num_workers,
            prefetch_batches: 4,
            drop_last: false,
            policy: cfg.policy(),
        },
    );
    let batches_per_epoch = dataset.len().div_ceil(cfg.per_device_train_batch_size);
    let steps_per_epoch = batches_per_epoch.div_ceil(cfg.gradient_accumulation_steps * world) as u64;
    let total_steps = cfg.max_steps.unwrap_or_else(|| (cfg.num_train_epochs * steps_per_epoch as f64).ceil() as u64).max(1);

    let mut optim = new_optimizer::<B::InnerBackend>(cfg);
    let mut state = TrainerState { total_steps, seed: cfg.seed, ..Default::default() };
    let metrics_path = cfg.output_dir.join("metrics.jsonl");
    let mut metrics: Vec<StepMetrics> = Vec::new();
    if let Some(dir) = &resume_dir {
        state = checkpoint::read_state(dir)?;
        anyhow::ensure!(state.total_steps == total_steps, "{}: the run had {} steps in total, this config makes {total_steps}", dir.display(), state.total_steps);
        let dtype = model.transformer.wte.weight.val().dtype();
        checkpoint::load_optimizer(&mut optim, &dir.join("optimizer.safetensors"), dtype, device)?;
        // The metrics file keeps the steps up to the checkpoint; later ones are redone.
        if let Ok(text) = std::fs::read_to_string(&metrics_path) {
            metrics = text.lines().filter_map(|l| serde_json::from_str::<StepMetrics>(l).ok()).filter(|m| m.step <= state.step).collect();
        }
    }
    std::fs::create_dir_all(&cfg.output_dir).with_context(|| cfg.output_dir.display().to_string())?;
    let mut metrics_file = std::fs::File::create(&metrics_path).with_context(|| metrics_path.display().to_string())?;
    for m in &metrics {
        writeln!(metrics_file, "{}", serde_json::to_string(m)?)?;
    }
    std::fs::write(cfg.output_dir.join("train_config.toml"), cfg.to_toml())?;

    let size = config.vision().image_size;
    // Data-parallel replicas 1.. on their own threads, each with a copy of the model and of the
    // optimizer state; replica 0 is this thread.
    // Everything that can fail is done before the first thread starts.
    let mut prepared = Vec::new();
    for (rank, replica_device) in devices.iter().enumerate().skip(1) {
        let mut replica_optim = new_optimizer::<B::InnerBackend>(cfg);
        if let Some(dir) = &resume_dir {
            let dtype = model.transformer.wte.weight.val().dtype();
            checkpoint::load_optimizer(&mut replica_optim, &dir.join("optimizer.safetensors"), dtype, replica_device)?;
        }
        // In persistent memory on its device too (see `build` above).
        let fork = |()| -> anyhow::Result<LlavaModel<B>> {
            let replica = model.clone().fork(replica_device);
            B::sync(replica_device).map_err(|e| anyhow::anyhow!("copying the model to {replica_device:?}: {e:?}"))?;
            Ok(replica)
        };
        let replica = B::memory_persistent_allocations(replica_device, (), fork)?;
        prepared.push((rank, replica, replica_optim, replica_device.clone()));
    }
    if world > 1 && cfg.dropout {
        eprintln!(
            "note: with {world} replicas the dropout masks come from one generator shared by the replicas' threads, so a resumed run does not repeat the same losses exactly"
        );
    }
    let collective = CollectiveConfig::default().with_num_devices(world);
    // From here on, a failure or panic on this thread resets the collective (see below).
    let release = (world > 1).then(ReleaseOnFailure::<B::InnerBackend>::new);
    let mut replicas = Vec::new();
    for (rank, replica, replica_optim, replica_device) in prepared {
        let (tx, rx) = std::sync::mpsc::channel::<ReplicaWork<B>>();
        let (cfg, collective) = (cfg.clone(), collective.clone());
        let handle = std::thread::Builder::new()
            .name(format!("replica-{rank}"))
            .spawn(move || replica_loop::<B>(rank, replica, replica_optim, replica_device, cfg, total_steps, size, collective, rx))?;
        replicas.push((tx, handle));
    }
    let peer = (world > 1).then(|| PeerId::from(0usize));
    if let Some(peer) = peer {
        register::<B::InnerBackend>(peer, device.clone(), collective).map_err(|e| anyhow::anyhow!("replica 0: joining the collective: {e:?}"))?;
    }

    let _autocast = autocast(cfg.compute_dtype());
    let _copies = DropComputeCopies;
    let mut frozen = frozen_casts(&model, device, cfg)?;
    let mut last_checkpoint: Option<PathBuf> = resume_dir.clone();
    let mut data_report = DataReport::default();
    let run_started = Instant::now();
    let elapsed_before = state.elapsed_s;
    let accum = cfg.gradient_accumulation_steps;
    let mut interrupted = false;
    let mut steps_this_run = 0u64;

    let save = |model: &LlavaModel<B>, optim: &AdamW<B::InnerBackend>, state: &TrainerState| -> anyhow::Result<PathBuf> {
        let dir = save_atomically(&cfg.output_dir, state.step, cfg.save_total_limit, |tmp| {
            checkpoint::save_model(model, &tmp.join("model.safetensors"))?;
            if cfg.lora_enable {
                // The adapters and the projector alone (LLaVA's `non_lora_trainables` beside them).
                checkpoint::save_model_filtered(model, &tmp.join("adapter.safetensors"), r"(\.lora\.|^mm_projector\.)")?;
            }
            checkpoint::save_optimizer(optim, &tmp.join("optimizer.safetensors"))?;
            checkpoint::write_json(&tmp.join("trainer_state.json"), state)?;
            std::fs::write(tmp.join("config.json"), config.to_json())
                .map_err(|e| checkpoint::CheckpointError::Io { path: tmp.join("config.json"), message: e.to_string() })?;
            std::fs::write(tmp.join("train_config.toml"), cfg.to_toml())
                .map_err(|e| checkpoint::CheckpointError::Io { path: tmp.join("train_config.toml"), message: e.to_string() })
        })?;
        Ok(dir)
    };

    let mut done = false;
    // The loop runs in a closure so that the replicas are released however it ends.
    let result = (|| -> anyhow::Result<()> {
        while state.step < total_steps && !done {
            let epoch = state.epoch;
            // A whole step's micro-batches gathered ahead, and their pixels sent to the
            // devices, while the devices run this one.
            let prefetched = loader.epoch(epoch, state.position).prefetched(accum * world);
            let mut batches = DeviceBatches::<B>::new(prefetched, devices.to_vec(), accum * world, size);
            let order_len = batches.order_len().max(1);
            loop {
                crate::backend::cuda_profile_step(device, state.step + 1);
                let step_started = Instant::now();
                let mut micro: Vec<DeviceBatch<B>> = Vec::with_capacity(accum * world);
                for batch in batches.by_ref() {
                    let batch = batch.map_err(|r| anyhow::anyhow!("{r} (bad_samples = \"fail\")"))?;
                    for r in &batch.batch.rejections {
                        if control.progress {
                            eprintln!("\nleft out: {r}");
                        }
                    }
                    micro.push(batch);
                    if micro.len() == accum * world {
                        break;
                    }
                }
                if micro.is_empty() {
                    break;
                }
                let micro_batches = micro.len() as f64;
                let samples: usize = micro.iter().map(|b| b.batch.len()).sum();
                let tokens: usize = micro.iter().map(|b| spliced_tokens(&b.batch, builder.image_tokens, builder.max_length)).sum();
                let batch_ids: Vec<Vec<String>> = micro.iter().map(|b| b.batch.examples.iter().map(|e| e.id.clone()).collect()).collect();
                let position = micro.last().expect("non-empty").batch.next_position;
                // Micro-batch k goes to replica k % world (as `DeviceBatches` sent its pixels).
                let mut shares: Vec<Vec<DeviceBatch<B>>> = (0..world).map(|_| Vec::new()).collect();
                for (k, batch) in micro.into_iter().enumerate() {
                    shares[k % world].push(batch);
                }
                let mut own = shares.remove(0);
                for ((tx, _), share) in replicas.iter().zip(shares) {
                    tx.send(ReplicaWork { micro: share, micro_batches, step: state.step })
                        .map_err(|_| anyhow::anyhow!("step {}: a data-parallel replica has stopped", state.step + 1))?;
                }
                let poison = control.poison_step == Some(state.step + 1);
                let mut times = StepTimes { data_s: step_started.elapsed().as_secs_f64(), ..StepTimes::default() };
                // Dropout masks depend on the step only, so a resumed run draws the same ones.
                let seed = dropout_seed(cfg, state.step, 0);
                let (grads, loss_sum) =
                    local_gradients(&frozen.apply(model.clone()), &mut own, micro_batches, size, seed, cfg.gradient_checkpointing, poison, &mut times);
                let norm_started = Instant::now();
                let (grads, loss_sum) = all_reduce_step(peer, &model, grads, loss_sum, device)?;
                let loss = loss_sum / micro_batches;
                let grad_norm = global_grad_norm(&model, &grads);
                times.grad_norm_s = norm_started.elapsed().as_secs_f64();
                let lr = cosine_lr(cfg.learning_rate, state.step, total_steps, cfg.warmup_ratio);
                let finite = loss.is_finite() && grad_norm.is_finite();
                if !finite && cfg.on_nonfinite == "stop" {
                    let (what, value) = if loss.is_finite() { ("gradient norm", grad_norm) } else { ("loss", loss) };
                    let last = last_checkpoint.as_ref().map_or("none (no checkpoint was written yet)".to_string(), |p| p.display().to_string());
                    return Err(NonFinite { step: state.step + 1, what, value, last_checkpoint: last }.into());
                }
                let optimizer_started = Instant::now();
                if finite {
                    model = optim.step(model, grads, step_rates(cfg, state.step, total_steps, grad_norm));
                }
                times.optimizer_s = optimizer_started.elapsed().as_secs_f64();
                if !finite && control.progress {
                    eprintln!("\nstep {}: non-finite loss or gradient ({loss}, {grad_norm}); step skipped (on_nonfinite = \"skip\")", state.step + 1);
                }
                state.step += 1;
                steps_this_run += 1;
                state.epoch = epoch;
                state.position = position;
                state.samples_seen += samples as u64;
                state.tokens_seen += tokens as u64;
                state.elapsed_s = elapsed_before + run_started.elapsed().as_secs_f64();
                let step_s = step_started.elapsed().as_secs_f64();
                let m = StepMetrics {
                    step: state.step,
                    epoch: epoch as f64 + position as f64 / order_len as f64,
                    loss,
                    lr,
                    grad_norm,
                    samples,
                    tokens,
                    tokens_per_s: tokens as f64 / step_s.max(1e-9),
                    elapsed_s: state.elapsed_s,
                    rss_mb: rss_mb(),
                    device_mb: crate::backend::device_memory(device),
                    skipped: !finite,
                    batches: batch_ids,
                    times,
                };
                writeln!(metrics_file, "{}", serde_json::to_string(&m)?)?;
                if control.progress && (state.step % cfg.logging_steps.max(1) == 0 || state.step == total_steps) {
                    let per_step = run_started.elapsed().as_secs_f64() / steps_this_run.max(1) as f64;
                    let eta = per_step * (total_steps - state.step) as f64;
                    eprint!("\r{}", progress_line(&m, total_steps, eta));
                }
                metrics.push(m);
                let stop = control.stop.load(Ordering::SeqCst);
                if state.step % cfg.save_steps.max(1) == 0 || state.step == total_steps || stop {
                    last_checkpoint = Some(save(&model, &optim, &state)?);
                }
                if stop {
                    interrupted = true;
                }
                if stop || state.step >= total_steps {
                    done = true;
                    break;
                }
            }
            data_report.merge(&batches.finish());
            if !done {
                state.epoch = epoch + 1;
                state.position = 0;
            }
        }
        Ok(())
    })();
    // Hang up on the replicas (they leave the collective when their queue closes), then wait.
    // After a failure here the collective is reset first, so that replicas waiting for this
    // one in an all-reduce return.
    let handles: Vec<_> = replicas.into_iter().map(|(_, handle)| handle).collect();
    let mut replica_error = None;
    if let (Err(_), Some(release)) = (&result, &release) {
        release.disarm();
        reset_collective::<B::InnerBackend>();
    } else if let Some(peer) = peer {
        if let Err(e) = finish_collective::<B::InnerBackend>(peer) {
            replica_error = Some(anyhow::anyhow!("replica 0: leaving the collective: {e:?}"));
        }
    }
    for (rank, handle) in handles.into_iter().enumerate() {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => replica_error = replica_error.or(Some(e)),
            Err(_) => replica_error = replica_error.or(Some(anyhow::anyhow!("data-parallel replica {} panicked", rank + 1))),
        }
    }
    result?;
    if let Some(e) = replica_error {
        return Err(e);
    }
    if let Some(release) = &release {
        release.disarm();
    }
    if control.progress {
        eprintln!();
    }
    metrics_file.flush()?;
    let mut report = dataset.load_report.clone();
    report.merge(&data_report);
    Ok(TrainOutcome { state, metrics, checkpoint: last_checkpoint, interrupted, data_report: report })
}

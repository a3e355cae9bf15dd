//! A training run's settings: a flat TOML file (`configs/stage1.toml`, ...) whose keys are HF
//! `TrainingArguments` / LLaVA's own argument names, overridden by `--set key=value` on the
//! command line. Relative paths are taken from the directory the command runs in.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::BadSamplePolicy;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    // --- model
    /// The LLaVA config (`config.json` form) of the model trained.
    pub model_config: PathBuf,
    /// A whole LLaVA checkpoint to start from (ours or the reference's); otherwise the parts below.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// A CLIP checkpoint for the vision tower (random when absent, as in the demo).
    #[serde(default)]
    pub vision_tower: Option<PathBuf>,
    /// A GPT-2 checkpoint for the language model (random when absent).
    #[serde(default)]
    pub language_model: Option<PathBuf>,
    /// A stage-1 projector: the reference's `mm_projector.bin`, or one of our checkpoints.
    #[serde(default)]
    pub pretrain_mm_mlp_adapter: Option<PathBuf>,
    /// Stage 1 trains the projector only; stage 2 the projector and the whole LLM.
    pub stage: u8,
    #[serde(default = "yes")]
    pub freeze_vision_tower: bool,
    /// LoRA on the LLM (stage 2): adapters and the projector train, the LLM stays frozen.
    #[serde(default)]
    pub lora_enable: bool,
    #[serde(default = "lora_r")]
    pub lora_r: usize,
    #[serde(default = "lora_alpha")]
    pub lora_alpha: f64,
    #[serde(default = "lora_dropout")]
    pub lora_dropout: f64,
    #[serde(default = "lora_targets")]
    pub lora_target_modules: Vec<String>,

    // --- data
    pub data: Vec<PathBuf>,
    #[serde(default = "dot")]
    pub image_folder: PathBuf,
    pub tokenizer: PathBuf,
    /// `plain` for stage 1, `v1` for stage 2.
    pub template: String,
    #[serde(default)]
    pub truncate_long: bool,
    #[serde(default = "skip")]
    pub bad_samples: String,
    #[serde(default)]
    pub dataloader_num_workers: usize,
    #[serde(default)]
    pub group_by_modality_length: bool,

    // --- optimisation
    pub output_dir: PathBuf,
    #[serde(default = "one_f")]
    pub num_train_epochs: f64,
    /// Stops after this many optimizer steps when set (and sizes the schedule to it).
    #[serde(default)]
    pub max_steps: Option<u64>,
    pub per_device_train_batch_size: usize,
    /// Data-parallel replicas (the first N GPUs on CUDA; threads on one device on flex, which
    /// checks the arithmetic rather than speeding anything up): each step takes
    /// `per_device_train_batch_size * gradient_accumulation_steps * num_devices` samples, and
    /// the replicas' gradients are summed through burn's collective all-reduce.
    #[serde(default = "one")]
    pub num_devices: usize,
    #[serde(default = "one")]
    pub gradient_accumulation_steps: usize,
    pub learning_rate: f64,
    #[serde(default)]
    pub mm_projector_lr: Option<f64>,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "warmup")]
    pub warmup_ratio: f64,
    #[serde(default = "one_f_opt")]
    pub max_grad_norm: Option<f64>,
    #[serde(default = "beta1")]
    pub adam_beta1: f64,
    #[serde(default = "beta2")]
    pub adam_beta2: f64,
    #[serde(default = "eps")]
    pub adam_epsilon: f64,
    #[serde(default = "seed")]
    pub seed: u64,
    /// `f32`, or `bf16` for mixed precision (f32 weights and optimizer state, bf16 matrix work).
    #[serde(default = "f32")]
    pub precision: String,
    /// Keep only each GPT-2 block's input in the forward pass and recompute the block's
    /// activations in the backward pass (transformers' gradient checkpointing): memory for one
    /// block's activations instead of all of them, for one more forward pass of the blocks.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Dropout probabilities of the config stay on while training unless this is false.
    #[serde(default = "yes")]
    pub dropout: bool,

    // --- bookkeeping
    #[serde(default = "save_steps")]
    pub save_steps: u64,
    /// Keep this many newest checkpoints (0: all).
    #[serde(default = "one")]
    pub save_total_limit: usize,
    #[serde(default = "one_u")]
    pub logging_steps: u64,
    /// `stop` (keep the last good checkpoint and exit with an error) or `skip` (drop the step).
    #[serde(default = "stop")]
    pub on_nonfinite: String,
}

fn lora_r() -> usize {
    128
}
fn lora_alpha() -> f64 {
    256.0
}
fn lora_dropout() -> f64 {
    0.05
}
fn lora_targets() -> Vec<String> {
    vec!["c_attn".into()]
}
fn yes() -> bool {
    true
}
fn dot() -> PathBuf {
    ".".into()
}
fn skip() -> String {
    "skip".into()
}
fn stop() -> String {
    "stop".into()
}
fn one() -> usize {
    1
}
fn one_u() -> u64 {
    1
}
fn one_f() -> f64 {
    1.0
}
fn one_f_opt() -> Option<f64> {
    Some(1.0)
}
fn warmup() -> f64 {
    0.03
}
fn beta1() -> f64 {
    0.9
}
fn beta2() -> f64 {
    0.999
}
fn eps() -> f64 {
    1e-8
}
fn seed() -> u64 {
    42
}
fn f32() -> String {
    "f32".into()
}
fn save_steps() -> u64 {
    500
}

#[derive(Debug, thiserror::Error)]
pub enum TrainConfigError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("--set {0}: expected key=value")]
    Override(String),
    #[error("{0}")]
    Invalid(String),
}

impl TrainConfig {
    /// Reads a TOML file and applies `key=value` overrides (values in TOML syntax; bare words are
    /// taken as strings).
    pub fn from_file(path: &Path, overrides: &[String]) -> Result<Self, TrainConfigError> {
        let file = |message: String| TrainConfigError::File { path: path.to_path_buf(), message };
        let text = std::fs::read_to_string(path).map_err(|e| file(e.to_string()))?;
        Self::from_toml(&text, overrides).map_err(|e| match e {
            TrainConfigError::Invalid(m) => file(m),
            e => e,
        })
    }

    pub fn from_toml(text: &str, overrides: &[String]) -> Result<Self, TrainConfigError> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| TrainConfigError::Invalid(e.to_string()))?;
        for o in overrides {
            let (key, value) = o.split_once('=').ok_or_else(|| TrainConfigError::Override(o.clone()))?;
            let value = format!("v = {value}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(value.to_string()));
            table.insert(key.trim().to_string(), value);
        }
        let config: Self = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| TrainConfigError::Invalid(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the config serialises")
    }

    fn validate(&self) -> Result<(), TrainConfigError> {
        let bad = |m: String| Err(TrainConfigError::Invalid(m));
        if !matches!(self.stage, 1 | 2) {
            return bad(format!("stage = {}: expected 1 (projector) or 2 (projector + LLM)", self.stage));
        }
        if self.per_device_train_batch_size == 0 || self.gradient_accumulation_steps == 0 || self.num_devices == 0 {
            return bad("per_device_train_batch_size, gradient_accumulation_steps and num_devices must be at least 1".into());
        }
        if !(self.learning_rate > 0.0) {
            return bad(format!("learning_rate = {}: expected a positive number", self.learning_rate));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad(format!("warmup_ratio = {}: expected 0 <= ratio < 1", self.warmup_ratio));
        }
        if !matches!(self.precision.as_str(), "f32" | "bf16" | "f16") {
            return bad(format!("precision = {:?}: expected f32 or bf16 (mixed)", self.precision));
        }
        if !matches!(self.on_nonfinite.as_str(), "stop" | "skip") {
            return bad(format!("on_nonfinite = {:?}: expected stop or skip", self.on_nonfinite));
        }
        self.bad_samples.parse::<BadSamplePolicy>().map_err(TrainConfigError::Invalid)?;
        crate::data::Template::by_name(&self.template).map_err(TrainConfigError::Invalid)?;
        if self.lora_enable && self.stage != 2 {
            return bad("lora_enable = true needs stage = 2 (LoRA adapts the LLM, which stage 1 does not train)".into());
        }
        if self.data.is_empty() {
            return bad("data: no data file".into());
        }
        Ok(())
    }

    pub fn lora(&self) -> Option<super::lora::LoraConfig> {
        self.lora_enable.then(|| super::lora::LoraConfig {
            r: self.lora_r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            target_modules: self.lora_target_modules.clone(),
        })
    }

    pub fn policy(&self) -> BadSamplePolicy {
        self.bad_samples.parse().expect("validated")
    }

    pub fn compute_dtype(&self) -> Option<burn::tensor::DType> {
        match self.precision.as_str() {
            "bf16" => Some(burn::tensor::DType::BF16),
            "f16" => Some(burn::tensor::DType::F16),
            _ => None,
        }
    }
}

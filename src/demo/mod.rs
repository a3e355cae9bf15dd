//! The end-to-end demo on the CPU: a synthetic Japanese visual QA dataset ([`synth`]), a
//! tokenizer trained on it in llm-jp's form, both LLaVA training stages through the real
//! trainer (the vision tower trains too, since nothing is pretrained), exact-match evaluation on
//! held-out pictures per question type ([`eval`]), and an exported model directory.

pub mod eval;
pub mod synth;

use std::path::{Path, PathBuf};

/// The demo's model: tiny CLIP (32-pixel pictures in 8-pixel patches: 16 image tokens, 2x2 per
/// grid cell) + projector + tiny GPT-2 (128 wide, 2 layers).
pub const MODEL_CONFIG: &str = include_str!("../../configs/demo.json");

/// How big a demo run is.
#[derive(Debug, Clone)]
pub struct DemoPlan {
    pub train_images: usize,
    pub eval_images: usize,
    pub stage1_steps: u64,
    pub stage2_steps: u64,
    pub batch_size: usize,
    pub seed: u64,
}

impl DemoPlan {
    /// The README's demo: a few minutes on two cores.
    pub fn full() -> Self {
        Self { train_images: 3000, eval_images: 150, stage1_steps: 60, stage2_steps: 1500, batch_size: 16, seed: 42 }
    }

    /// The test's demo: the same pipeline, shorter.
    pub fn quick() -> Self {
        Self { train_images: 1000, eval_images: 40, stage1_steps: 20, stage2_steps: 300, batch_size: 16, seed: 42 }
    }
}

/// Writes a training run's TOML (so that the user can read and rerun it) and reads it back.
pub fn stage_config(
    out: &Path,
    stage: u8,
    data: &Path,
    image_folder: &Path,
    tokenizer: &Path,
    init_from: Option<&Path>,
    plan: &DemoPlan,
) -> anyhow::Result<crate::train::TrainConfig> {
    let q = |p: &Path| format!("{:?}", p.display().to_string());
    let (template, lr, steps) = if stage == 1 { ("plain", 1e-3, plan.stage1_steps) } else { ("v1", 1e-3, plan.stage2_steps) };
    let mut text = format!(
        "# Demo stage {stage}: written by `llava-jp demo`; rerun with `llava-jp train --config <this file>`.\n\
         model_config = {model}\n\
         stage = {stage}\n\
         freeze_vision_tower = false\n\
         data = [{data}]\n\
         image_folder = {images}\n\
         tokenizer = {tokenizer}\n\
         template = \"{template}\"\n\
         output_dir = {run}\n\
         max_steps = {steps}\n\
         per_device_train_batch_size = {batch}\n\
         gradient_accumulation_steps = 1\n\
         learning_rate = {lr}\n\
         weight_decay = 0.0\n\
         warmup_ratio = 0.05\n\
         max_grad_norm = 1.0\n\
         seed = {seed}\n\
         precision = \"f32\"\n\
         dropout = false\n\
         save_steps = 1000000\n\
         save_total_limit = 1\n\
         logging_steps = 10\n\
         dataloader_num_workers = 1\n\
         group_by_modality_length = false\n",
        model = q(&out.join("model-config.json")),
        data = q(data),
        images = q(image_folder),
        tokenizer = q(tokenizer),
        run = q(&out.join(format!("run-stage{stage}"))),
        batch = plan.batch_size,
        seed = plan.seed,
    );
    if let Some(init) = init_from {
        text.push_str(&format!("init_from = {}\n", q(init)));
    }
    let path = out.join(format!("stage{stage}.toml"));
    std::fs::write(&path, text)?;
    Ok(crate::train::TrainConfig::from_file(&path, &[])?)
}

/// The demo's directories.
pub struct DemoPaths {
    pub out: PathBuf,
    pub data: PathBuf,
    pub tokenizer: PathBuf,
    pub model: PathBuf,
}

impl DemoPaths {
    pub fn new(out: &Path) -> Self {
        Self { out: out.to_path_buf(), data: out.join("data"), tokenizer: out.join("tokenizer"), model: out.join("model") }
    }
}

//! Building models from Hugging Face checkpoint directories: the config is read from
//! `config.json`, the module built, and the weights imported through `llava_jp_import`.

use std::path::{Path, PathBuf};

use burn::prelude::Backend;
use llava_jp_import::{load_module, Checkpoint, Layout, LoadReport};

use crate::config::{ClipVisionConfig, Gpt2Config, LlavaConfig};
use crate::model::{ClipVisionModel, Gpt2LmHeadModel, LlavaModel, Projector, ProjectorKind};

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Import(#[from] llava_jp_import::ImportError),
    #[error("{0}: no config.json")]
    NoConfig(PathBuf),
}

fn config_path(dir: &Path) -> Result<PathBuf, WeightsError> {
    let path = if dir.is_dir() { dir.join("config.json") } else { dir.with_file_name("config.json") };
    if path.is_file() {
        Ok(path)
    } else {
        Err(WeightsError::NoConfig(dir.to_path_buf()))
    }
}

/// A CLIP vision tower from a `CLIPModel` or `CLIPVisionModel` directory (or a weights file with
/// a `config.json` beside it).
pub fn load_clip<B: Backend>(dir: &Path, device: &B::Device) -> Result<(ClipVisionModel<B>, ClipVisionConfig, LoadReport), WeightsError> {
    let config = ClipVisionConfig::from_file(config_path(dir)?)?;
    let model = ClipVisionModel::new(&config, device);
    let (model, report) = load_module(model, &Checkpoint::open(dir)?, Layout::Clip, false)?;
    Ok((model, config, report))
}

/// A GPT-2 language model from a `GPT2LMHeadModel` (or `GPT2Model`) directory.
pub fn load_gpt2<B: Backend>(dir: &Path, device: &B::Device) -> Result<(Gpt2LmHeadModel<B>, Gpt2Config, LoadReport), WeightsError> {
    let config = Gpt2Config::from_file(config_path(dir)?)?;
    let model = Gpt2LmHeadModel::new(&config, device);
    let has_head = model.lm_head.is_some();
    let (model, report) = load_module(model, &Checkpoint::open(dir)?, Layout::Gpt2, has_head)?;
    Ok((model, config, report))
}

/// A whole LLaVA-JP model from its directory (reference checkpoints and our own exports).
pub fn load_llava<B: Backend>(dir: &Path, device: &B::Device) -> Result<(LlavaModel<B>, LlavaConfig, LoadReport), WeightsError> {
    let config = LlavaConfig::from_file(config_path(dir)?)?;
    let (model, report) = load_llava_weights(LlavaModel::new(&config, device), &config, dir)?;
    Ok((model, config, report))
}

/// Loads a whole LLaVA-JP checkpoint into an existing model of `config`'s shape.
pub fn load_llava_weights<B: Backend>(model: LlavaModel<B>, config: &LlavaConfig, weights: &Path) -> Result<(LlavaModel<B>, LoadReport), WeightsError> {
    let kind = ProjectorKind::parse(&config.mm_projector_type).expect("validated config");
    let has_head = model.lm_head.is_some();
    Ok(load_module(model, &Checkpoint::open(weights)?, Layout::LlavaJp(kind.layout()), has_head)?)
}

/// A projector from a stage-1 `mm_projector.bin` (keys `model.mm_projector.*`).
pub fn load_projector<B: Backend>(projector: Projector<B>, kind: ProjectorKind, path: &Path) -> Result<(Projector<B>, LoadReport), WeightsError> {
    Ok(load_module(projector, &Checkpoint::open(path)?, Layout::Projector(kind.layout()), false)?)
}

/// A LLaVA model assembled from its parts, as training starts: a CLIP checkpoint for the tower,
/// a GPT-2 checkpoint for the language model, and optionally a stage-1 projector (otherwise
/// the projector keeps its fresh initialisation).
pub fn llava_from_parts<B: Backend>(
    config: &LlavaConfig,
    clip_dir: &Path,
    llm_dir: &Path,
    projector: Option<&Path>,
    device: &B::Device,
) -> Result<LlavaModel<B>, WeightsError> {
    let mut model = LlavaModel::new(config, device);
    let (tower, _) = load_module(model.vision_tower, &Checkpoint::open(clip_dir)?, Layout::Clip, false)?;
    model.vision_tower = tower;
    let lm = Gpt2LmHeadModel { transformer: model.transformer, lm_head: model.lm_head };
    let has_head = lm.lm_head.is_some();
    let (lm, _) = load_module(lm, &Checkpoint::open(llm_dir)?, Layout::Gpt2, has_head)?;
    model.transformer = lm.transformer;
    model.lm_head = lm.lm_head;
    if let Some(path) = projector {
        let kind = ProjectorKind::parse(&config.mm_projector_type).expect("validated config");
        model.mm_projector = load_projector(model.mm_projector, kind, path)?.0;
    }
    Ok(model)
}

//! Training checkpoints: `checkpoint-NNNNNN/` under the output directory, holding the model
//! (`model.safetensors`, module paths as names, master dtype), the optimizer moments
//! (`optimizer.safetensors`, keyed by parameter path), `trainer_state.json` (step, epoch, data
//! position, seed, counters), the model's `config.json` and the run's `train_config.toml`.
//!
//! A checkpoint is written into a hidden temporary directory and renamed into place, then the
//! `latest` file is replaced by a rename too: a crash mid-write leaves the previous checkpoint
//! and `latest` as they were.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn_store::{ModuleSnapshot, SafetensorsStore};

use super::optim::{AdamW, Moments};

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: u64,
    /// The epoch the next batch comes from, and how far into its order.
    pub epoch: usize,
    pub position: usize,
    pub total_steps: u64,
    pub seed: u64,
    pub samples_seen: u64,
    pub tokens_seen: u64,
    pub elapsed_s: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CheckpointError + '_ {
    move |e| CheckpointError::Io { path: path.to_path_buf(), message: e.to_string() }
}

pub fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step:06}")
}

/// The checkpoint `latest` names in `output_dir`, if any.
pub fn latest(output_dir: &Path) -> Option<PathBuf> {
    let name = std::fs::read_to_string(output_dir.join("latest")).ok()?;
    let dir = output_dir.join(name.trim());
    dir.join("trainer_state.json").is_file().then_some(dir)
}

/// Writes every file of a checkpoint through `write` into a temporary directory, renames it to
/// `checkpoint-{step}`, points `latest` at it and removes checkpoints beyond `keep` (0: keep all).
pub fn save_atomically(
    output_dir: &Path,
    step: u64,
    keep: usize,
    write: impl FnOnce(&Path) -> Result<(), CheckpointError>,
) -> Result<PathBuf, CheckpointError> {
    std::fs::create_dir_all(output_dir).map_err(io(output_dir))?;
    let name = checkpoint_name(step);
    let tmp = output_dir.join(format!(".{name}.partial"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    write(&tmp)?;
    let dir = output_dir.join(&name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
    let latest_tmp = output_dir.join(".latest.partial");
    std::fs::write(&latest_tmp, &name).map_err(io(&latest_tmp))?;
    std::fs::rename(&latest_tmp, output_dir.join("latest")).map_err(io(output_dir))?;
    if keep > 0 {
        let mut all: Vec<PathBuf> = std::fs::read_dir(output_dir)
            .map_err(io(output_dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("checkpoint-")))
            .collect();
        all.sort();
        let excess = all.len().saturating_sub(keep);
        for old in all.into_iter().take(excess) {
            if old != dir {
                std::fs::remove_dir_all(&old).map_err(io(&old))?;
            }
        }
    }
    Ok(dir)
}

/// The model's parameters under their module paths.
pub fn save_model<B: Backend, M: ModuleSnapshot<B>>(model: &M, path: &Path) -> Result<(), CheckpointError> {
    let mut store = SafetensorsStore::from_file(path);
    model.save_into(&mut store).map_err(|e| CheckpointError::Io { path: path.into(), message: format!("{e:?}") })
}

/// The parameters whose path matches `pattern` (a regular expression).
pub fn save_model_filtered<B: Backend, M: ModuleSnapshot<B>>(model: &M, path: &Path, pattern: &str) -> Result<(), CheckpointError> {
    let mut store = SafetensorsStore::from_file(path).with_regex(pattern);
    model.save_into(&mut store).map_err(|e| CheckpointError::Io { path: path.into(), message: format!("{e:?}") })
}

/// Loads parameters saved by [`save_model`]. With `only` (a regular expression over paths), just
/// the matching parameters are applied and the others may be absent; without it every parameter
/// of `model` must be in the file.
pub fn load_model<B: Backend, M: ModuleSnapshot<B>>(model: &mut M, path: &Path, only: Option<&str>) -> Result<usize, CheckpointError> {
    let err = |message: String| CheckpointError::Io { path: path.into(), message };
    if !path.is_file() {
        return Err(err("no such file".into()));
    }
    let mut store = SafetensorsStore::from_file(path).allow_partial(only.is_some());
    if let Some(pattern) = only {
        store = store.with_regex(pattern);
    }
    let result = model.load_from(&mut store).map_err(|e| err(format!("{e:?}")))?;
    if !result.errors.is_empty() {
        return Err(err(format!("{:?}", result.errors)));
    }
    if only.is_none() && !result.missing.is_empty() {
        let missing: Vec<&str> = result.missing.iter().map(|(p, _)| p.as_str()).take(10).collect();
        return Err(err(format!("{} parameters missing, e.g. {missing:?}", result.missing.len())));
    }
    if result.applied.is_empty() {
        return Err(err(format!("no parameter applied{}", only.map(|p| format!(" under `{p}`")).unwrap_or_default())));
    }
    Ok(result.applied.len())
}

/// The optimizer's moments as f32 safetensors (`{path}.exp_avg`, `{path}.exp_avg_sq`) plus its
/// step count in the metadata.
pub fn save_optimizer<B: Backend>(optim: &AdamW<B>, path: &Path) -> Result<(), CheckpointError> {
    let mut data: Vec<(String, Vec<u8>, usize)> = Vec::new();
    for (name, m) in &optim.state {
        for (suffix, t) in [("exp_avg", &m.exp_avg), ("exp_avg_sq", &m.exp_avg_sq)] {
            let values: Vec<f32> = t.clone().cast(burn::tensor::DType::F32).into_data().to_vec().expect("f32 data");
            let n = values.len();
            data.push((format!("{name}.{suffix}"), values.iter().flat_map(|v| v.to_le_bytes()).collect(), n));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(k, bytes, n)| (k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*n], bytes).expect("sizes agree")))
        .collect();
    let meta: std::collections::HashMap<String, String> = [("step".to_string(), optim.step.to_string())].into();
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| CheckpointError::Io { path: path.into(), message: e.to_string() })
}

pub fn load_optimizer<B: Backend>(optim: &mut AdamW<B>, path: &Path, dtype: burn::tensor::DType, device: &B::Device) -> Result<(), CheckpointError> {
    let err = |message: String| CheckpointError::Io { path: path.into(), message };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| err(e.to_string()))?;
    let step = meta.metadata().as_ref().and_then(|m| m.get("step")).and_then(|s| s.parse().ok()).ok_or_else(|| err("no step in the metadata".into()))?;
    let tensors = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| err(e.to_string()))?;
    let mut halves: BTreeMap<String, (Option<Tensor<B, 1>>, Option<Tensor<B, 1>>)> = BTreeMap::new();
    for (name, view) in tensors.tensors() {
        let values: Vec<f32> = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let n = values.len();
        let t = Tensor::<B, 1>::from_data(TensorData::new(values, [n]), device).cast(dtype);
        if let Some(p) = name.strip_suffix(".exp_avg_sq") {
            halves.entry(p.to_string()).or_default().1 = Some(t);
        } else if let Some(p) = name.strip_suffix(".exp_avg") {
            halves.entry(p.to_string()).or_default().0 = Some(t);
        } else {
            return Err(err(format!("unexpected tensor `{name}`")));
        }
    }
    optim.state.clear();
    for (name, pair) in halves {
        match pair {
            (Some(exp_avg), Some(exp_avg_sq)) => {
                optim.state.insert(name, Moments { exp_avg, exp_avg_sq });
            }
            _ => return Err(err(format!("`{name}` lacks one of its two moments"))),
        }
    }
    optim.step = step;
    Ok(())
}

pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), CheckpointError> {
    std::fs::write(path, serde_json::to_string_pretty(value).expect("serialisable")).map_err(io(path))
}

pub fn read_state(dir: &Path) -> Result<TrainerState, CheckpointError> {
    let path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text).map_err(|e| CheckpointError::Io { path, message: e.to_string() })
}

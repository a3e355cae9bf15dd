//! Parity against transformers: reference fixtures (made by `model-import/scripts/
//! make_fixtures.py`) hold a checkpoint, inputs and transformers' outputs; the checks here load
//! the checkpoint on any backend, run the same inputs, and report the largest differences.
//! Tests assert on them; `llava-jp check` prints them (full-size runs on the GPU machine).

use std::collections::BTreeMap;
use std::path::Path;

use burn::prelude::*;
use llava_jp_import::{Checkpoint, StoredTensor};

use crate::model::{KvCache, Sample};
use crate::weights::{load_clip, load_gpt2, load_llava, llava_from_parts};

/// The largest differences between our output and the reference's over the compared elements.
/// `max_rel` is `max_abs` divided by the largest reference magnitude, a scale-free figure.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub name: String,
    pub max_abs: f32,
    pub max_rel: f32,
    pub elements: usize,
}

impl std::fmt::Display for Comparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:<44} max_abs {:.3e}  max_rel {:.3e}  ({} values)", self.name, self.max_abs, self.max_rel, self.elements)
    }
}

/// Compares `actual` with `expected` where `keep` (one flag per row of `width` values) is true.
pub fn compare(name: &str, actual: &[f32], expected: &[f32], keep: Option<(&[bool], usize)>) -> Comparison {
    assert_eq!(actual.len(), expected.len(), "{name}: {} values vs {} expected", actual.len(), expected.len());
    let mut max_abs = 0f32;
    let mut scale = 0f32;
    let mut elements = 0;
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        if let Some((rows, width)) = keep {
            if !rows[i / width] {
                continue;
            }
        }
        let diff = (a - e).abs();
        // NaN anywhere must fail the comparison, not vanish in max().
        max_abs = if diff.is_nan() { f32::INFINITY } else { max_abs.max(diff) };
        scale = scale.max(e.abs());
        elements += 1;
    }
    Comparison { name: name.to_string(), max_abs, max_rel: max_abs / scale.max(f32::MIN_POSITIVE), elements }
}

/// Named tensors of a fixture file.
pub struct Tensors {
    tensors: BTreeMap<String, StoredTensor>,
    file: String,
}

impl Tensors {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(Self { tensors: Checkpoint::open(path)?.tensors, file: path.display().to_string() })
    }

    fn get(&self, key: &str) -> anyhow::Result<&StoredTensor> {
        self.tensors.get(key).ok_or_else(|| anyhow::anyhow!("{}: no tensor `{key}`", self.file))
    }

    pub fn shape(&self, key: &str) -> anyhow::Result<Vec<usize>> {
        Ok(self.get(key)?.shape())
    }

    pub fn f32(&self, key: &str) -> anyhow::Result<Vec<f32>> {
        Ok(self.get(key)?.read_f32()?)
    }

    pub fn i64(&self, key: &str) -> anyhow::Result<Vec<i64>> {
        Ok(self.get(key)?.read_i64()?)
    }

    pub fn float<B: Backend, const D: usize>(&self, key: &str, device: &B::Device) -> anyhow::Result<Tensor<B, D>> {
        let shape: [usize; D] = self.shape(key)?.try_into().map_err(|s| anyhow::anyhow!("{}: `{key}` has shape {s:?}, expected rank {D}", self.file))?;
        Ok(Tensor::from_data(TensorData::new(self.f32(key)?, shape), device))
    }

    /// Ragged rows stored padded as `[rows, max]` with their lengths in `{key}_lengths`.
    pub fn ragged(&self, key: &str) -> anyhow::Result<Vec<Vec<i64>>> {
        let [_, width]: [usize; 2] = self.shape(key)?.try_into().map_err(|_| anyhow::anyhow!("`{key}` is not 2-D"))?;
        let values = self.i64(key)?;
        let lengths = self.i64(&format!("{key}_lengths"))?;
        Ok(lengths.iter().enumerate().map(|(r, &n)| values[r * width..r * width + n as usize].to_vec()).collect())
    }
}

pub fn to_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert_dtype(burn::tensor::DType::F32).into_vec::<f32>().expect("f32 data")
}

fn bool_mask(values: &[i64]) -> Vec<bool> {
    values.iter().map(|&v| v != 0).collect()
}

/// The weights files of a fixture directory: every format the script saved.
fn weight_files(dir: &Path) -> Vec<std::path::PathBuf> {
    ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"]
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| p.is_file())
        .collect()
}

fn file_label(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// CLIP: every hidden state and the pooled output, from each saved weights format.
pub fn check_clip<B: Backend>(dir: &Path, device: &B::Device) -> anyhow::Result<Vec<Comparison>> {
    let inputs = Tensors::open(&dir.join("inputs.safetensors"))?;
    let expected = Tensors::open(&dir.join("expected.safetensors"))?;
    let mut out = Vec::new();
    for weights in weight_files(dir) {
        let (model, config, _) = load_clip::<B>(&weights, device)?;
        let pixels = inputs.float::<B, 4>("pixel_values", device)?;
        let result = model.forward(pixels, config.num_hidden_layers);
        let label = file_label(&weights);
        for (i, h) in result.hidden_states.into_iter().enumerate() {
            let key = format!("hidden_states.{i}");
            out.push(compare(&format!("clip[{label}] {key}"), &to_f32(h), &expected.f32(&key)?, None));
        }
        let pooled = result.pooler_output.expect("all layers ran");
        out.push(compare(&format!("clip[{label}] pooler_output"), &to_f32(pooled), &expected.f32("pooler_output")?, None));
    }
    Ok(out)
}

/// GPT-2: logits of a right-padded and a left-padded batch at the real positions, from each
/// weights format; and cached decoding (prefill, then one token at a time) against them.
pub fn check_gpt2<B: Backend>(dir: &Path, device: &B::Device) -> anyhow::Result<Vec<Comparison>> {
    let inputs = Tensors::open(&dir.join("inputs.safetensors"))?;
    let expected = Tensors::open(&dir.join("expected.safetensors"))?;
    let mut out = Vec::new();
    for weights in weight_files(dir) {
        let (model, config, _) = load_gpt2::<B>(&weights, device)?;
        let label = file_label(&weights);
        for side in ["right", "left"] {
            let ids_key = format!("input_ids_{side}");
            let [b, t]: [usize; 2] = inputs.shape(&ids_key)?.try_into().expect("2-D ids");
            let ids = inputs.i64(&ids_key)?;
            let mask = bool_mask(&inputs.i64(&format!("attention_mask_{side}"))?);
            let positions = inputs.i64(&format!("position_ids_{side}"))?;
            let ids_t = Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [b, t]), device);
            let pos_t = Tensor::<B, 2, Int>::from_data(TensorData::new(positions.clone(), [b, t]), device);
            let valid_t = Tensor::<B, 2, Bool>::from_data(TensorData::new(mask.clone(), [b, t]), device);
            let logits = model.forward(ids_t, pos_t, valid_t, None);
            let reference = expected.f32(&format!("logits_{side}"))?;
            let v = config.vocab_size;
            out.push(compare(&format!("gpt2[{label}] logits, {side} padding"), &to_f32(logits), &reference, Some((&mask, v))));

            // Cached: prefill all but the last 3 columns, then decode them one by one.
            let mut cache = KvCache::new(config.n_layer);
            let prefill = t - 3;
            let cols = |from: usize, to: usize, data: &[i64]| -> Vec<i64> {
                (0..b).flat_map(|r| data[r * t + from..r * t + to].to_vec()).collect()
            };
            let cols_b = |from: usize, to: usize| -> Vec<bool> { (0..b).flat_map(|r| mask[r * t + from..r * t + to].to_vec()).collect() };
            let mut pieces = Vec::new();
            let mut start = 0;
            for end in [prefill, prefill + 1, prefill + 2, t] {
                let w = end - start;
                let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(cols(start, end, &ids), [b, w]), device);
                let pos = Tensor::<B, 2, Int>::from_data(TensorData::new(cols(start, end, &positions), [b, w]), device);
                let valid = Tensor::<B, 2, Bool>::from_data(TensorData::new(cols_b(start, end), [b, w]), device);
                pieces.push(model.forward(ids, pos, valid, Some(&mut cache)));
                start = end;
            }
            let cached = Tensor::cat(pieces, 1);
            out.push(compare(&format!("gpt2[{label}] cached decode, {side} padding"), &to_f32(cached), &reference, Some((&mask, v))));
        }
    }
    Ok(out)
}

/// LLaVA: logits and loss of a batch of two samples of different lengths with one image each
/// (right and left padding), and of one sample with two images (cut by truncation); from each
/// weights format and from the parts (CLIP + GPT-2 + `mm_projector.bin`).
pub fn check_llava<B: Backend>(dir: &Path, device: &B::Device) -> anyhow::Result<Vec<Comparison>> {
    let inputs = Tensors::open(&dir.join("inputs.safetensors"))?;
    let expected = Tensors::open(&dir.join("expected.safetensors"))?;
    let mut models = Vec::new();
    for weights in weight_files(dir) {
        let (model, config, _) = load_llava::<B>(&weights, device)?;
        models.push((file_label(&weights), model, config));
    }
    let parts = dir.join("parts");
    if parts.is_dir() {
        let config = crate::config::LlavaConfig::from_file(dir.join("config.json"))?;
        let model = llava_from_parts::<B>(&config, &parts.join("clip"), &parts.join("llm"), Some(&dir.join("mm_projector.bin")), device)?;
        models.push(("parts".into(), model, config));
    }
    let mut out = Vec::new();
    for (label, model, config) in models {
        let v = config.text.vocab_size;
        for (batch, pixels_key, sides) in [("a", "pixel_values_a", &["right", "left"][..]), ("b", "pixel_values_b", &["right"][..])] {
            let ids = inputs.ragged(&format!("input_ids_{batch}"))?;
            let labels = inputs.ragged(&format!("labels_{batch}"))?;
            let samples: Vec<Sample> =
                ids.into_iter().zip(labels).map(|(input_ids, labels)| Sample { input_ids, labels: Some(labels) }).collect();
            let pixels = inputs.float::<B, 4>(pixels_key, device)?;
            let features = model.encode_images(pixels);
            for side in sides {
                let prepared = model.prepare_inputs_padded(&samples, Some(features.clone()), *side == "left");
                let key_mask = format!("mask_{batch}_{side}");
                let mask = bool_mask(&expected.i64(&key_mask)?);
                let ours_mask: Vec<bool> = to_bool(prepared.key_valid.clone());
                anyhow::ensure!(ours_mask == mask, "llava[{label}] batch {batch} {side}: our attention mask {ours_mask:?} differs from the reference's {mask:?}");
                let logits = model.forward_embeds(prepared.inputs_embeds, prepared.position_ids, prepared.key_valid, None);
                let loss = crate::model::llava::shifted_cross_entropy(logits.clone(), prepared.labels.as_ref().expect("labelled"));
                let name = format!("llava[{label}] batch {batch} logits, {side} padding");
                out.push(compare(&name, &to_f32(logits), &expected.f32(&format!("logits_{batch}_{side}"))?, Some((&mask, v))));
                let name = format!("llava[{label}] batch {batch} loss, {side} padding");
                out.push(compare(&name, &to_f32(loss), &expected.f32(&format!("loss_{batch}_{side}"))?, None));
            }
        }
    }
    Ok(out)
}

fn to_bool<B: Backend, const D: usize>(t: Tensor<B, D, Bool>) -> Vec<bool> {
    t.int().into_data().convert_dtype(burn::tensor::DType::I64).into_vec::<i64>().expect("int data").into_iter().map(|v| v != 0).collect()
}

/// Runs the check that fits the fixture directory (its `fixture.json` names the kind).
pub fn check_fixture<B: Backend>(dir: &Path, device: &B::Device) -> anyhow::Result<Vec<Comparison>> {
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("fixture.json"))?)?;
    match meta.get("kind").and_then(|k| k.as_str()) {
        Some("clip") => check_clip::<B>(dir, device),
        Some("gpt2") => check_gpt2::<B>(dir, device),
        Some("llava") => check_llava::<B>(dir, device),
        other => anyhow::bail!("{}: unknown fixture kind {other:?}", dir.join("fixture.json").display()),
    }
}

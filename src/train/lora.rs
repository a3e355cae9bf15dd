//! LoRA on the language model, as LLaVA-JP's `--lora_enable` does it through PEFT: adapters on
//! the GPT-2 `Conv1D` layers named by `target_modules` (`c_attn` by default; a name matches a
//! layer whose path ends with it, as PEFT matches), trained together with the projector while
//! the LLM stays frozen; saved alone; merged into a plain model.

use burn::prelude::*;

use crate::model::nn::{Conv1D, LoraAdapter};
use crate::model::Gpt2Model;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    /// The reference's values: r 128, alpha 256, dropout 0.05 on `c_attn`.
    fn default() -> Self {
        Self { r: 128, alpha: 256.0, dropout: 0.05, target_modules: vec!["c_attn".into()] }
    }
}

/// The `Conv1D` layers of one block, by their path inside it.
const LAYERS: [&str; 4] = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"];

fn targeted(layer: &str, targets: &[String]) -> bool {
    targets.iter().any(|t| layer == t || layer.ends_with(&format!(".{t}")))
}

/// Puts fresh adapters on the targeted layers of every block. An unknown target is an error
/// that lists the layer names there are.
pub fn add_lora<B: Backend>(mut model: Gpt2Model<B>, config: &LoraConfig, device: &B::Device) -> Result<Gpt2Model<B>, String> {
    for t in &config.target_modules {
        if !LAYERS.iter().any(|l| targeted(l, std::slice::from_ref(t))) {
            return Err(format!("lora_target_modules: `{t}` names no layer of GPT-2 (there are {LAYERS:?} in every block)"));
        }
    }
    if config.r == 0 {
        return Err("lora_r must be at least 1".into());
    }
    let attach = |layer: &mut Conv1D<B>| {
        let [d_in, d_out] = layer.weight.val().dims();
        layer.lora = Some(LoraAdapter::new(d_in, d_out, config.r, config.alpha, config.dropout, device));
    };
    for block in model.h.iter_mut() {
        for name in LAYERS {
            if !targeted(name, &config.target_modules) {
                continue;
            }
            match name {
                "attn.c_attn" => attach(&mut block.attn.c_attn),
                "attn.c_proj" => attach(&mut block.attn.c_proj),
                "mlp.c_fc" => attach(&mut block.mlp.c_fc),
                _ => attach(&mut block.mlp.c_proj),
            }
        }
    }
    Ok(model)
}

/// Folds every adapter into its layer's weight.
pub fn merge_lora<B: Backend>(mut model: Gpt2Model<B>) -> Gpt2Model<B> {
    model.h = model
        .h
        .into_iter()
        .map(|mut block| {
            block.attn.c_attn = block.attn.c_attn.merge_lora();
            block.attn.c_proj = block.attn.c_proj.merge_lora();
            block.mlp.c_fc = block.mlp.c_fc.merge_lora();
            block.mlp.c_proj = block.mlp.c_proj.merge_lora();
            block
        })
        .collect();
    model
}

/// Whether a parameter path belongs to a LoRA adapter.
pub fn is_lora(path: &str) -> bool {
    path.contains(".lora.")
}

/// Writes a plain model directory (`model.safetensors` without adapters, `config.json`) from a
/// LoRA run's checkpoint: its adapters folded into the LLM's weights. The result loads wherever
/// a model directory of ours does (`init_from`, chat, export).
pub fn merge_lora_checkpoint<B: Backend>(checkpoint: &std::path::Path, out: &std::path::Path, device: &B::Device) -> anyhow::Result<()> {
    use anyhow::Context;
    let train = super::TrainConfig::from_file(&checkpoint.join("train_config.toml"), &[])?;
    let lora = train.lora().with_context(|| format!("{}: not a LoRA run (lora_enable = false)", checkpoint.display()))?;
    let config = crate::config::LlavaConfig::from_file(checkpoint.join("config.json"))?;
    let mut model = crate::model::LlavaModel::<B>::new(&config, device);
    model.transformer = add_lora(model.transformer, &lora, device).map_err(anyhow::Error::msg)?;
    super::checkpoint::load_model(&mut model, &checkpoint.join("model.safetensors"), None)?;
    model.transformer = merge_lora(model.transformer);
    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    super::checkpoint::save_model(&model, &out.join("model.safetensors"))?;
    std::fs::write(out.join("config.json"), config.to_json())?;
    Ok(())
}

//! Model configurations, read from Hugging Face `config.json` files as they are: a CLIP config
//! (`CLIPConfig` with `vision_config`, or `CLIPVisionConfig`), a GPT-2 config, and a LLaVA-JP
//! config (a GPT-2 config with `mm_*` fields). Defaults are those of transformers' classes, so a
//! file that leaves a field out means what it means to transformers.

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    Read { path: String, message: String },
    #[error("{path}: `{key}` = {value}: {expected}")]
    Invalid { path: String, key: &'static str, value: String, expected: String },
}

fn read_json(path: &Path) -> Result<serde_json::Value, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::Read { path: path.display().to_string(), message: e.to_string() })?;
    serde_json::from_str(&text)
        .map_err(|e| ConfigError::Read { path: path.display().to_string(), message: e.to_string() })
}

fn from_value<T: for<'de> Deserialize<'de>>(value: serde_json::Value, path: &str) -> Result<T, ConfigError> {
    serde_json::from_value(value)
        .map_err(|e| ConfigError::Read { path: path.to_string(), message: e.to_string() })
}

/// transformers' `CLIPVisionConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "d::clip_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d::clip_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d::twelve")]
    pub num_hidden_layers: usize,
    #[serde(default = "d::twelve")]
    pub num_attention_heads: usize,
    #[serde(default = "d::three")]
    pub num_channels: usize,
    #[serde(default = "d::clip_image")]
    pub image_size: usize,
    #[serde(default = "d::clip_patch")]
    pub patch_size: usize,
    #[serde(default = "d::quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "d::eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub attention_dropout: f64,
}

impl ClipVisionConfig {
    /// Reads a CLIP `config.json`: the `vision_config` of a `CLIPConfig`, or the whole file for a
    /// `CLIPVisionConfig`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        Self::from_json(read_json(path)?, &path.display().to_string())
    }

    pub fn from_json(mut value: serde_json::Value, source: &str) -> Result<Self, ConfigError> {
        if let Some(vision) = value.get_mut("vision_config") {
            value = vision.take();
        }
        let config: Self = from_value(value, source)?;
        config.validate(source)?;
        Ok(config)
    }

    /// The configs of the CLIP towers LLaVA-JP names in `mm_vision_tower`, so that a LLaVA-JP
    /// checkpoint whose config only names its tower can still be built.
    pub fn known(name: &str) -> Option<Self> {
        let base = |hidden, inter, layers, heads, image, patch| Self {
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_channels: 3,
            image_size: image,
            patch_size: patch,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            attention_dropout: 0.0,
        };
        let name = name.trim_end_matches('/').rsplit('/').next().unwrap_or(name);
        Some(match name {
            "clip-vit-large-patch14-336" => base(1024, 4096, 24, 16, 336, 14),
            "clip-vit-large-patch14" => base(1024, 4096, 24, 16, 224, 14),
            "clip-vit-base-patch16" => base(768, 3072, 12, 12, 224, 16),
            "clip-vit-base-patch32" => base(768, 3072, 12, 12, 224, 32),
            _ => return None,
        })
    }

    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    fn validate(&self, source: &str) -> Result<(), ConfigError> {
        let invalid = |key, value: usize, expected: &str| ConfigError::Invalid {
            path: source.into(),
            key,
            value: value.to_string(),
            expected: expected.into(),
        };
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(invalid("num_attention_heads", self.num_attention_heads, "must divide hidden_size"));
        }
        if self.patch_size == 0 || self.image_size % self.patch_size != 0 {
            return Err(invalid("patch_size", self.patch_size, "must divide image_size"));
        }
        crate::model::nn::Activation::parse(&self.hidden_act).map_err(|expected| ConfigError::Invalid {
            path: source.into(),
            key: "hidden_act",
            value: self.hidden_act.clone(),
            expected,
        })?;
        Ok(())
    }
}

/// transformers' `GPT2Config` (the fields that change the computation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    #[serde(default = "d::gpt2_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d::gpt2_positions")]
    pub n_positions: usize,
    #[serde(default = "d::clip_hidden")]
    pub n_embd: usize,
    #[serde(default = "d::twelve")]
    pub n_layer: usize,
    #[serde(default = "d::twelve")]
    pub n_head: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "d::gelu_new")]
    pub activation_function: String,
    #[serde(default = "d::dropout")]
    pub resid_pdrop: f64,
    #[serde(default = "d::dropout")]
    pub embd_pdrop: f64,
    #[serde(default = "d::dropout")]
    pub attn_pdrop: f64,
    #[serde(default = "d::eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "d::yes")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default = "d::yes")]
    pub tie_word_embeddings: bool,
    #[serde(default = "d::gpt2_special")]
    pub bos_token_id: i64,
    #[serde(default = "d::gpt2_special")]
    pub eos_token_id: i64,
}

impl Gpt2Config {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let source = path.display().to_string();
        let config: Self = from_value(read_json(path)?, &source)?;
        config.validate(&source)?;
        Ok(config)
    }

    pub fn inner_size(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    pub fn validate(&self, source: &str) -> Result<(), ConfigError> {
        if self.n_head == 0 || self.n_embd % self.n_head != 0 {
            return Err(ConfigError::Invalid {
                path: source.into(),
                key: "n_head",
                value: self.n_head.to_string(),
                expected: format!("must divide n_embd ({})", self.n_embd),
            });
        }
        crate::model::nn::Activation::parse(&self.activation_function).map_err(|expected| {
            ConfigError::Invalid {
                path: source.into(),
                key: "activation_function",
                value: self.activation_function.clone(),
                expected,
            }
        })?;
        Ok(())
    }
}

/// Which hidden-state tokens of the tower feed the projector (`mm_vision_select_feature`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectFeature {
    /// Drop the CLS token.
    Patch,
    /// Keep CLS and patches.
    ClsPatch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaddingSide {
    Right,
    Left,
}

/// A LLaVA-JP `config.json`: the language model's GPT-2 fields and the `mm_*` fields, plus
/// (in our own files) the tower's `vision_config`, which a reference config only names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlavaConfig {
    #[serde(flatten)]
    pub text: Gpt2Config,
    #[serde(default = "d::tower")]
    pub mm_vision_tower: String,
    #[serde(default)]
    pub mm_hidden_size: Option<usize>,
    #[serde(default = "d::linear")]
    pub mm_projector_type: String,
    #[serde(default = "d::select_layer")]
    pub mm_vision_select_layer: i64,
    #[serde(default = "d::patch")]
    pub mm_vision_select_feature: SelectFeature,
    #[serde(default = "d::square")]
    pub image_aspect_ratio: String,
    #[serde(default)]
    pub tokenizer_model_max_length: Option<usize>,
    #[serde(default = "d::right")]
    pub tokenizer_padding_side: PaddingSide,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision_config: Option<ClipVisionConfig>,
}

impl LlavaConfig {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let source = path.display().to_string();
        let mut config: Self = from_value(read_json(path)?, &source)?;
        config.resolve(&source)?;
        Ok(config)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("config serialises")
    }

    /// Fills the tower config from the known towers when the file only names it, and checks
    /// that the parts fit together.
    pub fn resolve(&mut self, source: &str) -> Result<(), ConfigError> {
        self.text.validate(source)?;
        if self.vision_config.is_none() {
            self.vision_config = ClipVisionConfig::known(&self.mm_vision_tower);
        }
        let Some(vision) = &self.vision_config else {
            return Err(ConfigError::Invalid {
                path: source.into(),
                key: "mm_vision_tower",
                value: self.mm_vision_tower.clone(),
                expected: "a known CLIP tower (openai/clip-vit-large-patch14-336, \
                           clip-vit-large-patch14, clip-vit-base-patch16/32) or a `vision_config` object"
                    .into(),
            });
        };
        vision.validate(source)?;
        let hidden = *self.mm_hidden_size.get_or_insert(vision.hidden_size);
        if hidden != vision.hidden_size {
            return Err(ConfigError::Invalid {
                path: source.into(),
                key: "mm_hidden_size",
                value: hidden.to_string(),
                expected: format!("the tower's hidden_size ({})", vision.hidden_size),
            });
        }
        let layers = vision.num_hidden_layers as i64;
        if !(-(layers + 1)..=layers).contains(&self.mm_vision_select_layer) {
            return Err(ConfigError::Invalid {
                path: source.into(),
                key: "mm_vision_select_layer",
                value: self.mm_vision_select_layer.to_string(),
                expected: format!("an index into {} hidden states", layers + 1),
            });
        }
        crate::model::projector::ProjectorKind::parse(&self.mm_projector_type).map_err(|expected| {
            ConfigError::Invalid {
                path: source.into(),
                key: "mm_projector_type",
                value: self.mm_projector_type.clone(),
                expected,
            }
        })?;
        if !matches!(self.image_aspect_ratio.as_str(), "square" | "pad") {
            return Err(ConfigError::Invalid {
                path: source.into(),
                key: "image_aspect_ratio",
                value: self.image_aspect_ratio.clone(),
                expected: "`square` or `pad`".into(),
            });
        }
        Ok(())
    }

    pub fn vision(&self) -> &ClipVisionConfig {
        self.vision_config.as_ref().expect("LlavaConfig::resolve fills vision_config")
    }

    /// Number of hidden states the tower exposes: the embeddings plus one per layer.
    pub fn select_layer_index(&self) -> usize {
        let states = self.vision().num_hidden_layers as i64 + 1;
        let i = self.mm_vision_select_layer;
        (if i < 0 { states + i } else { i }) as usize
    }

    /// Image tokens one image becomes in the language model's sequence.
    pub fn image_tokens(&self) -> usize {
        self.vision().num_patches()
            + match self.mm_vision_select_feature {
                SelectFeature::Patch => 0,
                SelectFeature::ClsPatch => 1,
            }
    }

    pub fn max_length(&self) -> usize {
        self.tokenizer_model_max_length.unwrap_or(self.text.n_positions)
    }
}

/// serde defaults, named after transformers' own.
mod d {
    pub fn clip_hidden() -> usize { 768 }
    pub fn clip_intermediate() -> usize { 3072 }
    pub fn twelve() -> usize { 12 }
    pub fn three() -> usize { 3 }
    pub fn clip_image() -> usize { 224 }
    pub fn clip_patch() -> usize { 32 }
    pub fn quick_gelu() -> String { "quick_gelu".into() }
    pub fn gelu_new() -> String { "gelu_new".into() }
    pub fn eps() -> f64 { 1e-5 }
    pub fn gpt2_vocab() -> usize { 50257 }
    pub fn gpt2_positions() -> usize { 1024 }
    pub fn gpt2_special() -> i64 { 50256 }
    pub fn dropout() -> f64 { 0.1 }
    pub fn yes() -> bool { true }
    pub fn tower() -> String { "openai/clip-vit-large-patch14-336".into() }
    pub fn linear() -> String { "linear".into() }
    pub fn select_layer() -> i64 { -2 }
    pub fn patch() -> super::SelectFeature { super::SelectFeature::Patch }
    pub fn square() -> String { "square".into() }
    pub fn right() -> super::PaddingSide { super::PaddingSide::Right }
}

//! A model directory made ready to answer: the LLaVA model, its tokenizer, its image processor
//! and its conversation template, loaded from any directory a user has (a reference LLaVA-JP
//! checkpoint, one of our checkpoints or run directories, a LoRA checkpoint, an export), and
//! [`export`] that writes the self-contained directory every backend loads.

use std::path::{Path, PathBuf};

use anyhow::Context;
use burn_store::ModuleSnapshot;
use burn::prelude::*;
use burn::tensor::DType;
use llava_jp_import::{load_module, Checkpoint, Layout};

use super::generate::{answer_text, generate, GenerateError, Generated, GenerationConfig, GenerationStats, Prompt};
use crate::config::LlavaConfig;
use crate::data::conversation::{SeparatorStyle, Template};
use crate::data::image::{AspectMode, ImageProcessor};
use crate::data::preprocess::generation_prompt;
use crate::data::tokenizer::TextTokenizer;
use crate::model::{LlavaModel, ProjectorKind};
use crate::train::trainer::our_model_file;

/// Tokenizer files copied along with an export (those present).
const TOKENIZER_FILES: [&str; 3] = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"];

pub struct Assistant<B: Backend> {
    pub model: LlavaModel<B>,
    pub config: LlavaConfig,
    pub tokenizer: TextTokenizer,
    /// Where the tokenizer was found (exports copy its files).
    pub tokenizer_path: PathBuf,
    pub image_processor: ImageProcessor,
    pub template: Template,
}

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// A `tokenizer.json` (or its directory) when the model directory has none.
    pub tokenizer: Option<PathBuf>,
    /// Conversation template; `v1` (LLaVA-JP's stage-2 chat) when absent.
    pub template: Option<String>,
}

/// One turn of a conversation about (at most) one image.
#[derive(Debug, Clone, Default)]
pub struct Conversation {
    /// Earlier (question, answer) pairs.
    pub history: Vec<(String, String)>,
    /// Preprocessed `[3, S, S]` pixels of the image talked about.
    pub image: Option<Vec<f32>>,
}

impl<B: Backend> Assistant<B> {
    /// Loads `dir`: our checkpoint, export or run directory (its latest checkpoint), or a
    /// reference LLaVA-JP directory (`config.json` + `pytorch_model.bin` / `model.safetensors`).
    /// Weights are cast to the backend's float type whatever dtype they were stored in.
    pub fn load(dir: &Path, options: &LoadOptions, device: &B::Device) -> anyhow::Result<Self> {
        anyhow::ensure!(dir.exists(), "{}: no such model directory", dir.display());
        let (model, config, model_dir) = match our_model_file(dir) {
            Some(file) => {
                let model_dir = file.parent().expect("a file in a directory").to_path_buf();
                let (model, config) = load_native::<B>(&model_dir, &file, device)?;
                (model, config, model_dir)
            }
            None => {
                let (model, config, _) = crate::weights::load_llava::<B>(dir, device)
                    .with_context(|| format!("{}: not a LLaVA-JP model directory", dir.display()))?;
                (model, config, dir.to_path_buf())
            }
        };
        let tokenizer_path = find_tokenizer(&model_dir, options.tokenizer.as_deref())?;
        let tokenizer = TextTokenizer::from_file(&tokenizer_path)?;
        anyhow::ensure!(
            tokenizer.vocab_size() <= config.text.vocab_size,
            "{}: the tokenizer has {} tokens but the model's vocabulary is {}: they do not belong together",
            tokenizer_path.display(),
            tokenizer.vocab_size(),
            config.text.vocab_size
        );
        let mode = AspectMode::parse(&config.image_aspect_ratio).map_err(anyhow::Error::msg)?;
        let preprocessor = model_dir.join("preprocessor_config.json");
        let image_processor = if preprocessor.is_file() {
            ImageProcessor::from_file(&preprocessor, mode)?
        } else {
            ImageProcessor::clip(config.vision().image_size, mode)
        };
        anyhow::ensure!(
            image_processor.size == model.vision_tower.image_size(),
            "{}: images of {} pixels, but the vision tower takes {}",
            preprocessor.display(),
            image_processor.size,
            model.vision_tower.image_size()
        );
        let template = Template::by_name(options.template.as_deref().unwrap_or("v1")).map_err(anyhow::Error::msg)?;
        Ok(Self { model, config, tokenizer, tokenizer_path, image_processor, template })
    }

    /// Reads and preprocesses an image file for the tower.
    pub fn load_image(&self, path: &Path) -> anyhow::Result<Vec<f32>> {
        let img = ImageProcessor::open(path)?;
        Ok(self.image_processor.preprocess(&img))
    }

    /// The generation prompt for `question` after `conversation`'s history, in the template.
    pub fn prompt(&self, conversation: &Conversation, question: &str) -> anyhow::Result<Prompt> {
        let input_ids = generation_prompt(&self.tokenizer, &self.template, &conversation.history, question, conversation.image.is_some())?;
        Ok(Prompt { input_ids, images: conversation.image.iter().cloned().collect(), seed: None })
    }

    /// Answers a batch of prompts: the generations and their answer texts.
    pub fn answer(
        &self,
        prompts: &[Prompt],
        config: &GenerationConfig,
        on_token: &mut dyn FnMut(usize, i64),
    ) -> Result<(Vec<(Generated, String)>, GenerationStats), GenerateError> {
        let (generated, stats) = generate(&self.model, prompts, config, Some(&self.tokenizer), on_token)?;
        let marker = self.answer_marker();
        let answers = prompts
            .iter()
            .zip(generated)
            .map(|(p, g)| {
                let text = answer_text(&self.tokenizer, &p.input_ids, &g, marker.as_deref())?;
                Ok((g, text))
            })
            .collect::<Result<Vec<_>, GenerateError>>()?;
        Ok((answers, stats))
    }

    /// What precedes the answer in the decoded text (`システム: ` for `v1`).
    pub fn answer_marker(&self) -> Option<String> {
        (self.template.style == SeparatorStyle::Two).then(|| format!("{}: ", self.template.roles[1]))
    }
}

/// Our own model file (module paths as names) with the `config.json` beside it; a LoRA
/// checkpoint's adapters are folded into the LLM on the way.
fn load_native<B: Backend>(dir: &Path, file: &Path, device: &B::Device) -> anyhow::Result<(LlavaModel<B>, LlavaConfig)> {
    let config = LlavaConfig::from_file(dir.join("config.json")).with_context(|| format!("{}: the model's config", dir.display()))?;
    let checkpoint = Checkpoint::open(file)?;
    let mut model = LlavaModel::<B>::new(&config, device);
    let lora = checkpoint.keys().any(crate::train::lora::is_lora);
    if lora {
        let train = dir.join("train_config.toml");
        let lora_config = crate::train::TrainConfig::from_file(&train, &[])
            .with_context(|| format!("{}: LoRA adapters need the run's train_config.toml for r and alpha", file.display()))?
            .lora()
            .with_context(|| format!("{}: adapters stored but lora_enable = false", train.display()))?;
        model.transformer = crate::train::lora::add_lora(model.transformer, &lora_config, device).map_err(anyhow::Error::msg)?;
    }
    let has_head = model.lm_head.is_some();
    let (mut model, _) = load_module(model, &checkpoint, Layout::Native, has_head)?;
    if lora {
        model.transformer = crate::train::lora::merge_lora(model.transformer);
    }
    Ok((model, config))
}

/// The tokenizer: the one asked for, else `tokenizer.json` in the model directory, else the
/// one a training run named in the checkpoint's `train_config.toml`.
fn find_tokenizer(model_dir: &Path, asked: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = asked {
        let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
        anyhow::ensure!(file.is_file(), "--tokenizer {}: no tokenizer.json there", path.display());
        return Ok(file);
    }
    let here = model_dir.join("tokenizer.json");
    if here.is_file() {
        return Ok(here);
    }
    if let Ok(train) = crate::train::TrainConfig::from_file(&model_dir.join("train_config.toml"), &[]) {
        let named = if train.tokenizer.is_dir() { train.tokenizer.join("tokenizer.json") } else { train.tokenizer.clone() };
        if named.is_file() {
            return Ok(named);
        }
    }
    anyhow::bail!(
        "{}: the model directory has no tokenizer.json (and no training run names one that exists): pass --tokenizer PATH",
        model_dir.display()
    )
}

/// Writes a self-contained model directory: `model.safetensors` under LLaVA-JP's own checkpoint
/// names (so the reference code can read it too) in `dtype`, `config.json`, the tokenizer files
/// and `preprocessor_config.json`. Written into a temporary directory and renamed into place.
pub fn export<B: Backend>(assistant: &Assistant<B>, out: &Path, dtype: DType) -> anyhow::Result<()> {
    anyhow::ensure!(matches!(dtype, DType::F32 | DType::F16 | DType::BF16), "export dtype {dtype:?}: expected f32, f16 or bf16");
    anyhow::ensure!(!out.exists() || out.read_dir()?.next().is_none(), "{}: exists and is not empty", out.display());
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| parent.display().to_string())?;
    let tmp = parent.join(format!(".{}.tmp", out.file_name().and_then(|n| n.to_str()).unwrap_or("export")));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| tmp.display().to_string())?;

    let kind = ProjectorKind::parse(&assistant.config.mm_projector_type).map_err(anyhow::Error::msg)?;
    let layout = Layout::LlavaJp(kind.layout());
    let mut tensors: Vec<(String, TensorData)> = Vec::new();
    for snapshot in assistant.model.collect(None, None, false) {
        let path = snapshot.full_path();
        let name = layout.candidates(&path).into_iter().next().expect("every path has a stored name");
        let data = snapshot.to_data().map_err(|e| anyhow::anyhow!("{path}: {e:?}"))?.convert_dtype(dtype);
        tensors.push((name, data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, data)| {
            let st_dtype = match dtype {
                DType::F16 => safetensors::Dtype::F16,
                DType::BF16 => safetensors::Dtype::BF16,
                _ => safetensors::Dtype::F32,
            };
            let view = safetensors::tensor::TensorView::new(st_dtype, data.shape.to_vec(), data.as_bytes())
                .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            Ok((name.clone(), view))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(views, Some(metadata), &tmp.join("model.safetensors"))?;

    // Our config plus the fields transformers and the reference code look for.
    let mut config: serde_json::Value = serde_json::from_str(&assistant.config.to_json())?;
    let torch_dtype = match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    };
    config["architectures"] = serde_json::json!(["LlavaGpt2ForCausalLM"]);
    config["model_type"] = serde_json::json!("llava");
    config["torch_dtype"] = serde_json::json!(torch_dtype);
    std::fs::write(tmp.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    let tokenizer_dir = assistant.tokenizer_path.parent().unwrap_or(Path::new("."));
    std::fs::copy(&assistant.tokenizer_path, tmp.join("tokenizer.json"))
        .with_context(|| assistant.tokenizer_path.display().to_string())?;
    for name in &TOKENIZER_FILES[1..] {
        let from = tokenizer_dir.join(name);
        if from.is_file() {
            std::fs::copy(&from, tmp.join(name)).with_context(|| from.display().to_string())?;
        }
    }
    let p = &assistant.image_processor;
    let preprocessor = serde_json::json!({
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": true, "size": {"shortest_edge": p.size},
        "do_center_crop": true, "crop_size": {"height": p.size, "width": p.size},
        "do_rescale": true, "rescale_factor": 1.0 / 255.0,
        "do_normalize": true, "image_mean": p.mean, "image_std": p.std,
        "do_convert_rgb": true, "resample": 3,
    });
    std::fs::write(tmp.join("preprocessor_config.json"), serde_json::to_string_pretty(&preprocessor)?)?;
    if out.exists() {
        std::fs::remove_dir(out)?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    Ok(())
}

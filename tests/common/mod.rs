//! Test bodies generic over the backend; each test binary (`parity_flex`, `parity_wgpu`)
//! instantiates them for one backend, since device settings are global per process.
#![allow(dead_code)]

pub mod http;

use std::path::{Path, PathBuf};

use burn::prelude::*;
use llava_jp::import::{load_module, Checkpoint, Layout};
use llava_jp::model::Gpt2LmHeadModel;
use llava_jp::parity::{check_clip, check_gpt2, check_llava, Comparison};

/// The bar: at most 1e-4 absolute difference to transformers in f32.
pub const F32_TOLERANCE: f32 = 1e-4;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn assert_close(results: &[Comparison], expected_count: usize, tolerance: f32) {
    for r in results {
        println!("{r}");
    }
    assert_eq!(results.len(), expected_count, "number of comparisons");
    for r in results {
        assert!(r.elements > 0, "{}: nothing was compared", r.name);
        assert!(r.max_abs <= tolerance, "{}: max abs difference {:.3e} > {tolerance:.1e}", r.name, r.max_abs);
    }
}

pub fn clip_matches_transformers<B: Backend>(device: &B::Device) {
    // 2 weight formats x (4 hidden states + pooled output)
    assert_close(&check_clip::<B>(&fixture("clip"), device).unwrap(), 2 * 5, F32_TOLERANCE);
}

pub fn gpt2_matches_transformers<B: Backend>(device: &B::Device) {
    // 2 formats x 2 padding sides x (full forward + cached decode)
    assert_close(&check_gpt2::<B>(&fixture("gpt2"), device).unwrap(), 8, F32_TOLERANCE);
}

pub fn gpt2_untied_gelu_new_matches_transformers<B: Backend>(device: &B::Device) {
    assert_close(&check_gpt2::<B>(&fixture("gpt2-untied"), device).unwrap(), 8, F32_TOLERANCE);
}

pub fn llava_matches_transformers<B: Backend>(device: &B::Device) {
    // 3 sources (safetensors, bin, parts) x (batch a right + left, batch b) x (logits + loss)
    assert_close(&check_llava::<B>(&fixture("llava"), device).unwrap(), 3 * 3 * 2, F32_TOLERANCE);
}

/// The importer's errors name the key, the file and both shapes.
pub fn import_errors_name_key_file_and_shapes<B: Backend>(device: &B::Device) {
    let dir = fixture("gpt2");
    let ckpt = Checkpoint::open(dir.join("model.safetensors")).unwrap();

    // Shape mismatch: a config with a wider MLP than the checkpoint.
    let mut config = llava_jp::config::Gpt2Config::from_file(dir.join("config.json")).unwrap();
    config.n_inner = Some(48);
    let err = load_module(Gpt2LmHeadModel::<B>::new(&config, device), &ckpt, Layout::Gpt2, false).unwrap_err().to_string();
    assert!(err.contains("`transformer.h.0.mlp.c_fc.weight`"), "{err}");
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(err.contains("[32, 128]") && err.contains("[32, 48]"), "{err}");

    // Missing: a deeper model than the checkpoint.
    let mut config = llava_jp::config::Gpt2Config::from_file(dir.join("config.json")).unwrap();
    config.n_layer = 4;
    let err = load_module(Gpt2LmHeadModel::<B>::new(&config, device), &ckpt, Layout::Gpt2, false).unwrap_err().to_string();
    assert!(err.contains("missing") && err.contains("transformer.h.3.attn.c_attn.weight"), "{err}");

    // Unexpected: a shallower model than the checkpoint.
    let mut config = llava_jp::config::Gpt2Config::from_file(dir.join("config.json")).unwrap();
    config.n_layer = 2;
    let err = load_module(Gpt2LmHeadModel::<B>::new(&config, device), &ckpt, Layout::Gpt2, false).unwrap_err().to_string();
    assert!(err.contains("unexpected") && err.contains("transformer.h.2.ln_1.weight"), "{err}");

    // A CLIP checkpoint read as GPT-2 is refused, not half-loaded.
    let clip = Checkpoint::open(fixture("clip")).unwrap();
    let config = llava_jp::config::Gpt2Config::from_file(dir.join("config.json")).unwrap();
    assert!(load_module(Gpt2LmHeadModel::<B>::new(&config, device), &clip, Layout::Gpt2, false).is_err());
}

/// A checkpoint stored in bf16 or f16 loads into an f32 model as exactly the rounded weights.
pub fn half_precision_checkpoints_load_into_f32<B: Backend>(device: &B::Device) {
    use burn::tensor::DType;
    use burn_store::ModuleSnapshot;
    use llava_jp::weights::load_gpt2;

    let source = fixture("gpt2");
    let ckpt = Checkpoint::open(source.join("model.safetensors")).unwrap();
    let (full, _, _) = load_gpt2::<B>(&source, device).unwrap();
    let full_params: Vec<(String, Vec<f32>)> = full
        .collect(None, None, false)
        .iter()
        .map(|s| (s.full_path(), s.to_data().unwrap().convert_dtype(DType::F32).into_vec::<f32>().unwrap()))
        .collect();
    for (dtype, st_dtype, round) in [
        (DType::BF16, safetensors::Dtype::BF16, (|x: f32| half::bf16::from_f32(x).to_f32()) as fn(f32) -> f32),
        (DType::F16, safetensors::Dtype::F16, |x: f32| half::f16::from_f32(x).to_f32()),
    ] {
        let dir = std::env::temp_dir().join(format!("llava-jp-{dtype:?}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(source.join("config.json"), dir.join("config.json")).unwrap();
        let datas: Vec<(String, burn::tensor::TensorData)> =
            ckpt.tensors.iter().map(|(k, t)| (k.clone(), t.read().unwrap().convert_dtype(dtype))).collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = datas
            .iter()
            .map(|(k, d)| (k.clone(), safetensors::tensor::TensorView::new(st_dtype, d.shape.to_vec(), d.as_bytes()).unwrap()))
            .collect();
        safetensors::tensor::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();

        let (half_model, _, report) = load_gpt2::<B>(&dir, device).unwrap();
        assert_eq!(report.stored_dtypes, vec![format!("{dtype:?}")]);
        let half_params = half_model.collect(None, None, false);
        assert_eq!(half_params.len(), full_params.len());
        for (snapshot, (path, values)) in half_params.iter().zip(&full_params) {
            assert_eq!(&snapshot.full_path(), path);
            let data = snapshot.to_data().unwrap();
            assert_eq!(data.dtype, DType::F32, "{path} keeps the model's float type");
            let loaded = data.into_vec::<f32>().unwrap();
            let rounded: Vec<f32> = values.iter().map(|&x| round(x)).collect();
            assert_eq!(loaded, rounded, "{path} loaded from {dtype:?}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// Writes `tensors` of `source` into `dir` as two safetensors shards and an HF index.
fn write_shards(source: &Checkpoint, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let all: Vec<(String, burn::tensor::TensorData)> =
        source.tensors.iter().map(|(k, t)| (k.clone(), t.read().unwrap())).collect();
    let half = all.len() / 2;
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in [&all[..half], &all[half..]].iter().enumerate() {
        let name = format!("model-0000{}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = chunk
            .iter()
            .map(|(k, d)| {
                assert_eq!(d.dtype, burn::tensor::DType::F32);
                (k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, d.shape.to_vec(), d.as_bytes()).unwrap())
            })
            .collect();
        safetensors::tensor::serialize_to_file(views, None, &dir.join(&name)).unwrap();
        for (k, _) in chunk.iter() {
            weight_map.insert(k.clone(), name.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

/// A sharded checkpoint (`model.safetensors.index.json`) gives the same model as one file; a
/// missing shard is an error that names it.
pub fn sharded_checkpoints_load<B: Backend>(device: &B::Device) {
    let source = fixture("llava");
    let dir = std::env::temp_dir().join(format!("llava-jp-shards-{}", std::process::id()));
    write_shards(&Checkpoint::open(source.join("model.safetensors")).unwrap(), &dir);
    std::fs::copy(source.join("config.json"), dir.join("config.json")).unwrap();
    for f in ["inputs.safetensors", "expected.safetensors", "fixture.json"] {
        std::fs::copy(source.join(f), dir.join(f)).unwrap();
    }
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert_eq!(ckpt.files.len(), 2, "both shards opened");
    // 1 source x 3 batches x (logits + loss)
    assert_close(&check_llava::<B>(&dir, device).unwrap(), 3 * 2, F32_TOLERANCE);

    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = Checkpoint::open(&dir).err().expect("a missing shard fails").to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The real llm-jp v2.1 tokenizer of `../shared` (or `LLAVA_JP_TOKENIZER`).
pub fn tokenizer_path() -> PathBuf {
    std::env::var_os("LLAVA_JP_TOKENIZER").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/reference/llm-jp-tokenizer-v2.1/tokenizer.json")
    })
}

/// A model directory of ours as training leaves it (random tiny model whose vocabulary fits
/// llm-jp's tokenizer, `model.safetensors` under module paths, `config.json`), with the
/// tokenizer copied in when `with_tokenizer`. Built on the CPU backend with a fixed seed.
pub fn tiny_model_dir(name: &str, with_tokenizer: bool) -> PathBuf {
    use burn::backend::flex::FlexDevice;
    let dir = std::env::temp_dir().join(format!("llava-jp-model-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = serde_json::json!({
        "model_type": "llava", "vocab_size": 50570, "n_positions": 128, "n_embd": 32, "n_layer": 2, "n_head": 4,
        "activation_function": "gelu", "tie_word_embeddings": true, "bos_token_id": 7, "eos_token_id": 7,
        "mm_vision_tower": "tiny-clip", "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "tokenizer_model_max_length": 96,
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "image_size": 28, "patch_size": 7, "hidden_act": "quick_gelu"}
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let config = llava_jp::config::LlavaConfig::from_file(dir.join("config.json")).unwrap();
    <burn::backend::Flex as Backend>::seed(&FlexDevice, 17);
    let model = llava_jp::model::LlavaModel::<burn::backend::Flex>::new(&config, &FlexDevice);
    llava_jp::train::checkpoint::save_model(&model, &dir.join("model.safetensors")).unwrap();
    if with_tokenizer {
        std::fs::copy(tokenizer_path(), dir.join("tokenizer.json")).unwrap();
    }
    dir
}

/// Greedy answer tokens of the model in `dir` on backend `B` for one question about the
/// fixture horse, and the answer text.
pub fn greedy_answer<B: Backend>(dir: &Path, device: &B::Device) -> (Vec<i64>, String) {
    use llava_jp::infer::{Assistant, Conversation, GenerationConfig, LoadOptions};
    let assistant = Assistant::<B>::load(dir, &LoadOptions::default(), device).unwrap();
    let image = assistant.load_image(&fixture("images/horse.png")).unwrap();
    let conversation = Conversation { history: vec![], image: Some(image) };
    let prompt = assistant.prompt(&conversation, "この画像について説明してください。").unwrap();
    let config = GenerationConfig { max_new_tokens: 8, eos_token_id: None, ..GenerationConfig::default() };
    let (mut answers, _) = assistant.answer(&[prompt], &config, &mut |_, _| {}).unwrap();
    let (generated, text) = answers.pop().unwrap();
    (generated.tokens, text)
}

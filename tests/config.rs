//! Configs: HF `config.json` files read as they are, our own files, and clear errors.
use std::path::Path;

use llava_jp::config::{ClipVisionConfig, Gpt2Config, LlavaConfig, SelectFeature};
use llava_jp::model::ProjectorKind;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn known_model_config_is_llm_jp_and_clip_l_336() {
    let c = LlavaConfig::from_file(root().join("configs/llava-jp-1.3b-v1.0.json")).unwrap();
    assert_eq!((c.text.n_embd, c.text.n_layer, c.text.n_head, c.text.inner_size()), (2048, 24, 16, 8192));
    assert_eq!(c.text.vocab_size, 50688);
    assert_eq!(c.vision().image_size, 336);
    assert_eq!(c.select_layer_index(), 23, "layer -2 of 25 hidden states");
    assert_eq!(c.image_tokens(), 576);
    assert_eq!(c.max_length(), 1024);
    assert_eq!(ClipVisionConfig::known("openai/clip-vit-large-patch14-336").as_ref(), Some(c.vision()));
}

#[test]
fn reference_config_without_vision_config_uses_the_named_tower() {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("configs/llava-jp-1.3b-v1.0.json")).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("vision_config");
    let dir = std::env::temp_dir().join(format!("llava-jp-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    let c = LlavaConfig::from_file(dir.join("config.json")).unwrap();
    assert_eq!(c.vision().num_hidden_layers, 24);
    assert_eq!(c.mm_vision_select_feature, SelectFeature::Patch);

    json["mm_vision_tower"] = "someone/unknown-tower".into();
    std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
    let err = LlavaConfig::from_file(dir.join("config.json")).unwrap_err().to_string();
    assert!(err.contains("mm_vision_tower") && err.contains("someone/unknown-tower"), "{err}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn hf_fixture_configs_parse_with_transformers_defaults() {
    let clip = ClipVisionConfig::from_file(root().join("tests/fixtures/clip/config.json")).unwrap();
    assert_eq!((clip.hidden_size, clip.num_hidden_layers, clip.patch_size), (32, 3, 7));
    let gpt2 = Gpt2Config::from_file(root().join("tests/fixtures/gpt2/config.json")).unwrap();
    assert_eq!(gpt2.inner_size(), 128, "n_inner null means 4 * n_embd");
    assert_eq!(gpt2.activation_function, "gelu");
    let untied = Gpt2Config::from_file(root().join("tests/fixtures/gpt2-untied/config.json")).unwrap();
    assert!(!untied.tie_word_embeddings && untied.scale_attn_by_inverse_layer_idx);
    let tiny = LlavaConfig::from_file(root().join("configs/tiny.json")).unwrap();
    let fixture = LlavaConfig::from_file(root().join("tests/fixtures/llava/config.json")).unwrap();
    assert_eq!(tiny.vision(), fixture.vision());
    assert_eq!(tiny.text.n_embd, fixture.text.n_embd);
    assert_eq!(tiny.image_tokens(), 16);
}

#[test]
fn bad_values_name_the_key() {
    let dir = std::env::temp_dir().join(format!("llava-jp-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("configs/tiny.json")).unwrap()).unwrap();
    for (key, value, needle) in [
        ("mm_vision_select_layer", serde_json::json!(-9), "mm_vision_select_layer"),
        ("mm_projector_type", serde_json::json!("mlp2x_relu"), "mm_projector_type"),
        ("n_head", serde_json::json!(5), "n_head"),
        ("activation_function", serde_json::json!("swiglu"), "activation_function"),
        ("image_aspect_ratio", serde_json::json!("anyres"), "image_aspect_ratio"),
        ("mm_hidden_size", serde_json::json!(64), "mm_hidden_size"),
    ] {
        let mut json = base.clone();
        json[key] = value;
        std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
        let err = LlavaConfig::from_file(dir.join("config.json")).unwrap_err().to_string();
        assert!(err.contains(needle) && err.contains("config.json"), "{key}: {err}");
    }
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn projector_kinds() {
    assert_eq!(ProjectorKind::parse("mlp2x_gelu"), Ok(ProjectorKind::Mlp(2)));
    assert_eq!(ProjectorKind::parse("mlp5x_gelu"), Ok(ProjectorKind::Mlp(5)));
    assert_eq!(ProjectorKind::parse("linear"), Ok(ProjectorKind::Linear));
    assert_eq!(ProjectorKind::parse("identity"), Ok(ProjectorKind::Identity));
    assert!(ProjectorKind::parse("mlp0x_gelu").is_err());
    assert!(ProjectorKind::parse("mlpx_gelu").is_err());
}

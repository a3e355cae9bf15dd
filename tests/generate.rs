//! Generation on the CPU backend: transformers' greedy `generate` reproduced token for token
//! (fixture `tests/fixtures/llava/generation.*`, made by
//! `model-import/scripts/make_generation_fixture.py`), the KV cache against recomputation,
//! batched against one-by-one, stopping, the errors a user meets, and model directories
//! (ours, LoRA-free and exported) loading with their tokenizer.
mod common;

use std::path::Path;

use burn::backend::flex::FlexDevice;
use llava_jp::infer::generate::GenerateError;
use llava_jp::infer::{export, generate, Assistant, FinishReason, GenerationConfig, LoadOptions, Prompt, SamplingConfig, TextStream};
use llava_jp::model::LlavaModel;
use llava_jp::parity::Tensors;

type B = burn::backend::Flex;

fn fixture_model() -> LlavaModel<B> {
    llava_jp::weights::load_llava::<B>(&common::fixture("llava"), &FlexDevice).unwrap().0
}

struct Case {
    name: String,
    prompts: Vec<Prompt>,
    penalty: f64,
    max_new_tokens: usize,
    tokens: Vec<Vec<i64>>,
    logits: Vec<Vec<f32>>,
}

fn cases() -> Vec<Case> {
    let dir = common::fixture("llava");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("generation.json")).unwrap()).unwrap();
    let tensors = Tensors::open(&dir.join("generation.safetensors")).unwrap();
    let pixels = tensors.f32("pixel_values").unwrap();
    let per_image = pixels.len() / tensors.shape("pixel_values").unwrap()[0];
    json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let name = c["name"].as_str().unwrap().to_string();
            let ids: Vec<Vec<i64>> = serde_json::from_value(c["prompts"].clone()).unwrap();
            let images: Vec<Option<usize>> = serde_json::from_value(c["images"].clone()).unwrap();
            let prompts = ids
                .into_iter()
                .zip(images)
                .map(|(input_ids, image)| Prompt {
                    input_ids,
                    images: image.map(|i| pixels[i * per_image..(i + 1) * per_image].to_vec()).into_iter().collect(),
                    seed: None,
                })
                .collect::<Vec<_>>();
            let logits = (0..prompts.len()).map(|j| tensors.f32(&format!("logits_{name}_{j}")).unwrap()).collect();
            Case {
                name,
                prompts,
                penalty: c.get("repetition_penalty").and_then(|p| p.as_f64()).unwrap_or(1.0),
                max_new_tokens: c["max_new_tokens"].as_u64().unwrap() as usize,
                tokens: serde_json::from_value(c["tokens"].clone()).unwrap(),
                logits,
            }
        })
        .collect()
}

fn greedy(max_new_tokens: usize, penalty: f64) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens,
        sampling: SamplingConfig { repetition_penalty: penalty, ..SamplingConfig::default() },
        keep_logits: true,
        ..GenerationConfig::default()
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn greedy_generation_equals_transformers_generate() {
    let model = fixture_model();
    let cases = cases();
    assert_eq!(cases.len(), 3);
    for case in cases {
        // Every case runs as one left-padded batch here, whatever transformers did.
        let (out, stats) = generate(&model, &case.prompts, &greedy(case.max_new_tokens, case.penalty), None, &mut |_, _| {}).unwrap();
        for (j, g) in out.iter().enumerate() {
            assert_eq!(g.tokens, case.tokens[j], "{} prompt {j}: tokens", case.name);
            let ours: Vec<f32> = g.logits.iter().flatten().copied().collect();
            let diff = max_diff(&ours, &case.logits[j]);
            println!("{} prompt {j}: {} tokens, logits max diff {diff:.2e}", case.name, g.tokens.len());
            assert!(diff <= common::F32_TOLERANCE, "{} prompt {j}: logits differ by {diff}", case.name);
        }
        assert_eq!(stats.new_tokens, out.iter().map(|g| g.tokens.len()).sum::<usize>());
    }
}

#[test]
fn cached_decoding_equals_recomputing_the_whole_sequence() {
    let model = fixture_model();
    let case = cases().remove(0);
    for sampling in [SamplingConfig::default(), SamplingConfig { temperature: 0.9, top_k: 30, top_p: 0.95, repetition_penalty: 1.2 }] {
        let config = GenerationConfig { sampling, max_new_tokens: 10, eos_token_id: None, keep_logits: true, seed: 3, ..GenerationConfig::default() };
        let (cached, _) = generate(&model, &case.prompts, &config, None, &mut |_, _| {}).unwrap();
        let (full, _) = generate(&model, &case.prompts, &GenerationConfig { use_cache: false, ..config.clone() }, None, &mut |_, _| {}).unwrap();
        for (c, f) in cached.iter().zip(&full) {
            assert_eq!(c.tokens, f.tokens);
            assert_eq!(c.tokens.len(), 10);
            for (step, (lc, lf)) in c.logits.iter().zip(&f.logits).enumerate() {
                let diff = max_diff(lc, lf);
                assert!(diff <= 1e-5, "step {step}: cached logits differ from recomputed ones by {diff}");
            }
        }
    }
}

#[test]
fn batched_generation_equals_one_by_one() {
    let model = fixture_model();
    let case = cases().remove(0);
    let config = GenerationConfig {
        sampling: SamplingConfig { temperature: 0.8, top_k: 40, top_p: 0.9, repetition_penalty: 1.1 },
        max_new_tokens: 10,
        seed: 9,
        ..GenerationConfig::default()
    };
    let (batched, _) = generate(&model, &case.prompts, &config, None, &mut |_, _| {}).unwrap();
    for (i, prompt) in case.prompts.iter().enumerate() {
        // Prompt i of the batch draws from seed 9 + i: give the lone prompt that seed.
        let lone = Prompt { seed: Some(9 + i as u64), ..prompt.clone() };
        let (single, _) = generate(&model, &[lone], &config, None, &mut |_, _| {}).unwrap();
        assert_eq!(single[0].tokens, batched[i].tokens, "prompt {i}");
    }
    // A different seed draws differently (the draws are not constant).
    let (other, _) = generate(&model, &case.prompts, &GenerationConfig { seed: 1000, ..config.clone() }, None, &mut |_, _| {}).unwrap();
    assert_ne!(other.iter().map(|g| &g.tokens).collect::<Vec<_>>(), batched.iter().map(|g| &g.tokens).collect::<Vec<_>>());
}

#[test]
fn generation_stops_at_eos_length_and_context_and_streams_every_token() {
    let model = fixture_model();
    let case = cases().remove(0);
    // The first prompt's greedy answer repeats one token: make that token the eos.
    let eos = case.tokens[0][0];
    let config = GenerationConfig { eos_token_id: Some(eos), max_new_tokens: 5, ..GenerationConfig::default() };
    let mut streamed = vec![vec![]; case.prompts.len()];
    let (out, _) = generate(&model, &case.prompts, &config, None, &mut |i, t| streamed[i].push(t)).unwrap();
    assert_eq!(out[0].tokens, vec![eos]);
    assert_eq!(out[0].finish, FinishReason::Eos);
    assert_eq!(out[1].tokens.len(), 5);
    assert_eq!(out[1].finish, FinishReason::Length);
    for (s, g) in streamed.iter().zip(&out) {
        assert_eq!(s, &g.tokens);
    }
    // The tiny model has 64 positions: a long run ends when they are used up.
    let text_only = Prompt { input_ids: (8..44).collect(), images: vec![], seed: None };
    let long = GenerationConfig { max_new_tokens: 100, eos_token_id: None, ..GenerationConfig::default() };
    let (out, _) = generate(&model, &[text_only], &long, None, &mut |_, _| {}).unwrap();
    assert_eq!(out[0].finish, FinishReason::Context);
    assert_eq!(out[0].prompt_tokens + out[0].tokens.len(), 65, "the last token is generated at position 63");
}

#[test]
fn bad_prompts_are_refused_with_the_reason() {
    let model = fixture_model();
    let config = GenerationConfig::default();
    let image = vec![0.0f32; 3 * 28 * 28];
    let err = |prompts: Vec<Prompt>| generate(&model, &prompts, &config, None, &mut |_, _| {}).unwrap_err();
    // tokenizer_model_max_length is 40: 30 text tokens plus an image's 16 do not fit.
    let long = Prompt { input_ids: (8..38).chain([-200]).collect(), images: vec![image.clone()], seed: None };
    let e = err(vec![long]);
    assert!(matches!(e, GenerateError::TooLong { tokens: 46, limit: 40, .. }), "{e}");
    assert!(e.to_string().contains("46 tokens"), "{e}");
    let missing = Prompt { input_ids: vec![8, -200, 9], images: vec![], seed: None };
    assert!(matches!(err(vec![missing]), GenerateError::ImageCount { placeholders: 1, images: 0, .. }));
    let wrong_size = Prompt { input_ids: vec![8, -200, 9], images: vec![vec![0.0; 3 * 30 * 30]], seed: None };
    let e = err(vec![wrong_size]);
    assert!(e.to_string().contains("3x28x28"), "{e}");
    let stops = GenerationConfig { stop_strings: vec!["。".into()], ..GenerationConfig::default() };
    let e = generate(&model, &[Prompt { input_ids: vec![8], ..Default::default() }], &stops, None, &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, GenerateError::StopWithoutTokenizer));
    let bad = GenerationConfig { sampling: SamplingConfig { top_p: 0.0, ..Default::default() }, ..GenerationConfig::default() };
    let e = generate(&model, &[Prompt { input_ids: vec![8], ..Default::default() }], &bad, None, &mut |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("top_p"), "{e}");
}

#[test]
fn text_stream_releases_only_final_text_and_holds_back_stop_strings() {
    let tokenizer = llava_jp::data::tokenizer::TextTokenizer::from_file(common::tokenizer_path()).unwrap();
    let text = "赤い四角です。🐴が走っています。";
    let mut ids = tokenizer.encode(text).unwrap();
    ids.pop(); // the post-processor's EOD
    let mut stream = TextStream::new(&tokenizer, &[]);
    let mut out = String::new();
    for &id in &ids {
        let piece = stream.push(id).unwrap();
        assert!(!piece.contains('\u{FFFD}'), "half a character was released: {piece:?}");
        out.push_str(&piece);
    }
    out.push_str(&stream.finish().unwrap());
    assert_eq!(out, tokenizer.decode(&ids).unwrap());

    let mut stream = TextStream::new(&tokenizer, &["が走".to_string()]);
    let mut out = String::new();
    for &id in &ids {
        out.push_str(&stream.push(id).unwrap());
    }
    out.push_str(&stream.finish().unwrap());
    assert_eq!(out, "赤い四角です。🐴");
}

#[test]
fn model_directories_load_answer_and_export() {
    let dir = common::tiny_model_dir("generate", true);
    let (tokens, text) = common::greedy_answer::<B>(&dir, &FlexDevice);
    assert_eq!(tokens.len(), 8);
    assert!(!text.contains("システム:"), "the answer is what follows the prompt: {text:?}");

    // f32 export: same weights, same answer; the export is self-contained.
    let out = dir.with_extension("export-f32");
    let assistant = Assistant::<B>::load(&dir, &LoadOptions::default(), &FlexDevice).unwrap();
    export(&assistant, &out, burn::tensor::DType::F32).unwrap();
    for f in ["model.safetensors", "config.json", "tokenizer.json", "preprocessor_config.json"] {
        assert!(out.join(f).is_file(), "export lacks {f}");
    }
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "float32");
    let names = llava_jp::import::Checkpoint::open(out.join("model.safetensors")).unwrap();
    assert!(names.keys().any(|k| k.starts_with("model.vision_tower.vision_tower.vision_model.")), "reference names");
    assert!(names.keys().any(|k| k == "model.mm_projector.2.weight"), "reference projector names");
    assert_eq!(common::greedy_answer::<B>(&out, &FlexDevice), (tokens.clone(), text.clone()));
    // Exporting into a non-empty directory is refused.
    let e = export(&assistant, &out, burn::tensor::DType::F32).unwrap_err();
    assert!(e.to_string().contains("not empty"), "{e}");

    // f16 export: half the bytes, weights rounded to f16, loaded into an f32 model.
    let half = dir.with_extension("export-f16");
    export(&assistant, &half, burn::tensor::DType::F16).unwrap();
    let size = |p: &Path| std::fs::metadata(p.join("model.safetensors")).unwrap().len();
    assert!(size(&half) * 10 < size(&out) * 6, "f16 {} vs f32 {} bytes", size(&half), size(&out));
    let (half_tokens, _) = common::greedy_answer::<B>(&half, &FlexDevice);
    assert_eq!(half_tokens.len(), 8);
}

#[test]
fn a_model_directory_without_a_tokenizer_or_with_a_bad_image_is_refused() {
    let dir = common::tiny_model_dir("no-tokenizer", false);
    let e = Assistant::<B>::load(&dir, &LoadOptions::default(), &FlexDevice).err().expect("no tokenizer");
    assert!(e.to_string().contains("no tokenizer.json") && e.to_string().contains("--tokenizer"), "{e}");
    let options = LoadOptions { tokenizer: Some(common::tokenizer_path()), template: None };
    let assistant = Assistant::<B>::load(&dir, &options, &FlexDevice).unwrap();
    let e = assistant.load_image(&dir.join("missing.jpg")).unwrap_err();
    assert!(e.to_string().contains("missing.jpg"), "{e}");
    std::fs::write(dir.join("broken.jpg"), b"\xFF\xD8not really").unwrap();
    let e = assistant.load_image(&dir.join("broken.jpg")).unwrap_err();
    assert!(e.to_string().contains("broken.jpg"), "{e}");
    let e = Assistant::<B>::load(&dir.join("nope"), &options, &FlexDevice).err().expect("missing dir");
    assert!(e.to_string().contains("nope"), "{e}");
    // The fixture's vocabulary (96) cannot hold llm-jp's tokenizer.
    let e = Assistant::<B>::load(&common::fixture("llava"), &options, &FlexDevice).err().expect("mismatch");
    assert!(e.to_string().contains("do not belong together"), "{e}");
}

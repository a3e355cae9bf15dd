//! The CUDA-graph decoder (`src/graph_decode.rs`) against burn's eager decoding of the same
//! model, on random small models whose shapes stress the kernels (heads one wide and wider
//! than a warp, widths that are not multiples of eight, untied heads, several activations,
//! prompts longer than an attention chunk). Needs a CUDA GPU. Run each test in a process of its
//! own (`cargo test --release --test graph_decode -- --ignored --exact <name>`): the flex
//! references choose their float type once per process; `model-import/results/
//! graph-decode-2026-12-03/call5.sh` runs them all.
#![cfg(feature = "cuda")]

use std::sync::{Arc, Mutex};

use burn::backend::cuda::CudaDevice;
use burn::backend::Cuda;
use burn::prelude::*;
use llava_jp::config::LlavaConfig;
use llava_jp::graph_decode::GraphDecoder;
use llava_jp::infer::{generate, GenerationConfig, Generated, Prompt};
use llava_jp::model::{LlavaModel, IMAGE_TOKEN_INDEX};

struct Case {
    n_embd: usize,
    n_head: usize,
    n_layer: usize,
    vocab: usize,
    activation: &'static str,
    tied: bool,
    text_tokens: usize,
}

const CASES: [Case; 6] = [
    Case { n_embd: 32, n_head: 4, n_layer: 3, vocab: 96, activation: "gelu", tied: true, text_tokens: 6 },
    Case { n_embd: 2, n_head: 2, n_layer: 2, vocab: 37, activation: "gelu_new", tied: true, text_tokens: 3 },
    Case { n_embd: 13, n_head: 1, n_layer: 2, vocab: 233, activation: "quick_gelu", tied: false, text_tokens: 9 },
    Case { n_embd: 72, n_head: 1, n_layer: 1, vocab: 50, activation: "relu", tied: true, text_tokens: 70 },
    Case { n_embd: 256, n_head: 2, n_layer: 2, vocab: 1001, activation: "gelu", tied: false, text_tokens: 140 },
    Case { n_embd: 96, n_head: 3, n_layer: 2, vocab: 64, activation: "silu", tied: true, text_tokens: 20 },
];

fn config(case: &Case) -> LlavaConfig {
    let mut config = LlavaConfig::from_file(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/tiny.json")).unwrap();
    let text = &mut config.text;
    text.n_embd = case.n_embd;
    text.n_head = case.n_head;
    text.n_layer = case.n_layer;
    text.vocab_size = case.vocab;
    text.activation_function = case.activation.into();
    text.tie_word_embeddings = case.tied;
    text.n_positions = 256;
    config.tokenizer_model_max_length = Some(256);
    // Heads 16 wide, which the flash kernel takes: the decoder encodes images itself (bf16).
    config.vision_config.as_mut().expect("tiny.json has a vision_config").num_attention_heads = 2;
    config
}

fn prompt(case: &Case, image_size: usize) -> Prompt {
    let mut ids: Vec<i64> = (0..case.text_tokens).map(|k| ((k * 7919 + 13) % case.vocab) as i64).collect();
    ids.insert(1, IMAGE_TOKEN_INDEX);
    let pixels = (0..3 * image_size * image_size).map(|k| ((k * 31) % 255) as f32 / 128.0 - 1.0).collect();
    Prompt { input_ids: ids, images: vec![pixels], seed: None }
}

fn run<B: Backend>(model: &LlavaModel<B>, p: &Prompt, decoder: Option<&Arc<Mutex<GraphDecoder>>>, keep_logits: bool) -> Generated {
    let config = GenerationConfig {
        max_new_tokens: 24,
        eos_token_id: None,
        keep_logits,
        graph_decoder: decoder.cloned(),
        ..GenerationConfig::default()
    };
    generate(model, std::slice::from_ref(p), &config, None, &mut |_, _| {}).unwrap().0.remove(0)
}

/// Step by step while the two runs chose the same tokens: the graph's logits within `tol`
/// (relative to the row's scale) of burn's. A run may take another token only where burn's
/// two best logits lie within `tol` of each other.
fn compare(what: &str, eager: &Generated, graph: &Generated, tol: f32) {
    assert_eq!(eager.logits.len(), graph.logits.len(), "{what}: steps");
    for (step, (e, g)) in eager.logits.iter().zip(&graph.logits).enumerate() {
        let scale = e.iter().fold(1f32, |m, v| m.max(v.abs()));
        let worst = e.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= tol * scale, "{what}: step {step}: logits differ by {worst} (scale {scale}, tolerance {})", tol * scale);
        if eager.tokens[step] != graph.tokens[step] {
            let mut sorted = e.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            assert!(sorted[0] - sorted[1] <= 2.0 * tol * scale, "{what}: step {step}: tokens {} vs {} with a clear winner", eager.tokens[step], graph.tokens[step]);
            return;
        }
    }
}

fn check<B: Backend>(device: &B::Device, tol: f32) {
    // `GRAPH_DECODE_CASES=0,3` runs those cases only (the GPU script runs each in a process of
    // its own, since burn's kernel compilation for each new shape dominates).
    let only: Option<Vec<usize>> = std::env::var("GRAPH_DECODE_CASES").ok().map(|v| v.split(',').map(|c| c.parse().unwrap()).collect());
    for (i, case) in CASES.iter().enumerate() {
        if only.as_ref().is_some_and(|o| !o.contains(&i)) {
            continue;
        }
        eprintln!("case {i}: {} wide, {} heads, {} layers", case.n_embd, case.n_head, case.n_layer);
        let config = config(case);
        B::seed(device, 7 + i as u64);
        let model = LlavaModel::<B>::new(&config, device);
        let p = prompt(case, model.vision_tower.image_size());
        let eager = run(&model, &p, None, true);
        // The language model alone (bf16 models whose heads the flash kernel takes prefill on
        // the decoder from burn's embeddings), then with the vision tower and projector too
        // (the whole prompt on the decoder).
        let alone = GraphDecoder::new(&model.transformer, model.lm_head.as_ref(), 0).unwrap();
        let mut whole = GraphDecoder::new(&model.transformer, model.lm_head.as_ref(), 0).unwrap();
        let prefill = alone.prefill_unsupported().map_or("decoder prefill".into(), |why| format!("burn prefill: {why}"));
        let vision = match whole.vision_unsupported(&model) {
            None => {
                whole.add_vision(&model).unwrap();
                "decoder".to_string()
            }
            Some(why) => format!("burn: {why}"),
        };
        for (decoder, path) in [(alone, prefill), (whole, format!("images on the {vision}"))] {
            let decoder = Arc::new(Mutex::new(decoder));
            // The step as one persistent kernel and as its kernels one after another: the same
            // arithmetic, but the step kernel splits its products and the attention's keys its
            // own way, so sums are added in other orders: f32 rounding apart. It takes widths of
            // whole 16-byte rows on sm_90 (bulk copies), so every case but the 2- and 13-wide.
            let mut by_step_kernel: Option<Generated> = None;
            for step_kernel in [true, false] {
                // (The lock is let go before the body takes it again.)
                let set = decoder.lock().unwrap().set_step_kernel(step_kernel);
                if let Err(why) = set {
                    let sm90 = decoder.lock().unwrap().compute_capability().0 >= 9;
                    assert!(step_kernel && (case.n_embd % 8 != 0 || !sm90), "case {i}: step kernel {step_kernel}: {why}");
                    eprintln!("case {i}: no step kernel ({why})");
                    continue;
                }
                let how = if step_kernel { "one step kernel" } else { "the step's kernels" };
                let what = format!("case {i} ({} wide, {} heads, {}), {path}, {how}", case.n_embd, case.n_head, case.activation);
                eprintln!("{what}");
                let graph = run(&model, &p, Some(&decoder), true);
                compare(&what, &eager, &graph, tol);
                // Greedy on the GPU (no logits kept) takes the tokens the host's arg max took.
                let greedy = run(&model, &p, Some(&decoder), false);
                assert_eq!(greedy.tokens, graph.tokens, "{what}: arg max on the GPU vs on the host");
                // The decoder is reusable: a second generation starts from its own prompt again.
                let again = run(&model, &p, Some(&decoder), false);
                assert_eq!(again.tokens, greedy.tokens, "{what}: second generation");
                match &by_step_kernel {
                    None => by_step_kernel = Some(graph),
                    Some(one) => compare(&format!("{what} against the step kernel"), one, &graph, 1e-4),
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn graph_decode_matches_eager_f32() {
    // burn's f32 products on CUDA run in TF32 (10-bit mantissas); the graph's are f32.
    check::<Cuda<f32>>(&CudaDevice::new(0), 5e-3);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn graph_decode_matches_eager_bf16() {
    // burn rounds every intermediate to bf16, the graph keeps activations in f32.
    check::<Cuda<burn::tensor::bf16>>(&CudaDevice::new(0), 4e-2);
}

// The same cases with burn's CPU backend as the reference: the decoder is built from the CPU
// model's weights and takes its prompt cache through the host. Seconds, where the CUDA
// references above spend minutes in burn's kernel compilation.
#[cfg(feature = "flex")]
#[test]
#[ignore = "needs a CUDA GPU"]
fn graph_decode_matches_flex_f32() {
    check::<burn::backend::Flex>(&burn::backend::flex::FlexDevice, 2e-4);
}

/// Flex takes bf16 for the whole process: run it alone (`--exact`).
#[cfg(feature = "flex")]
#[test]
#[ignore = "needs a CUDA GPU; run alone (flex's float type is chosen once per process)"]
fn graph_decode_matches_flex_bf16() {
    use burn::backend::flex::FlexDevice;
    burn::tensor::set_default_dtypes::<burn::backend::Flex>(&FlexDevice, burn::tensor::DType::BF16, burn::tensor::DType::I32)
        .expect("flex in bf16: run this test alone, before any other made a tensor");
    check::<burn::backend::Flex>(&FlexDevice, 4e-2);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn graph_decode_rejects_a_model_of_another_shape() {
    let device = CudaDevice::new(0);
    let small = LlavaModel::<Cuda<f32>>::new(&config(&CASES[0]), &device);
    let other = LlavaModel::<Cuda<f32>>::new(&config(&CASES[1]), &device);
    let decoder = Arc::new(Mutex::new(GraphDecoder::new(&other.transformer, other.lm_head.as_ref(), 0).unwrap()));
    let p = prompt(&CASES[0], small.vision_tower.image_size());
    let config = GenerationConfig { max_new_tokens: 4, graph_decoder: Some(decoder), ..GenerationConfig::default() };
    let err = generate(&small, &[p], &config, None, &mut |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("graph decoding") && err.contains("shape"), "{err}");
}

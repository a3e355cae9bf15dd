//! Generation speed: time to first token (image encoding + prefill) and decode tokens per second,
//! at batch 1 and batch 8, on each backend asked for. Random weights of the given config (the
//! speed does not depend on their values); greedy, no eos, so every run generates the same
//! number of tokens. The same work in transformers: `model-import/scripts/bench_generate.py`;
//! both on the GPU machine: `model-import/scripts/gpu_bench_generate.sh`.
//!
//!     cargo bench --bench generate [-- --config configs/tiny.json --backends flex,wgpu
//!         --dtype f32 --batches 1,8 --text-tokens 8 --new-tokens 16 --runs 3 --decode graph
//!         --graph-vision off]
//!
//! Prints one JSON line per (backend, batch): medians over `--runs` after one warm-up run.
use std::path::PathBuf;
use std::time::Duration;

use burn::prelude::Backend;
use llava_jp::backend::{dispatch, BackendJob, BackendKind, FloatType};
use llava_jp::config::LlavaConfig;
use llava_jp::infer::{generate, GenerationConfig, Prompt};
use llava_jp::model::{LlavaModel, IMAGE_TOKEN_INDEX};

struct Settings {
    config: PathBuf,
    batches: Vec<usize>,
    text_tokens: usize,
    new_tokens: usize,
    runs: usize,
    dtype: FloatType,
    /// Batch 1 on CUDA through the graph decoder (`src/graph_decode.rs`) instead of burn.
    graph: bool,
    /// The graph decoder encodes images too (`--graph-vision off`: burn does).
    graph_vision: bool,
}

struct BenchJob<'a>(&'a Settings, BackendKind);

impl BackendJob for BenchJob<'_> {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) {
        let (s, backend) = (self.0, self.1);
        let config = LlavaConfig::from_file(&s.config).expect("model config");
        B::seed(&device, 0);
        let model = LlavaModel::<B>::new(&config, &device);
        let size = model.vision_tower.image_size();
        let vocab = config.text.vocab_size as i64;
        // Prompts of different lengths (as a batch of real questions has), one image each.
        let prompt = |i: usize| {
            let n = s.text_tokens + (i * 3) % (s.text_tokens / 2 + 1);
            let mut ids: Vec<i64> = (0..n).map(|k| 8 + ((k * 7919 + i * 104729) as i64 % (vocab - 8))).collect();
            ids.insert(1.min(n), IMAGE_TOKEN_INDEX);
            let pixels = (0..3 * size * size).map(|k| ((k + i) % 255) as f32 / 128.0 - 1.0).collect();
            Prompt { input_ids: ids, images: vec![pixels], seed: None }
        };
        let mut gen = GenerationConfig { max_new_tokens: s.new_tokens, eos_token_id: None, ..GenerationConfig::default() };
        let graph = s.graph && backend == BackendKind::Cuda;
        #[cfg(feature = "cuda")]
        if graph {
            let mut decoder = llava_jp::graph_decode::GraphDecoder::new(&model.transformer, model.lm_head.as_ref(), 0).expect("graph decoder");
            if s.graph_vision {
                match decoder.vision_unsupported(&model) {
                    None => decoder.add_vision(&model).expect("the decoder's vision tower"),
                    Some(why) => eprintln!("images encoded by burn: {why}"),
                }
            }
            gen.graph_decoder = Some(std::sync::Arc::new(std::sync::Mutex::new(decoder)));
            // Where a step's time goes, at the benchmark's prompt length (before the runs, so the
            // numbers do not depend on what the runs left in the cache).
            let profile = gen.graph_decoder.as_ref().unwrap().lock().unwrap().profile(s.text_tokens + model.image_tokens(), 50);
            match profile {
                Ok(p) => println!("{}", serde_json::json!({
                    "side": "ours", "profile": "graph decode step", "graph_step_ms": p.graph_step_ms,
                    "step_kernel_graph_ms": p.step_kernel_graph_ms, "kernels_graph_ms": p.kernels_graph_ms,
                    "step_kernel_blocks": p.step_kernel_blocks,
                    "launched_step_ms": p.launched_step_ms, "gemv_blocks_per_sm": p.gemv_blocks_per_sm,
                    "dependent_launches": p.dependent_launches,
                    "kernels": p.kernels.iter().map(|(n, ms, count)| serde_json::json!({"kernel": n, "ms": ms, "launches": count})).collect::<Vec<_>>(),
                })),
                Err(e) => eprintln!("graph decode profile: {e}"),
            }
            // At full size the decoder's own prefill against burn's, on the first token's
            // logits (the tests compare them on small models).
            let decoder = gen.graph_decoder.clone().unwrap();
            let on = decoder.lock().unwrap().prefill_unsupported().is_none();
            if on {
                let first = |prefill: bool| {
                    decoder.lock().unwrap().set_prefill(prefill);
                    let once = GenerationConfig { max_new_tokens: 1, keep_logits: true, ..gen.clone() };
                    generate(&model, &[prompt(0)], &once, None, &mut |_, _| {}).expect("first token").0.remove(0)
                };
                let (burn, ours) = (first(false), first(true));
                let (a, b) = (&burn.logits[0], &ours.logits[0]);
                let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
                let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                println!("{}", serde_json::json!({
                    "side": "ours", "profile": "prefill against burn's", "first_token_same": burn.tokens == ours.tokens,
                    "logits_max_abs_diff": worst, "logits_scale": scale,
                }));
            } else {
                eprintln!("the graph decoder does not prefill: {:?}", decoder.lock().unwrap().prefill_unsupported());
            }
        }
        // Time to first token's first part: the vision tower and projector alone (burn).
        {
            let pixels: Vec<f32> = prompt(0).images.concat();
            let encode = || {
                let started = std::time::Instant::now();
                let px = burn::tensor::Tensor::<B, 4>::from_data(burn::tensor::TensorData::new(pixels.clone(), [1, 3, size, size]), &device);
                let _ = model.encode_images(px).into_data();
                started.elapsed()
            };
            encode();
            let times: Vec<Duration> = (0..s.runs.max(1)).map(|_| encode()).collect();
            println!("{}", serde_json::json!({"side": "ours", "profile": "encode images", "backend": backend.to_string(), "batch": 1, "ms": median_ms(&times)}));
        }
        for &batch in &s.batches {
            let prompts: Vec<Prompt> = (0..batch).map(prompt).collect();
            let warm = GenerationConfig { max_new_tokens: s.new_tokens.min(4), ..gen.clone() };
            generate(&model, &prompts, &warm, None, &mut |_, _| {}).expect("warm-up");
            let mut ttft = Vec::new();
            let mut decode = Vec::new();
            let mut prompt_tokens = 0;
            let mut answers: Vec<Vec<Vec<i64>>> = Vec::new();
            for _ in 0..s.runs {
                let (out, stats) = generate(&model, &prompts, &gen, None, &mut |_, _| {}).expect("generation");
                prompt_tokens = out.iter().map(|g| g.prompt_tokens).max().unwrap_or(0);
                answers.push(out.iter().map(|g| g.tokens.clone()).collect());
                ttft.push(stats.time_to_first_token);
                // Every prompt advances one token per decode step.
                decode.push((batch * stats.decode_steps) as f64 / stats.decode.as_secs_f64().max(1e-9));
            }
            let line = serde_json::json!({
                "side": "ours", "backend": backend.to_string(), "dtype": s.dtype.to_string(),
                "config": s.config.display().to_string(), "batch": batch, "prompt_tokens": prompt_tokens,
                "new_tokens": s.new_tokens, "ttft_ms": median_ms(&ttft),
                "decode_tokens_per_s": median(&mut decode), "runs": s.runs,
                "decode": if graph && batch == 1 { "graph" } else { "eager" },
                "graph_cache_load_ms": cache_load_ms(&gen),
                // Greedy answers are deterministic: another build or kernel variant that only
                // reorders work must give the same digest, and every run the same answers.
                "answers_fnv": answers.first().map(|a| format!("{:016x}", fnv1a(a.iter().flatten()))),
                "runs_same_answers": answers.windows(2).all(|w| w[0] == w[1]),
            });
            println!("{line}");
        }
    }
}

/// FNV-1a over the tokens' little-endian bytes.
fn fnv1a<'a>(tokens: impl Iterator<Item = &'a i64>) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for byte in tokens.flat_map(|t| t.to_le_bytes()) {
        hash = (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The graph decoder's last cache copy (included in the decode time), when there is one.
fn cache_load_ms(gen: &GenerationConfig) -> Option<f64> {
    #[cfg(feature = "cuda")]
    if let Some(decoder) = &gen.graph_decoder {
        return Some(decoder.lock().unwrap().last_cache_load().as_secs_f64() * 1e3);
    }
    let _ = gen;
    None
}

fn median_ms(v: &[Duration]) -> f64 {
    let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    median(&mut ms)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut s = Settings {
        config: root.join("configs/tiny.json"),
        batches: vec![1, 8],
        text_tokens: 8,
        new_tokens: 16,
        runs: 3,
        dtype: FloatType::F32,
        graph: false,
        graph_vision: true,
    };
    let mut backends = vec![BackendKind::Flex, BackendKind::Wgpu];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--config" => s.config = value().into(),
            "--backends" => backends = value().split(',').map(|b| b.parse().expect("backend")).collect(),
            "--dtype" => s.dtype = value().parse().expect("dtype"),
            "--batches" => s.batches = value().split(',').map(|b| b.parse().expect("batch")).collect(),
            "--text-tokens" => s.text_tokens = value().parse().expect("count"),
            "--new-tokens" => s.new_tokens = value().parse().expect("count"),
            "--runs" => s.runs = value().parse().expect("count"),
            "--decode" => {
                s.graph = match value().as_str() {
                    "graph" => true,
                    "eager" => false,
                    other => panic!("--decode {other}: expected `eager` or `graph`"),
                }
            }
            "--graph-vision" => {
                s.graph_vision = match value().as_str() {
                    "on" => true,
                    "off" => false,
                    other => panic!("--graph-vision {other}: expected `on` or `off`"),
                }
            }
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    for backend in backends {
        if let Err(e) = dispatch(backend, s.dtype, BenchJob(&s, backend)) {
            eprintln!("{backend}: skipped: {e}");
        }
    }
}

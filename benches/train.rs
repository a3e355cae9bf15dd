//! Training-step throughput: steps of a real run (the `train` code path: loader, forward,
//! backward, AdamW) on a chosen backend, reported as step time, tokens/s, samples/s, MFU and
//! peak memory, beside the same step in PyTorch when asked (`--torch`, on the GPU machine).
//!
//!     cargo bench --bench train                         # tiny model, both stages, CPU (flex)
//!     cargo bench --bench train -- --config RUN.toml... [--backend cuda] [--steps N]
//!                                  [--peak-tflops 989] [--torch]
//!     cargo bench --bench train -- --backend cuda --layers 24   # queuing a full-depth step
//!
//! With `--config`, each run config is benchmarked as it is (the GPU script writes full-size
//! ones: `model-import/scripts/bench_train.py data`); without, a tiny LLaVA on coloured squares
//! with the llm-jp tokenizer (`../shared/reference/`, or `LLAVA_JP_TOKENIZER`). The first two
//! steps (kernel compilation, autotuning, allocator warm-up) are left out of the averages.
//! `--layers N` gives the tiny model N blocks in the tower and the LLM: as many operations a
//! step as the full-size model's 24 and 24 on tensors so small that, on a GPU, a step costs
//! about what queuing its operations costs. The `host` column is the share of a step the
//! training thread spent queuing it (forward, backward, optimizer); that includes waiting for
//! cubecl's device thread when it falls behind, so near 100% says the device thread or the
//! device bounds the step, and a per-thread profile (`perf record -g -p PID`) tells which: on
//! lavapipe (`--backend wgpu` on a CPU) the device thread runs the shaders itself, ~70% of the
//! samples, and the training thread waits in cubecl's channel.
//! MFU counts 6 x LLM parameters x tokens per step, the PyTorch script's formula. Tokens are
//! those after splicing, padding excluded; the PyTorch script's samples are all exactly
//! `max_length` long, so compare runs whose samples fill it (the GPU script's data do), on one
//! device (`--torch` runs PyTorch on one GPU). On CUDA a step's time is taken when its loss is
//! read back, so work still queued then is counted in the next step.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use llava_jp::backend::{dispatch_autodiff, AutodiffJob, BackendKind};
use llava_jp::train::trainer::training_model_config;
use llava_jp::train::{train, TrainConfig, TrainControl, TrainOutcome};

struct Job {
    config: TrainConfig,
}

impl AutodiffJob for Job {
    type Output = anyhow::Result<TrainOutcome>;
    fn run<B: burn::tensor::backend::AutodiffBackend>(
        self,
        devices: Vec<B::Device>,
    ) -> Self::Output {
        train::<B>(&self.config, None, &devices, &TrainControl::default())
    }
}

/// The highest GPU memory use seen by `nvidia-smi` while a run goes on (MiB), when there is one.
struct GpuMemory {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GpuMemory {
    fn watch() -> Self {
        let (stop, peak) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let out = std::process::Command::new("nvidia-smi")
                    .args(["--query-gpu=memory.used", "--format=csv,noheader,nounits"])
                    .output();
                let Ok(out) = out else { return };
                let used: u64 = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| l.trim().parse::<u64>().ok())
                    .sum();
                p.fetch_max(used, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        Self {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn peak_gib(mut self) -> Option<f64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map(|t| t.join());
        let mib = self.peak.load(Ordering::Relaxed);
        (mib > 0).then(|| mib as f64 / 1024.0)
    }
}

/// GPT-2's parameter count from its config (embeddings, blocks, final norm; the head is tied).
fn llm_parameters(cfg: &TrainConfig) -> f64 {
    let c = training_model_config(cfg).expect("the run's model config");
    let t = &c.text;
    let (d, l) = (t.n_embd as f64, t.n_layer as f64);
    (t.vocab_size as f64 + t.n_positions as f64) * d + l * (12.0 * d * d + 13.0 * d) + 2.0 * d
}

/// A tiny run workspace: configs/tiny.json's model with the llm-jp vocabulary, 16 coloured squares with captions (stage 1)
/// and questions (stage 2).
fn tiny_workspace(steps: u64, layers: Option<u64>) -> Vec<TrainConfig> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("llava-jp-bench-train-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let tokenizer = std::env::var_os("LLAVA_JP_TOKENIZER")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/reference/llm-jp-tokenizer-v2.1/tokenizer.json"));
    let (mut captions, mut questions) = (vec![], vec![]);
    for i in 0..16u8 {
        let rgb = [i * 15, 200 - i * 10, 90];
        image::RgbImage::from_pixel(40, 30, image::Rgb(rgb))
            .save(dir.join(format!("images/{i}.png")))
            .unwrap();
        let turn = |from: &str, value: String| serde_json::json!({"from": from, "value": value});
        let answer = format!("色は{}、{}、{}です。", rgb[0], rgb[1], rgb[2]);
        captions.push(serde_json::json!({"id": format!("c{i}"), "image": format!("{i}.png"),
            "conversations": [turn("ユーザー", "<image>\n説明して。".into()), turn("システム", answer.clone())]}).to_string());
        questions.push(serde_json::json!({"id": format!("q{i}"), "image": format!("{i}.png"),
            "conversations": [turn("ユーザー", "<image>\n何色ですか？".into()), turn("システム", answer)]}).to_string());
    }
    let mut model: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("configs/tiny.json")).unwrap())
            .unwrap();
    model["vocab_size"] = 50570.into();
    model["tokenizer_model_max_length"] = 96.into();
    model["n_positions"] = 128.into();
    if let Some(layers) = layers {
        model["n_layer"] = layers.into();
        model["vision_config"]["num_hidden_layers"] = layers.into();
    }
    std::fs::write(dir.join("model.json"), model.to_string()).unwrap();
    std::fs::write(dir.join("stage1.jsonl"), captions.join("\n")).unwrap();
    std::fs::write(dir.join("stage2.jsonl"), questions.join("\n")).unwrap();
    [(1, "plain", 1e-3), (2, "v1", 2e-5)]
        .into_iter()
        .map(|(stage, template, lr)| {
            let text = format!(
                "model_config = {model:?}\nstage = {stage}\ndata = [{data:?}]\nimage_folder = {images:?}\ntokenizer = {tokenizer:?}\n\
                 template = \"{template}\"\noutput_dir = {out:?}\nper_device_train_batch_size = 4\nlearning_rate = {lr}\n\
                 max_steps = {steps}\nsave_steps = 100000\ndropout = false\n",
                model = dir.join("model.json"),
                data = dir.join(format!("stage{stage}.jsonl")),
                images = dir.join("images"),
                out = dir.join(format!("run-stage{stage}")),
            );
            TrainConfig::from_toml(&text, &[]).expect("the tiny bench config")
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let (mut configs, mut backend, mut steps, mut peak_tflops, mut torch, mut layers) = (
        Vec::<PathBuf>::new(),
        BackendKind::Flex,
        8u64,
        None::<f64>,
        false,
        None::<u64>,
    );
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" => configs.push(args.next().expect("--config RUN.toml").into()),
            "--backend" => backend = args.next().expect("--backend flex|wgpu|cuda").parse().map_err(anyhow::Error::msg)?,
            "--steps" => steps = args.next().and_then(|s| s.parse().ok()).expect("--steps N"),
            "--peak-tflops" => peak_tflops = Some(args.next().and_then(|s| s.parse().ok()).expect("--peak-tflops T")),
            "--torch" => torch = true,
            "--layers" => layers = Some(args.next().and_then(|s| s.parse().ok()).filter(|&n| n >= 2).expect("--layers N (at least 2: the tower's output is its second-to-last layer)")),
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other:?}: expected --config, --backend, --steps, --peak-tflops, --torch, --layers"),
        }
    }
    anyhow::ensure!(
        steps >= 3,
        "--steps {steps}: at least 3 (the first two are warm-up)"
    );
    let overrides = [format!("max_steps={steps}")];
    anyhow::ensure!(layers.is_none() || configs.is_empty(), "--layers deepens the tiny model; a --config run is benchmarked as it is");
    let runs: Vec<TrainConfig> = if configs.is_empty() {
        tiny_workspace(steps, layers)
    } else {
        configs
            .iter()
            .map(|p| TrainConfig::from_file(p, &overrides))
            .collect::<Result<_, _>>()?
    };
    println!(
        "{:<6} {:>5} {:>9} {:>6} {:>10} {:>10} {:>9} {:>6} {:>9} {:>9}",
        "stage",
        "batch",
        "step (s)",
        "host",
        "tokens/s",
        "samples/s",
        "first (s)",
        "MFU",
        "RSS GiB",
        "GPU GiB"
    );
    for cfg in runs {
        let params = llm_parameters(&cfg);
        let (stage, batch) = (
            cfg.stage,
            cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * cfg.num_devices,
        );
        let gpu = GpuMemory::watch();
        let outcome = dispatch_autodiff(
            backend,
            cfg.num_devices,
            Job {
                config: cfg.clone(),
            },
        )
        .map_err(anyhow::Error::msg)??;
        let gpu_gib = gpu.peak_gib();
        let m = &outcome.metrics;
        let step_s = |r: &llava_jp::train::trainer::StepMetrics| r.tokens as f64 / r.tokens_per_s;
        let steady = &m[2..];
        let mean_s = steady.iter().map(step_s).sum::<f64>() / steady.len() as f64;
        let tokens = steady.iter().map(|r| r.tokens as f64).sum::<f64>() / steady.len() as f64;
        let samples = steady.iter().map(|r| r.samples as f64).sum::<f64>() / steady.len() as f64;
        let rss = m.iter().map(|r| r.rss_mb).fold(0.0, f64::max) / 1024.0;
        let recording = |r: &llava_jp::train::trainer::StepMetrics| r.times.forward_s + r.times.backward_s + r.times.optimizer_s;
        let host = steady.iter().map(recording).sum::<f64>() / steady.len() as f64 / mean_s;
        let mfu = peak_tflops.map_or("-".to_string(), |p| {
            format!(
                "{:.1}%",
                100.0 * 6.0 * params * tokens / mean_s / (p * 1e12)
            )
        });
        println!(
            "{stage:<6} {batch:>5} {mean_s:>9.3} {:>5.0}% {:>10.0} {:>10.2} {:>9.1} {mfu:>6} {rss:>9.2} {:>9}",
            100.0 * host,
            tokens / mean_s,
            samples / mean_s,
            step_s(&m[0]),
            gpu_gib.map_or("-".to_string(), |g| format!("{g:.1}"))
        );
        if torch {
            // The same step in PyTorch at the same batch and length, in this run.
            let seq = training_model_config(&cfg)?.max_length();
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("model-import/scripts/bench_train.py");
            let out = std::process::Command::new("python3")
                .arg(&script)
                .args([
                    "torch",
                    "--stage",
                    &stage.to_string(),
                    "--batch",
                    &batch.to_string(),
                    "--seq",
                    &seq.to_string(),
                    "--steps",
                    &steps.to_string(),
                ])
                .output()?;
            let line = String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .unwrap_or("")
                .to_string();
            match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(v) => {
                    let theirs = v["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
                    println!(
                        "pytorch: {line}\nours / pytorch tokens/s: {:.2}x",
                        tokens / mean_s / theirs
                    );
                }
                Err(_) => println!(
                    "pytorch run failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                        .lines()
                        .last()
                        .unwrap_or("")
                ),
            }
        }
    }
    Ok(())
}

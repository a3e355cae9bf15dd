use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::prelude::Backend;
use clap::{Parser, Subcommand};
use llava_jp::backend::{dispatch, BackendJob, BackendKind, FloatType};
use llava_jp::import::{load_module, Checkpoint, Layout};
use llava_jp::model::{Projector, ProjectorKind};
use llava_jp::parity::check_fixture;
use llava_jp::weights::{load_clip, load_gpt2, load_llava};

mod cli;

#[derive(Parser)]
#[command(name = "llava-jp", version, about = "LLaVA-JP (CLIP + projector + GPT-2) on burn: CPU, wgpu and CUDA")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a checkpoint (directory or file): which model it is, parameters per part,
    /// stored dtypes, and whether it loads cleanly.
    Inspect {
        path: PathBuf,
        /// Skip the trial load (quick look at a large checkpoint).
        #[arg(long)]
        no_load: bool,
    },
    /// Compare against a transformers reference fixture (see model-import/scripts/make_fixtures.py).
    Check {
        /// A fixture directory, or a folder of them.
        #[arg(long)]
        fixture: PathBuf,
        #[arg(long, default_value = "flex")]
        backend: BackendKind,
        #[arg(long, default_value = "f32")]
        dtype: FloatType,
        /// Fail when a max_abs difference exceeds this.
        #[arg(long)]
        tolerance: Option<f32>,
    },
    /// Train stage 1 (projector) or stage 2 (projector + LLM) from a TOML config.
    Train(cli::train::TrainArgs),
    /// The whole pipeline on the CPU in minutes: synthetic Japanese visual QA data, a tokenizer,
    /// both training stages, held-out evaluation, an exported model to chat with.
    Demo(cli::demo::DemoArgs),
    /// Write the demo's synthetic Japanese visual QA dataset (LLaVA format + images).
    Synth(cli::demo::SynthArgs),
    /// Train a tokenizer in llm-jp's form (Unigram, byte fallback, its special ids) on texts.
    #[command(name = "train-tokenizer")]
    TrainTokenizer(cli::demo::TrainTokenizerArgs),
    /// Ask about an image: one question (--prompt), a conversation on standard input, or a JSONL
    /// file of questions (--questions) answered in batches.
    Chat(cli::chat::ChatArgs),
    /// Write a self-contained model directory (weights, config, tokenizer, preprocessor config)
    /// that every backend loads, wgpu included.
    Export(cli::chat::ExportArgs),
    /// An OpenAI-compatible HTTP API (/v1/chat/completions, streamed or not) and a web page
    /// for asking about images.
    Serve(cli::serve::ServeArgs),
    /// Fold a LoRA run's adapters into the LLM: a plain model directory.
    MergeLora {
        /// A checkpoint of a run with lora_enable = true.
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Draw the loss / learning-rate plot of a run's metrics.jsonl.
    Plot {
        metrics: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Convert a public dataset to the LLaVA format.
    #[command(subcommand)]
    Convert(cli::data::ConvertCommand),
    /// Read a dataset through the loader and report what would be used and left out, and why.
    #[command(name = "data-check")]
    DataCheck {
        #[command(flatten)]
        data: cli::data::DataArgs,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
    },
}

fn main() {
    llava_jp::backend::keep_large_host_buffers();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect { path, no_load } => inspect(&path, !no_load),
        Command::Convert(command) => cli::data::convert(command),
        Command::Train(args) => cli::train::run(args),
        Command::Chat(args) => cli::chat::chat(args),
        Command::Demo(args) => cli::demo::demo(args),
        Command::Synth(args) => cli::demo::synth(args),
        Command::TrainTokenizer(args) => cli::demo::train_tokenizer(args),
        Command::Export(args) => cli::chat::export_model(args),
        Command::Serve(args) => cli::serve::run(args),
        Command::MergeLora { checkpoint, out } => {
            llava_jp::train::lora::merge_lora_checkpoint::<burn::backend::Flex>(&checkpoint, &out, &Default::default())?;
            println!("merged model written to {}", out.display());
            Ok(())
        }
        Command::Plot { metrics, out } => {
            let out = out.unwrap_or_else(|| metrics.with_file_name("loss.png"));
            llava_jp::train::plot::plot_metrics_file(&metrics, &out)?;
            println!("{}", out.display());
            Ok(())
        }
        Command::DataCheck { data, batch_size } => cli::data::check(&data, batch_size),
        Command::Check { fixture, backend, dtype, tolerance } => {
            let mut dirs = vec![];
            if fixture.join("fixture.json").is_file() {
                dirs.push(fixture.clone());
            } else {
                for entry in std::fs::read_dir(&fixture).with_context(|| fixture.display().to_string())? {
                    let p = entry?.path();
                    if p.join("fixture.json").is_file() {
                        dirs.push(p);
                    }
                }
                dirs.sort();
            }
            anyhow::ensure!(!dirs.is_empty(), "{}: no fixture.json here or in its subfolders", fixture.display());
            let mut worst = 0f32;
            for dir in dirs {
                let started = std::time::Instant::now();
                let results = dispatch(backend, dtype, CheckJob(dir.clone())).map_err(anyhow::Error::msg)??;
                println!("# {} on {backend} {dtype} ({:.1} s)", dir.display(), started.elapsed().as_secs_f32());
                for r in &results {
                    println!("{r}");
                    worst = worst.max(r.max_abs);
                }
            }
            if let Some(tol) = tolerance {
                anyhow::ensure!(worst <= tol, "largest difference {worst:.3e} exceeds the tolerance {tol:.1e}");
            }
            Ok(())
        }
    }
}

struct CheckJob(PathBuf);

impl BackendJob for CheckJob {
    type Output = anyhow::Result<Vec<llava_jp::parity::Comparison>>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        check_fixture::<B>(&self.0, &device)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Clip,
    Gpt2,
    Llava,
    Projector,
}

fn detect(path: &Path, ckpt: &Checkpoint) -> anyhow::Result<Kind> {
    let dir = if path.is_dir() { path.to_path_buf() } else { path.parent().unwrap_or(Path::new(".")).to_path_buf() };
    if let Ok(text) = std::fs::read_to_string(dir.join("config.json")) {
        let json: serde_json::Value = serde_json::from_str(&text).with_context(|| dir.join("config.json").display().to_string())?;
        let has_projector = ckpt.keys().any(|k| k.contains("mm_projector"));
        let has_llm = ckpt.keys().any(|k| k.starts_with("transformer.") || k.starts_with("h."));
        if json.get("mm_vision_tower").is_some() && has_llm {
            return Ok(Kind::Llava);
        }
        if has_projector && !has_llm {
            return Ok(Kind::Projector);
        }
        match json.get("model_type").and_then(|m| m.as_str()) {
            Some("clip") | Some("clip_vision_model") => return Ok(Kind::Clip),
            Some("gpt2") => return Ok(Kind::Gpt2),
            _ => {}
        }
    }
    if ckpt.keys().all(|k| k.contains("mm_projector")) {
        return Ok(Kind::Projector);
    }
    if ckpt.keys().any(|k| k.starts_with("vision_model.")) {
        return Ok(Kind::Clip);
    }
    anyhow::bail!("{}: cannot tell which model this is (no config.json with model_type or mm_vision_tower)", path.display())
}

fn part_of(key: &str) -> &'static str {
    if key.contains("mm_projector") {
        "projector"
    } else if key.starts_with("model.transformer.") || key == "model.lm_head.weight" {
        "unused duplicate LM (v1.0)"
    } else if key.contains("vision_model.") || key.starts_with("visual_projection") {
        "vision tower"
    } else if key.starts_with("text_model.") || key.starts_with("text_projection") || key == "logit_scale" {
        "CLIP text tower (ignored)"
    } else {
        "language model"
    }
}

fn inspect(path: &Path, try_load: bool) -> anyhow::Result<()> {
    let ckpt = Checkpoint::open(path)?;
    let kind = detect(path, &ckpt)?;
    println!("checkpoint: {}", ckpt.describe());
    println!("model: {}", match kind {
        Kind::Clip => "CLIP (vision tower)",
        Kind::Gpt2 => "GPT-2 language model",
        Kind::Llava => "LLaVA-JP (vision tower + projector + GPT-2)",
        Kind::Projector => "LLaVA projector (stage-1 mm_projector)",
    });
    let mut parts: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    for (key, t) in &ckpt.tensors {
        let n: usize = t.shape().iter().product();
        let e = parts.entry(part_of(key)).or_default();
        e.0 += n;
        e.1 += 1;
        *dtypes.entry(format!("{:?}", t.dtype())).or_default() += n;
    }
    let total: usize = parts.values().map(|p| p.0).sum();
    println!("tensors: {} ({} parameters)", ckpt.tensors.len(), human(total));
    for (part, (n, count)) in &parts {
        println!("  {part:<28} {:>10} parameters in {count} tensors", human(*n));
    }
    println!("stored dtypes: {}", dtypes.iter().map(|(d, n)| format!("{d} ({})", human(*n))).collect::<Vec<_>>().join(", "));
    if !try_load {
        return Ok(());
    }
    let result = dispatch(BackendKind::Flex, FloatType::F32, InspectLoad { path: path.to_path_buf(), kind, ckpt_keys: ckpt.tensors.len() })
        .map_err(anyhow::Error::msg)?;
    match result {
        Ok(msg) => {
            println!("loads cleanly: yes ({msg})");
            Ok(())
        }
        Err(e) => {
            println!("loads cleanly: no");
            Err(e)
        }
    }
}

struct InspectLoad {
    path: PathBuf,
    kind: Kind,
    ckpt_keys: usize,
}

impl BackendJob for InspectLoad {
    type Output = anyhow::Result<String>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let report = match self.kind {
            Kind::Clip => load_clip::<B>(&self.path, &device)?.2,
            Kind::Gpt2 => load_gpt2::<B>(&self.path, &device)?.2,
            Kind::Llava => {
                let (_, config, report) = load_llava::<B>(&self.path, &device)?;
                println!(
                    "config: tower {} (select layer {}, {:?}), projector {}, LM n_embd {} x {} layers, vocab {}, max length {}",
                    config.mm_vision_tower,
                    config.mm_vision_select_layer,
                    config.mm_vision_select_feature,
                    config.mm_projector_type,
                    config.text.n_embd,
                    config.text.n_layer,
                    config.text.vocab_size,
                    config.max_length(),
                );
                report
            }
            Kind::Projector => {
                let ckpt = Checkpoint::open(&self.path)?;
                let (kind, d_in, d_out) = projector_shape(&ckpt)?;
                let projector = Projector::<B>::new(kind, d_in, d_out, &device);
                println!("projector: {kind:?}, {d_in} -> {d_out}");
                load_module(projector, &ckpt, Layout::Projector(kind.layout()), false)?.1
            }
        };
        Ok(format!(
            "{} tensors, {} parameters into {:?}; {} of {} stored tensors passed over as non-weights",
            report.loaded,
            human(report.parameters),
            self.kind,
            report.ignored.len(),
            self.ckpt_keys
        ))
    }
}

/// A projector's kind and widths read off its stored tensors.
fn projector_shape(ckpt: &Checkpoint) -> anyhow::Result<(ProjectorKind, usize, usize)> {
    let weights: Vec<(&str, Vec<usize>)> =
        ckpt.tensors.iter().filter(|(k, _)| k.ends_with("weight")).map(|(k, t)| (k.as_str(), t.shape())).collect();
    anyhow::ensure!(!weights.is_empty(), "{}: no projector weights", ckpt.describe());
    let indexed = weights.iter().any(|(k, _)| k.trim_end_matches(".weight").rsplit('.').next().is_some_and(|s| s.parse::<usize>().is_ok()));
    let mut shapes: Vec<(usize, Vec<usize>)> = weights
        .iter()
        .map(|(k, s)| {
            let idx = k.trim_end_matches(".weight").rsplit('.').next().and_then(|s| s.parse().ok()).unwrap_or(0);
            (idx, s.clone())
        })
        .collect();
    shapes.sort();
    let d_in = shapes[0].1[1];
    let d_out = shapes[0].1[0];
    let kind = if indexed { ProjectorKind::Mlp(shapes.len()) } else { ProjectorKind::Linear };
    Ok((kind, d_in, d_out))
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

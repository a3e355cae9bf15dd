//! `demo` (the README's main command), `synth` (the synthetic dataset alone) and
//! `train-tokenizer` (an llm-jp-form tokenizer for a corpus).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use burn::prelude::Backend;
use clap::Args;
use llava_jp::backend::{dispatch, dispatch_autodiff, BackendJob, BackendKind, FloatType};
use llava_jp::data::tokenizer_train::write_tokenizer;
use llava_jp::demo::eval::{evaluate, terminal_image, EvalReport};
use llava_jp::demo::synth::{self, SynthConfig};
use llava_jp::demo::{stage_config, DemoPaths, DemoPlan, MODEL_CONFIG};
use llava_jp::infer::{export, Assistant, LoadOptions};
use llava_jp::train::trainer::format_duration;
use llava_jp::train::TrainControl;

use super::train::TrainJob;

/// Marks a directory as a demo's, so that a rerun may clear it.
const MARKER: &str = "llava-jp-demo.txt";
/// The demo's tokenizer size (the model config's vocabulary holds it).
const DEMO_VOCAB: usize = 640;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where everything is written (a previous demo there is replaced).
    #[arg(long, default_value = "demo-output")]
    pub out: PathBuf,
    /// A shorter run (fewer pictures and steps), as the test runs it.
    #[arg(long)]
    pub quick: bool,
    #[arg(long, default_value = "flex")]
    pub backend: BackendKind,
    #[arg(long)]
    pub train_images: Option<usize>,
    #[arg(long)]
    pub stage1_steps: Option<u64>,
    #[arg(long)]
    pub stage2_steps: Option<u64>,
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 3000)]
    pub train_images: usize,
    #[arg(long, default_value_t = 150)]
    pub eval_images: usize,
    /// Side of the pictures in pixels (the demo model's tower takes 32).
    #[arg(long, default_value_t = 32)]
    pub image_size: u32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct TrainTokenizerArgs {
    /// Text files (one text per line) or LLaVA data files (their conversation texts are used).
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Directory for tokenizer.json, tokenizer_config.json and special_tokens_map.json.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 8000)]
    pub vocab_size: usize,
}

fn bar(label: &str, done: usize, total: usize) {
    let width = 30;
    let filled = width * done / total.max(1);
    // Redrawn when a percent is crossed, not per item.
    if done != total && (100 * done / total.max(1)) == (100 * (done - 1) / total.max(1)) {
        return;
    }
    eprint!("\r  {label} [{}{}] {done}/{total}", "#".repeat(filled), ".".repeat(width - filled));
    if done == total {
        eprintln!();
    }
}

pub fn synth(args: SynthArgs) -> anyhow::Result<()> {
    let config = SynthConfig { train_images: args.train_images, eval_images: args.eval_images, image_size: args.image_size, seed: args.seed };
    let ds = synth::write_dataset(&args.out, &config, &mut |d, t| bar("pictures", d, t))?;
    println!(
        "{} training pictures: captions {} (stage 1), conversations {} (stage 2); held out: {} ({} questions); images in {}",
        ds.train_images,
        ds.captions.display(),
        ds.conversations.display(),
        ds.eval.display(),
        ds.eval_records,
        ds.image_folder.display()
    );
    Ok(())
}

pub fn train_tokenizer(args: TrainTokenizerArgs) -> anyhow::Result<()> {
    let mut texts = Vec::new();
    for file in &args.input {
        let content = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
        for line in content.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<serde_json::Value>(line) {
                Ok(record) if record.get("conversations").is_some() => {
                    for turn in record["conversations"].as_array().into_iter().flatten() {
                        if let Some(v) = turn["value"].as_str() {
                            texts.extend(v.split("<image>").map(|s| s.trim().to_string()).filter(|s| !s.is_empty()));
                        }
                    }
                }
                _ => texts.push(line.to_string()),
            }
        }
    }
    let (file, size) = write_tokenizer(&args.out, &texts, args.vocab_size)?;
    println!("{} tokens trained on {} texts: {}", size, texts.len(), file.display());
    Ok(())
}

struct EvalJob {
    run: PathBuf,
    paths: DemoPaths,
    eval_file: PathBuf,
    image_folder: PathBuf,
}

impl BackendJob for EvalJob {
    type Output = anyhow::Result<EvalReport>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let assistant = Assistant::<B>::load(&self.run, &LoadOptions::default(), &device)?;
        let report = evaluate(&assistant, &self.eval_file, &self.image_folder, 32, &mut |d, t| bar("questions", d, t))?;
        export(&assistant, &self.paths.model, burn::tensor::DType::F32)?;
        Ok(report)
    }
}

pub fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut plan = if args.quick { DemoPlan::quick() } else { DemoPlan::full() };
    plan.train_images = args.train_images.unwrap_or(plan.train_images);
    plan.stage1_steps = args.stage1_steps.unwrap_or(plan.stage1_steps);
    plan.stage2_steps = args.stage2_steps.unwrap_or(plan.stage2_steps);
    let out = &args.out;
    prepare_out(out)?;
    let paths = DemoPaths::new(out);

    let model_config = out.join("model-config.json");
    std::fs::write(&model_config, MODEL_CONFIG)?;
    let config = llava_jp::config::LlavaConfig::from_file(&model_config)?;

    eprintln!("[1/5] synthetic Japanese visual QA data ({} training pictures, {} held out)", plan.train_images, plan.eval_images);
    // Pictures are drawn at the tower's input size, so that preprocessing does not resample them.
    let image_size = config.vision().image_size as u32;
    let synth_config = SynthConfig { train_images: plan.train_images, eval_images: plan.eval_images, image_size, seed: plan.seed };
    let ds = synth::write_dataset(&paths.data, &synth_config, &mut |d, t| bar("pictures", d, t))?;

    eprintln!("[2/5] tokenizer (Unigram, byte fallback, llm-jp's special ids)");
    let (tokenizer, size) = write_tokenizer(&paths.tokenizer, &synth::corpus(), DEMO_VOCAB)?;
    anyhow::ensure!(size <= config.text.vocab_size, "the tokenizer has {size} tokens, the model config {}", config.text.vocab_size);
    eprintln!("  {size} tokens: {}", tokenizer.display());

    let mut runs = Vec::new();
    for (stage, data, init) in [(1u8, &ds.captions, None), (2, &ds.conversations, Some(out.join("run-stage1")))] {
        let what = if stage == 1 { "captions, template plain: projector + vision tower" } else { "conversations, template v1: projector + vision tower + LLM" };
        eprintln!("[{}/5] training stage {stage} ({what})", stage + 2);
        let cfg = stage_config(out, stage, data, &ds.image_folder, &tokenizer, init.as_deref(), &plan)?;
        let run = cfg.output_dir.clone();
        let job = TrainJob { config: cfg, resume: None, control: TrainControl { progress: true, ..Default::default() } };
        let outcome = dispatch_autodiff(args.backend, 1, job).map_err(anyhow::Error::msg)??;
        let plot = run.join("loss.png");
        llava_jp::train::plot::plot_metrics(&outcome.metrics, &plot)?;
        let first = outcome.metrics.first().map_or(f64::NAN, |m| m.loss);
        let last = outcome.metrics.iter().rev().take(10).map(|m| m.loss).sum::<f64>() / outcome.metrics.len().clamp(1, 10) as f64;
        eprintln!("  loss {first:.3} -> {last:.3} in {} steps ({}); {}", outcome.state.step, format_duration(outcome.state.elapsed_s), outcome.data_report);
        runs.push((run, plot));
    }

    eprintln!("[5/5] held-out evaluation ({} questions) and export", ds.eval_records);
    let job = EvalJob { run: runs[1].0.clone(), paths: DemoPaths::new(out), eval_file: ds.eval.clone(), image_folder: ds.image_folder.clone() };
    let report = dispatch(args.backend, FloatType::F32, job).map_err(anyhow::Error::msg)??;
    write_report(&out.join("eval.jsonl"), &report)?;

    println!("\nHeld-out exact match per question type:\n{}", report.table());
    show_examples(&report)?;
    let example = report.answered.first().map(|a| a.image.display().to_string()).unwrap_or_default();
    println!(
        "Written in {}:\n  data        {} (captions, conversations, eval.jsonl, images/)\n  tokenizer   {}\n  runs        {} and {} (configs stage1.toml, stage2.toml; metrics.jsonl)\n  loss plots  {} and {}\n  answers     {}\n  model       {} (self-contained: chat, export, any backend)\n\nAsk it yourself:\n  llava-jp chat --model {} --image {example} --prompt 何色ですか？ --temperature 0\n\nDemo finished in {}.",
        out.display(),
        paths.data.display(),
        paths.tokenizer.display(),
        runs[0].0.display(),
        runs[1].0.display(),
        runs[0].1.display(),
        runs[1].1.display(),
        out.join("eval.jsonl").display(),
        paths.model.display(),
        paths.model.display(),
        format_duration(started.elapsed().as_secs_f64()),
    );
    Ok(())
}

/// Creates `out`, clearing a previous demo there; refuses a non-empty directory of anything else.
fn prepare_out(out: &Path) -> anyhow::Result<()> {
    if out.exists() {
        let empty = out.read_dir()?.next().is_none();
        anyhow::ensure!(
            empty || out.join(MARKER).is_file(),
            "{}: exists and is not a demo directory; choose another --out",
            out.display()
        );
        if !empty {
            std::fs::remove_dir_all(out).with_context(|| out.display().to_string())?;
        }
    }
    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    std::fs::write(out.join(MARKER), "written by `llava-jp demo`; the next demo run with this --out replaces it\n")?;
    Ok(())
}

fn write_report(path: &Path, report: &EvalReport) -> anyhow::Result<()> {
    let mut text = String::new();
    for a in &report.answered {
        let line = serde_json::json!({"id": a.id, "image": a.image, "type": a.kind.name(), "question": a.question,
                                      "answer": a.answer, "truth": a.truth, "correct": a.correct()});
        text.push_str(&format!("{line}\n"));
    }
    std::fs::write(path, text).with_context(|| path.display().to_string())
}

/// A few held-out pictures with question, answer and truth (drawn in the terminal when there
/// is one).
fn show_examples(report: &EvalReport) -> anyhow::Result<()> {
    let terminal = std::io::stdout().is_terminal();
    let mut shown = std::collections::BTreeSet::new();
    let mut by_image: Vec<&PathBuf> = Vec::new();
    for a in &report.answered {
        if shown.insert(&a.image) {
            by_image.push(&a.image);
        }
    }
    for image in by_image.into_iter().take(3) {
        println!("{}", image.display());
        if terminal {
            print!("{}", terminal_image(image, 24)?);
        }
        for a in report.answered.iter().filter(|a| &a.image == image) {
            println!("  {} {}  -> {}  (truth {})", if a.correct() { "✓" } else { "✗" }, a.question, a.answer, a.truth);
        }
        println!();
    }
    Ok(())
}

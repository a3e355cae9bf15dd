//! `train`: a run from a TOML config, with `--set` overrides, `--resume`, Ctrl-C saving a
//! checkpoint, a progress line, `metrics.jsonl`, and a loss / learning-rate plot at the end.

use std::path::PathBuf;

use clap::Args;
use llava_jp::backend::{dispatch_autodiff, AutodiffJob, BackendKind};
use llava_jp::train::trainer::format_duration;
use llava_jp::train::{train, TrainConfig, TrainControl, TrainOutcome};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The run's settings (see configs/stage1.toml, configs/stage2.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a setting: `--set learning_rate=1e-4 --set max_steps=100`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue a run: from the given checkpoint, or from the output directory's latest one when
    /// no path is given.
    #[arg(long, num_args = 0..=1, value_name = "CHECKPOINT")]
    pub resume: Option<Option<PathBuf>>,
    #[arg(long, default_value = "flex")]
    pub backend: BackendKind,
}

pub struct TrainJob {
    pub config: TrainConfig,
    pub resume: Option<PathBuf>,
    pub control: TrainControl,
}

impl AutodiffJob for TrainJob {
    type Output = anyhow::Result<TrainOutcome>;
    fn run<B: burn::tensor::backend::AutodiffBackend>(self, devices: Vec<B::Device>) -> Self::Output {
        train::<B>(&self.config, self.resume.as_deref(), &devices, &self.control)
    }
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let config = TrainConfig::from_file(&args.config, &args.set)?;
    let resume = args.resume.map(|p| p.unwrap_or_else(|| config.output_dir.clone()));
    let control = TrainControl { progress: true, ..Default::default() };
    let stop = control.stop.clone();
    ctrlc::set_handler(move || {
        if stop.swap(true, std::sync::atomic::Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to exit at once)");
    })?;
    let output_dir = config.output_dir.clone();
    eprintln!(
        "training stage {} on {}{} ({}), output in {}",
        config.stage,
        args.backend,
        if config.num_devices > 1 { format!(" x {} data-parallel replicas", config.num_devices) } else { String::new() },
        config.precision,
        output_dir.display()
    );
    let num_devices = config.num_devices;
    let outcome = dispatch_autodiff(args.backend, num_devices, TrainJob { config, resume, control }).map_err(anyhow::Error::msg)??;
    let plot = output_dir.join("loss.png");
    llava_jp::train::plot::plot_metrics(&outcome.metrics, &plot)?;
    let last = outcome.metrics.last();
    println!(
        "{} after {} steps ({}): loss {:.4}",
        if outcome.interrupted { "interrupted" } else { "finished" },
        outcome.state.step,
        format_duration(outcome.state.elapsed_s),
        last.map_or(f64::NAN, |m| m.loss)
    );
    println!("data: {}", outcome.data_report);
    if let Some(ckpt) = &outcome.checkpoint {
        println!("checkpoint: {}", ckpt.display());
    }
    println!("metrics: {}\nplot: {}", output_dir.join("metrics.jsonl").display(), plot.display());
    if outcome.interrupted {
        println!("resume with: --resume {}", output_dir.display());
    }
    Ok(())
}

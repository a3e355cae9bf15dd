//! `convert ...` (dataset converters) and `data check` (read a whole dataset through the loader
//! and report what would be left out, before a training run finds out).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use llava_jp::config::LlavaConfig;
use llava_jp::data::convert::{ja_vg_vqa, stair_captions, write_records, ConvertOptions, CAPTION_INSTRUCTION};
use llava_jp::data::{
    AspectMode, BadSamplePolicy, DataLoader, DataReport, ImageProcessor, LlavaDataset, LoaderConfig, SampleBuilder, Template, TextTokenizer,
};

#[derive(Subcommand)]
pub enum ConvertCommand {
    /// STAIR Captions (COCO caption JSON) to LLaVA records, one per caption (stage 1).
    StairCaptions {
        /// e.g. stair_captions_v1.2_train.json
        #[arg(long)]
        input: PathBuf,
        /// Output file: `.json` (array) or `.jsonl`.
        #[arg(long)]
        output: PathBuf,
        /// Put before each file name, e.g. `train2014/`.
        #[arg(long, default_value = "")]
        image_prefix: String,
        /// Leave out records whose image is not in this folder.
        #[arg(long)]
        check_images: Option<PathBuf>,
        #[arg(long, default_value = CAPTION_INSTRUCTION)]
        instruction: String,
    },
    /// Japanese Visual Genome VQA (`question_answers.json`) to LLaVA records (stage 2).
    JaVgVqa {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// Images are `{prefix}{image_id}.jpg`.
        #[arg(long, default_value = "VG_100K/")]
        image_prefix: String,
        #[arg(long)]
        check_images: Option<PathBuf>,
        /// Question/answer pairs of one image per record, as turns of one conversation.
        #[arg(long, default_value_t = 1)]
        qa_per_sample: usize,
    },
}

pub fn convert(command: ConvertCommand) -> anyhow::Result<()> {
    let (records, report, output) = match command {
        ConvertCommand::StairCaptions { input, output, image_prefix, check_images, instruction } => {
            let options = ConvertOptions { image_prefix, check_images_in: check_images };
            let (records, report) = stair_captions(&input, &options, &instruction)?;
            (records, report, output)
        }
        ConvertCommand::JaVgVqa { input, output, image_prefix, check_images, qa_per_sample } => {
            anyhow::ensure!(qa_per_sample >= 1, "--qa-per-sample must be at least 1");
            let options = ConvertOptions { image_prefix, check_images_in: check_images };
            let (records, report) = ja_vg_vqa(&input, &options, qa_per_sample)?;
            (records, report, output)
        }
    };
    print_rejections(&report, 20);
    write_records(&output, &records)?;
    println!("wrote {} records to {}", records.len(), output.display());
    println!("{report}");
    Ok(())
}

/// Where the data is and how samples are made: shared by `data check` and `train`.
#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// LLaVA data file (JSON array or JSON lines); repeat to concatenate several.
    #[arg(long = "data", required = true)]
    pub data: Vec<PathBuf>,
    /// Folder the records' `image` paths are relative to.
    #[arg(long, default_value = ".")]
    pub image_folder: PathBuf,
    /// `tokenizer.json`, or a folder holding it.
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Conversation template: plain (stage 1), v1 (stage 2), vicuna_v1 (English data).
    #[arg(long, default_value = "v1")]
    pub template: String,
    /// The model's config.json: image size, image tokens, max length and aspect mode come from it.
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    /// A `preprocessor_config.json` for the image size, mean and std.
    #[arg(long)]
    pub preprocessor_config: Option<PathBuf>,
    /// square or pad (default: the model config's, else square).
    #[arg(long)]
    pub image_aspect_ratio: Option<String>,
    /// Without a model config: the tower's input size...
    #[arg(long, default_value_t = 336)]
    pub image_size: usize,
    /// ...the features one image becomes...
    #[arg(long, default_value_t = 576)]
    pub image_tokens: usize,
    /// ...and the maximum sequence length after splicing.
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Cut long samples as the reference does instead of leaving them out.
    #[arg(long)]
    pub truncate_long: bool,
    /// What a bad sample does: skip (report and go on) or fail.
    #[arg(long, default_value = "skip")]
    pub bad_samples: BadSamplePolicy,
    /// Decoding threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
}

impl DataArgs {
    pub fn builder(&self) -> anyhow::Result<SampleBuilder> {
        let model = self.model_config.as_ref().map(LlavaConfig::from_file).transpose()?;
        let aspect = self
            .image_aspect_ratio
            .clone()
            .or_else(|| model.as_ref().map(|m| m.image_aspect_ratio.clone()))
            .unwrap_or_else(|| "square".into());
        let mode = AspectMode::parse(&aspect).map_err(anyhow::Error::msg)?;
        let image_processor = match (&self.preprocessor_config, &model) {
            (Some(p), _) => ImageProcessor::from_file(p, mode)?,
            (None, Some(m)) => ImageProcessor::clip(m.vision().image_size, mode),
            (None, None) => ImageProcessor::clip(self.image_size, mode),
        };
        let image_tokens = model.as_ref().map_or(self.image_tokens, |m| m.image_tokens());
        let max_length = self.max_length.or(model.as_ref().map(|m| m.max_length())).unwrap_or(1024);
        Ok(SampleBuilder {
            tokenizer: TextTokenizer::from_file(&self.tokenizer)?,
            template: Template::by_name(&self.template).map_err(anyhow::Error::msg)?,
            image_processor,
            image_folder: self.image_folder.clone(),
            max_length,
            image_tokens,
            truncate_long: self.truncate_long,
        })
    }

    pub fn dataset(&self) -> anyhow::Result<LlavaDataset> {
        let dataset = LlavaDataset::open(&self.data, self.bad_samples)?;
        print_rejections(&dataset.load_report, 20);
        anyhow::ensure!(!dataset.is_empty(), "no usable record in {:?}", self.data);
        Ok(dataset)
    }
}

pub fn print_rejections(report: &DataReport, limit: usize) {
    for r in report.rejections.iter().take(limit) {
        eprintln!("left out: {r}");
    }
    if report.rejected() > limit {
        eprintln!("... and {} more left out", report.rejected() - limit);
    }
}

/// Reads every sample once, in file order, through the loader's threads.
pub fn check(args: &DataArgs, batch_size: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let dataset = Arc::new(args.dataset()?);
    let builder = Arc::new(args.builder()?);
    let config = LoaderConfig { batch_size, shuffle: false, workers: args.workers, policy: args.bad_samples, ..Default::default() };
    let loader = DataLoader::new(dataset.clone(), builder.clone(), config);
    let mut epoch = loader.epoch(0, 0);
    let (mut tokens, mut images, mut longest, mut targets) = (0usize, 0usize, 0usize, 0usize);
    for batch in epoch.by_ref() {
        let batch = batch.context("--bad-samples fail")?;
        for r in &batch.rejections {
            eprintln!("left out: {r}");
        }
        for e in &batch.examples {
            let spliced = e.input_ids.len() + if e.pixel_values.is_some() { builder.image_tokens - 1 } else { 0 };
            tokens += spliced;
            longest = longest.max(spliced);
        }
        images += batch.images;
        targets += batch.target_tokens();
    }
    let mut report = dataset.load_report.clone();
    report.merge(&epoch.report);
    let seconds = started.elapsed().as_secs_f64();
    println!("{report}");
    println!(
        "{images} images, {tokens} tokens after splicing ({targets} trained), longest sample {longest} of at most {}; {:.1} s ({:.1} samples/s)",
        builder.max_length,
        seconds,
        report.accepted as f64 / seconds
    );
    Ok(())
}

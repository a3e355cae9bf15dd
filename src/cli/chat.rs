//! `chat` (one question, an interactive conversation, or a JSONL file of questions answered in
//! batches) and `export` (a self-contained model directory for any backend).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::prelude::Backend;
use clap::Args;
use llava_jp::backend::{dispatch, BackendJob, BackendKind, FloatType};
use llava_jp::infer::{export, Assistant, Conversation, GenerationConfig, LoadOptions, Prompt, SamplingConfig, TextStream};

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A model directory: an export, one of our checkpoints or run directories (its latest
    /// checkpoint; LoRA adapters are merged on load), or a reference LLaVA-JP checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// `tokenizer.json` (or its directory) when the model directory has none.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Conversation template: v1 (LLaVA-JP's chat), plain, vicuna_v1.
    #[arg(long)]
    pub template: Option<String>,
}

impl ModelArgs {
    pub fn options(&self) -> LoadOptions {
        LoadOptions { tokenizer: self.tokenizer.clone(), template: self.template.clone() }
    }
}

/// Generation settings; the defaults are LLaVA-JP's demo's (temperature 0.1, top-p 1,
/// 256 new tokens, no repetition penalty).
#[derive(Args, Debug, Clone)]
pub struct GenerationArgs {
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.1)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    /// Stop once the answer contains this text (repeatable); the text is cut before it.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// `graph`: on the cuda backend, a single question decodes through a CUDA graph of the
    /// project's own kernels (several times faster at batch 1); `eager`: burn's operations;
    /// `auto` (the default): `graph` on the cuda backend for a model it takes, `eager` otherwise.
    /// The graph decoder holds a second copy of the language model's weights (and, for a bf16
    /// model, of the vision tower and projector, to encode and prefill the prompt itself) and a
    /// key/value cache for every position on the GPU (about 4 GB at LLaVA-JP 1.3b's size in
    /// bf16).
    #[arg(long, default_value = "auto", value_parser = ["auto", "eager", "graph"])]
    pub decode: String,
}

impl GenerationArgs {
    pub fn config(&self) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            sampling: SamplingConfig {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                repetition_penalty: self.repetition_penalty,
            },
            stop_strings: self.stop.clone(),
            seed: self.seed,
            ..GenerationConfig::default()
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The image to talk about (JPEG or PNG).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Ask this and print the answer as it is generated; without it (and without
    /// --questions), an interactive conversation on standard input.
    #[arg(long, conflicts_with = "questions")]
    pub prompt: Option<String>,
    /// Batch mode: JSON lines `{"id": .., "image": "file.jpg", "question": ".."}` (image paths
    /// relative to the file's directory), answered `--batch-size` at a time.
    #[arg(long)]
    pub questions: Option<PathBuf>,
    /// Where batch mode writes its answers as JSON lines (standard output when absent).
    #[arg(long, requires = "questions")]
    pub output: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value = "flex")]
    pub backend: BackendKind,
    #[arg(long, default_value = "f32")]
    pub dtype: FloatType,
    #[command(flatten)]
    pub generation: GenerationArgs,
    /// Print prompt length, time to first token and decode speed to standard error.
    #[arg(long)]
    pub stats: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ExportArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The directory to write (must not exist or be empty).
    #[arg(long)]
    pub to: PathBuf,
    /// Stored dtype of the weights: f16 halves the size (wgpu computes in f32 or f16).
    #[arg(long, default_value = "f16")]
    pub dtype: FloatType,
}

pub fn chat(args: ChatArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let (backend, dtype) = (args.backend, args.dtype);
    dispatch(backend, dtype, ChatJob(args)).map_err(anyhow::Error::msg)?
}

pub fn export_model(args: ExportArgs) -> anyhow::Result<()> {
    let dtype = match args.dtype {
        FloatType::F32 => burn::tensor::DType::F32,
        FloatType::F16 => burn::tensor::DType::F16,
        FloatType::Bf16 => burn::tensor::DType::BF16,
    };
    let device = Default::default();
    let assistant = Assistant::<burn::backend::Flex>::load(&args.model.model, &args.model.options(), &device)?;
    export(&assistant, &args.to, dtype)?;
    println!("exported {} to {} ({})", args.model.model.display(), args.to.display(), args.dtype);
    Ok(())
}

/// The CUDA-graph decoder `--decode` asks for: `graph` insists (an error when the model is not
/// on the cuda backend or the decoder does not take it), `auto` takes it where it can and says
/// why not on standard error otherwise, `eager` never.
#[cfg(feature = "cuda")]
pub fn graph_decoder<B: Backend>(
    decode: &str,
    model: &llava_jp::model::LlavaModel<B>,
) -> anyhow::Result<Option<std::sync::Arc<std::sync::Mutex<llava_jp::graph_decode::GraphDecoder>>>> {
    let on_cuda = (&model.transformer.wte.weight.device() as &dyn std::any::Any).is::<burn::backend::cuda::CudaDevice>();
    match decode {
        "eager" => Ok(None),
        "auto" if !on_cuda => Ok(None),
        "auto" => match llava_jp::graph_decode::for_model(model) {
            Ok(decoder) => Ok(Some(decoder)),
            Err(e) => {
                eprintln!("decoding with burn's operations: {e}");
                Ok(None)
            }
        },
        _ => Ok(Some(llava_jp::graph_decode::for_model(model).map_err(anyhow::Error::msg)?)),
    }
}

struct ChatJob(ChatArgs);

impl BackendJob for ChatJob {
    type Output = anyhow::Result<()>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let args = self.0;
        let assistant = Assistant::<B>::load(&args.model.model, &args.model.options(), &device)?;
        #[allow(unused_mut)]
        let mut config = args.generation.config();
        #[cfg(feature = "cuda")]
        {
            config.graph_decoder = graph_decoder(&args.generation.decode, &assistant.model)?;
        }
        #[cfg(not(feature = "cuda"))]
        anyhow::ensure!(args.generation.decode != "graph", "--decode graph needs a build with the cuda feature");
        if let Some(file) = &args.questions {
            return answer_file(&assistant, file, args.output.as_deref(), args.batch_size, &config);
        }
        let mut conversation = Conversation::default();
        if let Some(path) = &args.image {
            conversation.image = Some(assistant.load_image(path)?);
        }
        match &args.prompt {
            Some(question) => {
                ask(&assistant, &mut conversation, question, &config, args.stats)?;
                Ok(())
            }
            None => interactive(&assistant, conversation, &config, args.stats),
        }
    }
}

/// Asks one question, streaming the answer to standard output; the turn joins the history.
fn ask<B: Backend>(
    assistant: &Assistant<B>,
    conversation: &mut Conversation,
    question: &str,
    config: &GenerationConfig,
    stats: bool,
) -> anyhow::Result<String> {
    let prompt = assistant.prompt(conversation, question)?;
    let mut stream = TextStream::new(&assistant.tokenizer, &config.stop_strings);
    let mut stdout = std::io::stdout();
    let mut failed = None;
    let (mut answers, timing) = assistant.answer(std::slice::from_ref(&prompt), config, &mut |_, token| {
        match stream.push(token) {
            Ok(text) => {
                let _ = write!(stdout, "{text}");
                let _ = stdout.flush();
            }
            Err(e) => failed = Some(e),
        }
    })?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    println!("{}", stream.finish()?);
    let (generated, answer) = answers.pop().expect("one answer per prompt");
    if stats {
        let decode_tokens = generated.tokens.len().saturating_sub(1);
        eprintln!(
            "[{} prompt tokens, {} new, finish: {:?}; first token {:.0} ms, decode {:.1} tokens/s]",
            generated.prompt_tokens,
            generated.tokens.len(),
            generated.finish,
            timing.time_to_first_token.as_secs_f64() * 1e3,
            decode_tokens as f64 / timing.decode.as_secs_f64().max(1e-9)
        );
    }
    conversation.history.push((question.to_string(), answer.clone()));
    Ok(answer)
}

/// Questions from standard input, one per line, about one image; the history is kept.
/// `/image PATH` starts over about another image, `/reset` forgets the history, `/quit` ends.
fn interactive<B: Backend>(
    assistant: &Assistant<B>,
    mut conversation: Conversation,
    config: &GenerationConfig,
    stats: bool,
) -> anyhow::Result<()> {
    eprintln!("Ask about the image (one question per line; /image PATH, /reset, /quit).");
    let stdin = std::io::stdin();
    loop {
        eprint!("{}> ", assistant.template.roles[0]);
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Ok(());
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/quit" | "/exit" => return Ok(()),
            "/reset" => {
                conversation.history.clear();
                continue;
            }
            _ => {}
        }
        if let Some(path) = line.strip_prefix("/image ") {
            match assistant.load_image(Path::new(path.trim())) {
                Ok(pixels) => {
                    conversation = Conversation { history: vec![], image: Some(pixels) };
                    eprintln!("(now about {})", path.trim());
                }
                Err(e) => eprintln!("error: {e:#}"),
            }
            continue;
        }
        if let Err(e) = ask(assistant, &mut conversation, line, config, stats) {
            eprintln!("error: {e:#}");
        }
    }
}

/// One line of a questions file, read or refused.
struct Question {
    line: usize,
    id: serde_json::Value,
    question: String,
    image: Option<String>,
    prompt: Result<Prompt, String>,
}

/// Batch mode: every line answered (or its error reported) in the file's order.
fn answer_file<B: Backend>(
    assistant: &Assistant<B>,
    file: &Path,
    output: Option<&Path>,
    batch_size: usize,
    config: &GenerationConfig,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut questions = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        questions.push(read_question(assistant, base, i + 1, line));
    }
    let mut out: Box<dyn Write> = match output {
        Some(path) => Box::new(std::io::BufWriter::new(std::fs::File::create(path).with_context(|| path.display().to_string())?)),
        None => Box::new(std::io::stdout()),
    };
    let mut answered = 0;
    let mut refused = 0;
    for chunk in questions.chunks(batch_size) {
        let ready: Vec<&Question> = chunk.iter().filter(|q| q.prompt.is_ok()).collect();
        let prompts: Vec<Prompt> = ready.iter().map(|q| q.prompt.clone().expect("filtered")).collect();
        let mut results = match assistant.answer(&prompts, config, &mut |_, _| {}) {
            Ok((answers, _)) => answers.into_iter().map(Ok).collect::<Vec<_>>(),
            // One bad prompt (too long, say) must not cost the others their answers.
            Err(_) => prompts
                .iter()
                .map(|p| {
                    let (mut answers, _) = assistant.answer(std::slice::from_ref(p), config, &mut |_, _| {}).map_err(|e| e.to_string())?;
                    Ok(answers.pop().expect("one answer"))
                })
                .collect(),
        }
        .into_iter();
        for q in chunk {
            let mut record = serde_json::json!({"id": q.id, "line": q.line, "question": q.question, "image": q.image});
            let result = match &q.prompt {
                Ok(_) => results.next().expect("one result per prompt"),
                Err(e) => Err(e.clone()),
            };
            match result {
                Ok((generated, answer)) => {
                    answered += 1;
                    record["answer"] = answer.into();
                    record["finish_reason"] = generated.finish.openai().into();
                    record["prompt_tokens"] = generated.prompt_tokens.into();
                    record["completion_tokens"] = generated.tokens.len().into();
                }
                Err(e) => {
                    refused += 1;
                    record["error"] = e.into();
                }
            }
            writeln!(out, "{record}")?;
        }
        out.flush()?;
    }
    eprintln!("{answered} answered, {refused} refused (see their \"error\")");
    Ok(())
}

fn read_question<B: Backend>(assistant: &Assistant<B>, base: &Path, line: usize, text: &str) -> Question {
    let mut q = Question { line, id: serde_json::Value::Null, question: String::new(), image: None, prompt: Err(String::new()) };
    let json: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            q.prompt = Err(format!("line {line}: not JSON: {e}"));
            return q;
        }
    };
    q.id = json.get("id").cloned().unwrap_or_else(|| serde_json::Value::from(line));
    let Some(question) = json.get("question").or_else(|| json.get("prompt")).and_then(|v| v.as_str()) else {
        q.prompt = Err(format!("line {line}: no \"question\" text"));
        return q;
    };
    q.question = question.to_string();
    q.image = json.get("image").and_then(|v| v.as_str()).map(str::to_string);
    let mut conversation = Conversation::default();
    if let Some(image) = &q.image {
        match assistant.load_image(&base.join(image)) {
            Ok(pixels) => conversation.image = Some(pixels),
            Err(e) => {
                q.prompt = Err(format!("line {line}: {e:#}"));
                return q;
            }
        }
    }
    q.prompt = assistant.prompt(&conversation, question).map_err(|e| format!("line {line}: {e:#}"));
    q
}

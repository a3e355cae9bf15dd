//! Autoregressive generation over a [`LlavaModel`], kept apart from the model: prompts (token ids
//! with -200 where each image goes) are spliced and left-padded into one batch, prefilled into a
//! KV cache, and decoded a token per step for every prompt at once. Each prompt keeps its own
//! positions (0 at its first real token), its own sampler and its own stopping.

use std::time::{Duration, Instant};

use burn::prelude::*;

use super::sampling::{Sampler, SamplingConfig};
use crate::data::tokenizer::TextTokenizer;
use crate::model::{LlavaModel, Sample, IMAGE_TOKEN_INDEX};

#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Generation of a prompt ends after this id (llm-jp's `<EOD|LLM-jp>`, 7).
    pub eos_token_id: Option<i64>,
    /// Generation of a prompt ends once its decoded answer contains one of these (needs a
    /// tokenizer); the answer text is cut before it.
    pub stop_strings: Vec<String>,
    /// Seed of prompt `i`'s sampler is `seed + i` unless the prompt has its own.
    pub seed: u64,
    /// Off: every step recomputes the whole sequence (a check on the cache, not a mode to use).
    pub use_cache: bool,
    /// Keep each step's logits (before the penalty and the warpers) in the output.
    pub keep_logits: bool,
    /// Set from elsewhere (a server whose client went away) to end every unfinished prompt
    /// after the current step with [`FinishReason::Cancelled`].
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// A CUDA-graph decoder built from this same model ([`crate::graph_decode`]): a single
    /// prompt with the cache on decodes through it once burn has prefilled the prompt.
    #[cfg(feature = "cuda")]
    pub graph_decoder: Option<std::sync::Arc<std::sync::Mutex<crate::graph_decode::GraphDecoder>>>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            sampling: SamplingConfig::default(),
            eos_token_id: Some(7),
            stop_strings: Vec::new(),
            seed: 0,
            use_cache: true,
            keep_logits: false,
            cancel: None,
            #[cfg(feature = "cuda")]
            graph_decoder: None,
        }
    }
}

/// One prompt: token ids (with -200 for each image) and the preprocessed images in order,
/// each `[3, S, S]` flattened.
#[derive(Debug, Clone, Default)]
pub struct Prompt {
    pub input_ids: Vec<i64>,
    pub images: Vec<Vec<f32>>,
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// The eos id was generated (it is the last token).
    Eos,
    /// A stop string appeared in the answer.
    Stop(String),
    /// `max_new_tokens` were generated.
    Length,
    /// The model's positions ran out.
    Context,
    /// [`GenerationConfig::cancel`] was set.
    Cancelled,
}

impl FinishReason {
    /// OpenAI's names: `stop` or `length`.
    pub fn openai(&self) -> &'static str {
        match self {
            Self::Eos | Self::Stop(_) | Self::Cancelled => "stop",
            Self::Length | Self::Context => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Generated {
    /// New tokens, the eos included when it ended the answer.
    pub tokens: Vec<i64>,
    pub finish: FinishReason,
    /// Per step, `[vocab]` logits, when `keep_logits`.
    pub logits: Vec<Vec<f32>>,
    /// Spliced prompt length (image features included).
    pub prompt_tokens: usize,
}

#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    /// Image encoding and prefill up to the first token's logits.
    pub time_to_first_token: Duration,
    /// The rest: every later step.
    pub decode: Duration,
    /// Tokens generated over all prompts, the first included.
    pub new_tokens: usize,
    /// Decode steps run (the batch advances together).
    pub decode_steps: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("prompt {index}: {placeholders} image placeholder(s) but {images} image(s) given")]
    ImageCount { index: usize, placeholders: usize, images: usize },
    #[error("prompt {index}: image {image} has {got} values, the vision tower takes 3x{size}x{size} = {}", 3 * size * size)]
    ImageShape { index: usize, image: usize, got: usize, size: usize },
    #[error("prompt {index} is {tokens} tokens long (image features included), longer than the model's context of {limit} (tokenizer_model_max_length / n_positions): shorten the question or the history")]
    TooLong { index: usize, tokens: usize, limit: usize },
    #[error("prompt {index} is empty")]
    Empty { index: usize },
    #[error("stop strings need a tokenizer to decode the answer")]
    StopWithoutTokenizer,
    #[error("{0}")]
    Config(String),
    #[error("graph decoding: {0}")]
    GraphDecoder(String),
    #[error(transparent)]
    Tokenizer(#[from] crate::data::tokenizer::TokenizerError),
}

/// Runs generation for `prompts` as one batch. `on_token(i, id)` is called as prompt `i`
/// receives each new token (streaming).
pub fn generate<B: Backend>(
    model: &LlavaModel<B>,
    prompts: &[Prompt],
    config: &GenerationConfig,
    tokenizer: Option<&TextTokenizer>,
    on_token: &mut dyn FnMut(usize, i64),
) -> Result<(Vec<Generated>, GenerationStats), GenerateError> {
    config.sampling.validate().map_err(GenerateError::Config)?;
    if !config.stop_strings.is_empty() && tokenizer.is_none() {
        return Err(GenerateError::StopWithoutTokenizer);
    }
    let device = model.transformer.wte.weight.device();
    let n_positions = model.transformer.wpe.weight.dims()[0];
    let image_size = model.vision_tower.image_size();
    let image_tokens = model.image_tokens();
    let limit = model.max_length.min(n_positions);
    let mut prompt_lengths = Vec::with_capacity(prompts.len());
    for (index, p) in prompts.iter().enumerate() {
        let placeholders = p.input_ids.iter().filter(|&&id| id == IMAGE_TOKEN_INDEX).count();
        if placeholders != p.images.len() {
            return Err(GenerateError::ImageCount { index, placeholders, images: p.images.len() });
        }
        for (image, px) in p.images.iter().enumerate() {
            if px.len() != 3 * image_size * image_size {
                return Err(GenerateError::ImageShape { index, image, got: px.len(), size: image_size });
            }
        }
        let tokens = p.input_ids.len() - placeholders + placeholders * image_tokens;
        if tokens == 0 {
            return Err(GenerateError::Empty { index });
        }
        if tokens > limit {
            return Err(GenerateError::TooLong { index, tokens, limit });
        }
        prompt_lengths.push(tokens);
    }
    let b = prompts.len();
    let mut out: Vec<Generated> = prompt_lengths
        .iter()
        .map(|&n| Generated { tokens: vec![], finish: FinishReason::Length, logits: vec![], prompt_tokens: n })
        .collect();
    if b == 0 || config.max_new_tokens == 0 {
        return Ok((out, GenerationStats::default()));
    }
    let mut samplers: Vec<Sampler> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Sampler::new(config.sampling.clone(), p.seed.unwrap_or(config.seed.wrapping_add(i as u64))))
        .collect();
    let mut done = vec![false; b];

    let started = Instant::now();
    let n_images = prompts.iter().map(|p| p.images.len()).sum::<usize>();
    let samples: Vec<Sample> = prompts.iter().map(|p| Sample { input_ids: p.input_ids.clone(), labels: None }).collect();

    let mut cache = config.use_cache.then(|| model.new_cache());
    #[cfg(feature = "cuda")]
    let mut graph_decoder = match (&config.graph_decoder, b, &cache) {
        (Some(decoder), 1, Some(_)) => {
            let guard = decoder.lock().unwrap_or_else(|p| p.into_inner());
            if !guard.fits(&model.transformer) {
                return Err(GenerateError::GraphDecoder(format!("the decoder was built for a model of shape {:?}, not this one", guard.shape())));
            }
            Some((guard, false))
        }
        _ => None,
    };
    // On the graph decoder, greedy steps take the arg max on the GPU.
    #[cfg(feature = "cuda")]
    let device_greedy = config.sampling.is_greedy() && config.sampling.repetition_penalty == 1.0 && !config.keep_logits;
    // The graph decoder prefills the prompt itself where it can (bf16 models), straight into
    // its cache, and encodes its images too when it holds the vision tower; burn's prefill
    // fills burn's cache otherwise, copied in before the first step.
    #[cfg(feature = "cuda")]
    let whole_prompt = graph_decoder.as_ref().is_some_and(|(decoder, _)| decoder.prefills_prompt(n_images));
    #[cfg(not(feature = "cuda"))]
    let whole_prompt = false;
    let features = (n_images > 0 && !whole_prompt).then(|| {
        let pixels: Vec<f32> = prompts.iter().flat_map(|p| p.images.iter().flatten().copied()).collect();
        let px = crate::backend::upload_pixels::<B>(pixels, n_images, image_size, &device);
        model.encode_images(px)
    });
    #[cfg(feature = "cuda")]
    let prefilled: Option<Next<B>> = match graph_decoder.as_mut() {
        Some((decoder, loaded)) if decoder.prefill_unsupported().is_none() => {
            let output = if whole_prompt {
                decoder.prefill_prompt(&prompts[0].input_ids, &prompts[0].images, device_greedy)
            } else {
                let batch = model.prepare_inputs_padded(&samples, features.clone(), true);
                let [_, t, d] = batch.inputs_embeds.dims();
                decoder.prefill(batch.inputs_embeds.reshape([t, d]), device_greedy)
            };
            *loaded = true;
            Some(match output.map_err(GenerateError::GraphDecoder)? {
                crate::graph_decode::StepOutput::Token(token) => Next::Token(token),
                crate::graph_decode::StepOutput::Logits(row) => Next::Row(row),
            })
        }
        _ => None,
    };
    #[cfg(not(feature = "cuda"))]
    let prefilled: Option<Next<B>> = None;
    let mut next: Next<B> = match prefilled {
        Some(next) => next,
        None => Next::Logits(if let Some(cache) = cache.as_mut() {
            let batch = model.prepare_inputs_padded(&samples, features.clone(), true);
            let hidden = model.transformer.forward(batch.inputs_embeds, batch.position_ids, batch.key_valid, Some(cache));
            let [_, t, d] = hidden.dims();
            model.logits(hidden.slice([0..b, t - 1..t, 0..d]))
        } else {
            last_logits_recomputed(model, &samples, features.clone())
        }),
    };
    let mut stats = GenerationStats::default();
    let mut first = true;
    let mut step = 0usize;
    loop {
        let (rows, chosen) = match next {
            Next::Logits(logits) => (rows_f32(logits), None),
            #[cfg(feature = "cuda")]
            Next::Row(row) => (vec![row], None),
            #[cfg(feature = "cuda")]
            Next::Token(token) => (vec![], Some(token)),
        };
        if first {
            stats.time_to_first_token = started.elapsed();
        }
        let mut next_ids = Vec::with_capacity(b);
        for i in 0..b {
            if done[i] {
                next_ids.push(config.eos_token_id.unwrap_or(0));
                continue;
            }
            let token = match chosen {
                Some(token) => token,
                None => {
                    let mut row = rows[i].clone();
                    if config.keep_logits {
                        out[i].logits.push(row.clone());
                    }
                    let seen: Vec<i64> = prompts[i].input_ids.iter().chain(&out[i].tokens).copied().collect();
                    samplers[i].next(&mut row, &seen)
                }
            };
            out[i].tokens.push(token);
            stats.new_tokens += 1;
            on_token(i, token);
            next_ids.push(token);
            if let Some(reason) = finished(&out[i], token, config, tokenizer, prompt_lengths[i], n_positions)? {
                out[i].finish = reason;
                done[i] = true;
            }
        }
        if !first {
            stats.decode_steps += 1;
        }
        first = false;
        step += 1;
        if config.cancel.as_ref().is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed)) {
            for (o, d) in out.iter_mut().zip(done.iter_mut()).filter(|(_, d)| !**d) {
                o.finish = FinishReason::Cancelled;
                *d = true;
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        #[cfg(feature = "cuda")]
        if let (Some((decoder, loaded)), Some(cache)) = (graph_decoder.as_mut(), cache.as_ref()) {
            if !*loaded {
                decoder.load_cache(cache).map_err(GenerateError::GraphDecoder)?;
                *loaded = true;
            }
            let position = prompt_lengths[0] + step - 1;
            next = match decoder.step(next_ids[0], position, device_greedy).map_err(GenerateError::GraphDecoder)? {
                crate::graph_decode::StepOutput::Token(token) => Next::Token(token),
                crate::graph_decode::StepOutput::Logits(row) => Next::Row(row),
            };
            continue;
        }
        next = Next::Logits(match cache.as_mut() {
            Some(cache) => {
                let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(next_ids, [b, 1]), &device);
                let embeds = model.transformer.wte.forward(ids);
                // Prompt i's new token sits right after its own real tokens.
                let positions: Vec<i64> = prompt_lengths.iter().map(|&n| (n + step - 1) as i64).collect();
                let positions = Tensor::<B, 2, Int>::from_data(TensorData::new(positions, [b, 1]), &device);
                let valid = Tensor::<B, 2, Bool>::from_data(TensorData::new(vec![true; b], [b, 1]), &device);
                model.logits(model.transformer.forward(embeds, positions, valid, Some(cache)))
            }
            None => {
                let grown: Vec<Sample> = samples
                    .iter()
                    .zip(&out)
                    .map(|(s, g)| {
                        // A finished prompt is padded with eos to keep the batch in step.
                        let mut ids = s.input_ids.clone();
                        ids.extend(&g.tokens);
                        ids.resize(s.input_ids.len() + step, config.eos_token_id.unwrap_or(0));
                        Sample { input_ids: ids, labels: None }
                    })
                    .collect();
                last_logits_recomputed(model, &grown, features.clone())
            }
        });
    }
    stats.decode = started.elapsed().saturating_sub(stats.time_to_first_token);
    Ok((out, stats))
}

/// What the next step starts from.
enum Next<B: Backend> {
    /// `[batch, 1, vocab]` logits on the model's device.
    Logits(Tensor<B, 3>),
    /// The single prompt's logits, from the graph decoder.
    #[cfg(feature = "cuda")]
    Row(Vec<f32>),
    /// The single prompt's arg max, from the graph decoder.
    #[cfg(feature = "cuda")]
    Token(i64),
}

/// Why generation of a prompt ends after `token`, if it does.
fn finished(
    g: &Generated,
    token: i64,
    config: &GenerationConfig,
    tokenizer: Option<&TextTokenizer>,
    prompt_tokens: usize,
    n_positions: usize,
) -> Result<Option<FinishReason>, GenerateError> {
    if Some(token) == config.eos_token_id {
        return Ok(Some(FinishReason::Eos));
    }
    if let (Some(tokenizer), false) = (tokenizer, config.stop_strings.is_empty()) {
        let text = tokenizer.decode(&g.tokens)?;
        if let Some(stop) = config.stop_strings.iter().find(|s| text.contains(s.as_str())) {
            return Ok(Some(FinishReason::Stop(stop.clone())));
        }
    }
    if g.tokens.len() >= config.max_new_tokens {
        return Ok(Some(FinishReason::Length));
    }
    // The token just chosen is fed back at position prompt_tokens + len - 1.
    if prompt_tokens + g.tokens.len() > n_positions {
        return Ok(Some(FinishReason::Context));
    }
    Ok(None)
}

/// Without a cache: the whole (grown) sequences run again and the last position is kept.
fn last_logits_recomputed<B: Backend>(model: &LlavaModel<B>, samples: &[Sample], features: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
    let batch = model.prepare_inputs_padded(samples, features, true);
    let hidden = model.transformer.forward(batch.inputs_embeds, batch.position_ids, batch.key_valid, None);
    let [b, t, d] = hidden.dims();
    model.logits(hidden.slice([0..b, t - 1..t, 0..d]))
}

/// `[batch, 1, vocab]` logits as one f32 row per prompt.
fn rows_f32<B: Backend>(logits: Tensor<B, 3>) -> Vec<Vec<f32>> {
    let [b, _, v] = logits.dims();
    let flat = logits.into_data().convert_dtype(burn::tensor::DType::F32).into_vec::<f32>().expect("f32 logits");
    flat.chunks(v).take(b).map(|c| c.to_vec()).collect()
}

/// The answer as LLaVA-JP's demo reads it (spec, "Generation"): prompt and answer decoded
/// together (image placeholders dropped, special tokens skipped) and what follows the last
/// `marker` (`システム: ` for the `v1` template) kept; without the marker, the new tokens alone.
/// A stop string and what follows it are cut.
pub fn answer_text(
    tokenizer: &TextTokenizer,
    prompt_ids: &[i64],
    generated: &Generated,
    marker: Option<&str>,
) -> Result<String, GenerateError> {
    let mut text = match marker {
        Some(marker) => {
            let all: Vec<i64> = prompt_ids.iter().chain(&generated.tokens).copied().collect();
            let full = tokenizer.decode(&all)?;
            match full.rfind(marker) {
                Some(at) => full[at + marker.len()..].to_string(),
                None => tokenizer.decode(&generated.tokens)?,
            }
        }
        None => tokenizer.decode(&generated.tokens)?,
    };
    if let FinishReason::Stop(stop) = &generated.finish {
        if let Some(at) = text.find(stop.as_str()) {
            text.truncate(at);
        }
    }
    Ok(text.trim().to_string())
}

/// Incremental decoding for streaming: the text of the tokens so far, released only once it is
/// final (no half of a byte-fallback character, no prefix of a stop string that may follow).
pub struct TextStream<'a> {
    tokenizer: &'a TextTokenizer,
    stop_strings: Vec<String>,
    tokens: Vec<i64>,
    emitted: String,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a TextTokenizer, stop_strings: &[String]) -> Self {
        Self { tokenizer, stop_strings: stop_strings.to_vec(), tokens: vec![], emitted: String::new() }
    }

    /// Adds a token; returns the newly final text, if any.
    pub fn push(&mut self, token: i64) -> Result<String, GenerateError> {
        self.tokens.push(token);
        let text = self.tokenizer.decode(&self.tokens)?;
        // Byte-fallback tokens of a character not yet complete decode as U+FFFD each.
        let mut end = text.trim_end_matches('\u{FFFD}').len();
        if let Some(at) = self.stop_strings.iter().filter_map(|s| text.find(s.as_str())).min() {
            end = end.min(at);
        } else {
            // Hold back a tail that could grow into a stop string.
            for stop in &self.stop_strings {
                for (k, _) in stop.char_indices().skip(1) {
                    if text[..end].ends_with(&stop[..k]) {
                        end = end.min(text[..end].len() - k);
                    }
                }
            }
        }
        Ok(self.release(&text[..end]))
    }

    /// The rest of the text once generation ended.
    pub fn finish(&mut self) -> Result<String, GenerateError> {
        let text = self.tokenizer.decode(&self.tokens)?;
        let end = self.stop_strings.iter().filter_map(|s| text.find(s.as_str())).min().unwrap_or(text.len());
        Ok(self.release(&text[..end]))
    }

    fn release(&mut self, upto: &str) -> String {
        match upto.strip_prefix(self.emitted.as_str()) {
            Some(new) if !new.is_empty() => {
                let new = new.to_string();
                self.emitted.push_str(&new);
                new
            }
            _ => String::new(),
        }
    }
}

//! The OpenAI chat-completions request as we read it, and what it becomes: a conversation
//! (history, one image, the question) and generation settings. Every way a request can be wrong
//! is an [`ApiError`] with its HTTP status and a message naming the field.

use base64::Engine;
use serde::Deserialize;

use super::Limits;
use crate::infer::{GenerationConfig, SamplingConfig};

/// An error answered as OpenAI does: `{"error": {"message", "type", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn bad(code: &'static str, message: impl Into<String>) -> Self {
        Self { status: 400, kind: "invalid_request_error", code, message: message.into() }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"error": {"message": self.message, "type": self.kind, "code": self.code}})
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Not OpenAI's; transformers' (and the chat command's).
    pub top_k: Option<usize>,
    /// Not OpenAI's; transformers' CTRL penalty (1 is none).
    pub repetition_penalty: Option<f64>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    /// Accepted and ignored (one choice, no penalties of these kinds, no user tracking).
    #[serde(default)]
    pub n: Option<u32>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Content,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub image_url: Option<ImageUrl>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ImageUrl {
    Object { url: String },
    Url(String),
}

/// What a request asks: earlier (question, answer) pairs, the image's encoded bytes, the new
/// question, and how to generate.
pub struct Ask {
    pub history: Vec<(String, String)>,
    pub image: Option<Vec<u8>>,
    pub question: String,
    pub config: GenerationConfig,
    pub stream: bool,
    pub include_usage: bool,
}

/// Parses and checks a request body against the server's model name and limits.
pub fn read_request(body: &[u8], model_name: &str, limits: &Limits) -> Result<Ask, ApiError> {
    let request: ChatRequest = serde_json::from_slice(body).map_err(|e| ApiError::bad("invalid_json", format!("request body: {e}")))?;
    if let Some(model) = &request.model {
        if model != model_name {
            return Err(ApiError {
                status: 404,
                kind: "invalid_request_error",
                code: "model_not_found",
                message: format!("model `{model}` does not exist; this server has `{model_name}`"),
            });
        }
    }
    if request.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad("invalid_n", "n: only one choice per request"));
    }

    // System messages are dropped: LLaVA-JP's template has its own system text.
    let turns: Vec<&Message> = request.messages.iter().filter(|m| m.role != "system" && m.role != "developer").collect();
    let mut texts = Vec::with_capacity(turns.len());
    let mut image = None;
    for (i, m) in turns.iter().enumerate() {
        let expected = if i % 2 == 0 { "user" } else { "assistant" };
        if m.role != expected {
            return Err(ApiError::bad(
                "invalid_messages",
                format!("messages: turn {i} (system messages left out) has role `{}`, expected `{expected}`: user and assistant alternate, starting and ending with user", m.role),
            ));
        }
        let (text, img) = read_content(&m.content, i, limits)?;
        if let Some(bytes) = img {
            if image.is_some() {
                return Err(ApiError::bad("too_many_images", "messages: LLaVA-JP talks about one image per conversation; this one has several"));
            }
            image = Some(bytes);
        }
        texts.push(text);
    }
    if texts.len() % 2 == 0 {
        return Err(ApiError::bad("invalid_messages", "messages: the last one must be the user's question"));
    }
    let question = texts.pop().expect("odd count");
    if question.trim().is_empty() {
        return Err(ApiError::bad("invalid_messages", "messages: the question is empty"));
    }
    let history = texts.chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect();

    let max_new_tokens = request.max_completion_tokens.or(request.max_tokens).unwrap_or(limits.default_max_tokens);
    if max_new_tokens == 0 || max_new_tokens > limits.max_tokens {
        return Err(ApiError::bad("invalid_max_tokens", format!("max_tokens = {max_new_tokens}: expected 1 to {}", limits.max_tokens)));
    }
    let sampling = SamplingConfig {
        temperature: request.temperature.unwrap_or(0.1),
        top_p: request.top_p.unwrap_or(1.0),
        top_k: request.top_k.unwrap_or(0),
        repetition_penalty: request.repetition_penalty.unwrap_or(1.0),
    };
    sampling.validate().map_err(|e| ApiError::bad("invalid_sampling", e))?;
    let stop_strings = match request.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop_strings.len() > 4 || stop_strings.iter().any(String::is_empty) {
        return Err(ApiError::bad("invalid_stop", "stop: up to 4 non-empty strings"));
    }
    let config = GenerationConfig { max_new_tokens, sampling, stop_strings, seed: request.seed.unwrap_or(0), ..GenerationConfig::default() };
    let include_usage = request.stream_options.as_ref().is_some_and(|o| o.include_usage);
    Ok(Ask { history, image, question, config, stream: request.stream, include_usage })
}

/// A message's text and, if it has one, its image's bytes (checked against the limits).
fn read_content(content: &Content, turn: usize, limits: &Limits) -> Result<(String, Option<Vec<u8>>), ApiError> {
    let parts = match content {
        Content::Text(t) => return Ok((t.clone(), None)),
        Content::Parts(parts) => parts,
    };
    let mut text = String::new();
    let mut image = None;
    for (j, part) in parts.iter().enumerate() {
        let at = format!("messages: turn {turn}, part {j}");
        match part.kind.as_str() {
            "text" => text.push_str(part.text.as_deref().ok_or_else(|| ApiError::bad("invalid_content", format!("{at}: a text part without `text`")))?),
            "image_url" => {
                let url = match part.image_url.as_ref() {
                    Some(ImageUrl::Object { url }) | Some(ImageUrl::Url(url)) => url,
                    None => return Err(ApiError::bad("invalid_content", format!("{at}: an image_url part without `image_url`"))),
                };
                if image.is_some() {
                    return Err(ApiError::bad("too_many_images", format!("{at}: a second image")));
                }
                image = Some(data_url_bytes(url, &at, limits)?);
            }
            other => return Err(ApiError::bad("invalid_content", format!("{at}: part type `{other}`; expected text or image_url"))),
        }
    }
    Ok((text, image))
}

/// The bytes of a `data:image/...;base64,...` URL (the server fetches nothing).
fn data_url_bytes(url: &str, at: &str, limits: &Limits) -> Result<Vec<u8>, ApiError> {
    let Some(rest) = url.strip_prefix("data:") else {
        let shown: String = url.chars().take(40).collect();
        return Err(ApiError::bad("invalid_image_url", format!("{at}: `{shown}`: only data URLs (data:image/png;base64,...) are accepted; the server fetches nothing")));
    };
    let (meta, payload) = rest.split_once(',').ok_or_else(|| ApiError::bad("invalid_image_url", format!("{at}: a data URL without a comma")))?;
    if !meta.ends_with(";base64") {
        return Err(ApiError::bad("invalid_image_url", format!("{at}: the data URL is not base64 (`{meta}`)")));
    }
    if payload.len() / 4 * 3 > limits.max_image_bytes {
        return Err(ApiError::bad("image_too_large", format!("{at}: the image is over {} bytes", limits.max_image_bytes)));
    }
    base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| ApiError::bad("invalid_image_url", format!("{at}: the data URL's base64 does not decode: {e}")))
}

/// Decodes an image after checking its declared size, so that a small file claiming a huge
/// picture is refused before any pixel is allocated.
pub fn decode_image(bytes: &[u8], limits: &Limits) -> Result<image::RgbImage, ApiError> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::bad("invalid_image", format!("image: {e}")))?;
    if reader.format().is_none() {
        return Err(ApiError::bad("invalid_image", "image: not a PNG or JPEG"));
    }
    let (w, h) = reader.into_dimensions().map_err(|e| ApiError::bad("invalid_image", format!("image: {e}")))?;
    if u64::from(w) * u64::from(h) > limits.max_image_pixels {
        return Err(ApiError::bad("image_too_large", format!("image: {w}x{h} is over {} pixels", limits.max_image_pixels)));
    }
    crate::data::ImageProcessor::decode(bytes, "image").map_err(|e| ApiError::bad("invalid_image", e.to_string()))
}

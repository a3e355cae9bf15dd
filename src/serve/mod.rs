//! `serve`: an OpenAI-compatible HTTP API (`POST /v1/chat/completions`, streamed or not,
//! `GET /v1/models`, `GET /health`) and a web page at `/` for asking about an image.
//!
//! One thread owns the model and answers requests one at a time, in arrival order, each into
//! its own channel: a request's tokens never mix with another's, and a request whose client
//! goes away (its channel closed) stops generating after the current step. The HTTP side is
//! axum on a small tokio runtime on other threads.

pub mod openai;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use burn::prelude::Backend;
use tokio::sync::mpsc;

use crate::infer::{Assistant, Conversation, TextStream};
use openai::{decode_image, read_request, ApiError, Ask};

/// What the server refuses, and the defaults it fills in.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A request body (the image's base64 included).
    pub max_body_bytes: usize,
    /// One image's encoded bytes.
    pub max_image_bytes: usize,
    /// One image's width x height, checked before decoding.
    pub max_image_pixels: u64,
    /// The most `max_tokens` a request may ask for, and what it gets when it asks nothing.
    pub max_tokens: usize,
    pub default_max_tokens: usize,
    /// Requests waiting for the model; more are refused with 503.
    pub max_queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 << 20,
            max_image_bytes: 10 << 20,
            max_image_pixels: 40_000_000,
            max_tokens: 1024,
            default_max_tokens: 256,
            max_queue: 64,
        }
    }
}

#[cfg(feature = "cuda")]
pub type GraphDecoderSlot = Option<Arc<std::sync::Mutex<crate::graph_decode::GraphDecoder>>>;
#[cfg(not(feature = "cuda"))]
pub type GraphDecoderSlot = ();

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub addr: SocketAddr,
    /// The name requests give as `model` (any other is 404) and `/v1/models` lists.
    pub model_name: String,
    /// When set, `/v1/*` wants `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    pub limits: Limits,
    /// On the cuda backend, every request decodes through this CUDA-graph decoder
    /// (`serve --decode graph`): the server answers one request at a time, at batch 1.
    #[cfg(feature = "cuda")]
    pub graph_decoder: GraphDecoderSlot,
}

/// What the model thread sends back for one request.
enum Reply {
    /// The request cannot be answered (prompt too long, bad image): sent before any text.
    Refused(ApiError),
    Text(String),
    Done { finish: &'static str, prompt_tokens: usize, completion_tokens: usize },
    Failed(String),
}

struct Job {
    ask: Ask,
    /// The request's image, decoded (and checked against the limits) on the HTTP side.
    image: Option<image::RgbImage>,
    replies: mpsc::UnboundedSender<Reply>,
}

struct Shared {
    options: ServeOptions,
    jobs: std::sync::mpsc::SyncSender<Job>,
    created: u64,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Serves `assistant` until the process ends. `on_listening` is told the bound address (port
/// 0 picks a free one) once connections are accepted.
pub fn serve<B: Backend>(assistant: Assistant<B>, options: ServeOptions, on_listening: impl FnOnce(SocketAddr) + Send + 'static) -> anyhow::Result<()> {
    #[allow(unused_mut)]
    let mut options = options;
    // The decoder stays on the model thread with the model.
    #[cfg(feature = "cuda")]
    let graph_decoder = options.graph_decoder.take();
    #[cfg(not(feature = "cuda"))]
    let graph_decoder = ();
    let (jobs, queue) = std::sync::mpsc::sync_channel::<Job>(options.limits.max_queue);
    let shared = Arc::new(Shared { options: options.clone(), jobs, created: now() });
    let http = std::thread::Builder::new().name("http".into()).spawn(move || -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(shared.options.addr).await?;
            on_listening(listener.local_addr()?);
            axum::serve(listener, router(shared)).await?;
            Ok(())
        })
    })?;
    // The model stays on this thread: backends need not move tensors across threads.
    for job in queue {
        answer(&assistant, job, &graph_decoder);
    }
    http.join().map_err(|_| anyhow::anyhow!("the HTTP thread panicked"))?
}

fn router(shared: Arc<Shared>) -> Router {
    let limit = shared.options.limits.max_body_bytes;
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/health", get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(shared)
}

const PAGE: &str = include_str!("page.html");

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    (status, axum::Json(e.json())).into_response()
}

fn authorised(shared: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &shared.options.api_key else { return Ok(()) };
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError { status: 401, kind: "invalid_request_error", code: "invalid_api_key", message: "missing or wrong API key (Authorization: Bearer ...)".into() })
    }
}

async fn models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorised(&shared, &headers) {
        return error_response(&e);
    }
    let model = serde_json::json!({"id": shared.options.model_name, "object": "model", "created": shared.created, "owned_by": "llava-jp"});
    axum::Json(serde_json::json!({"object": "list", "data": [model]})).into_response()
}

async fn chat_completions(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(e) = authorised(&shared, &headers) {
        return error_response(&e);
    }
    let is_json = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_none_or(|v| v.starts_with("application/json"));
    if !is_json {
        return error_response(&ApiError { status: 415, kind: "invalid_request_error", code: "unsupported_media_type", message: "Content-Type must be application/json".into() });
    }
    let mut ask = match read_request(&body, &shared.options.model_name, &shared.options.limits) {
        Ok(ask) => ask,
        Err(e) => return error_response(&e),
    };
    let image = match ask.image.take() {
        Some(bytes) => {
            let limits = shared.options.limits.clone();
            match tokio::task::spawn_blocking(move || decode_image(&bytes, &limits)).await {
                Ok(Ok(img)) => Some(img),
                Ok(Err(e)) => return error_response(&e),
                Err(e) => return error_response(&ApiError { status: 500, kind: "server_error", code: "decode_failed", message: e.to_string() }),
            }
        }
        None => None,
    };
    let (stream, include_usage) = (ask.stream, ask.include_usage);
    let (replies, mut rx) = mpsc::unbounded_channel();
    match shared.jobs.try_send(Job { ask, image, replies }) {
        Ok(()) => {}
        Err(std::sync::mpsc::TrySendError::Full(_)) => {
            return error_response(&ApiError { status: 503, kind: "server_error", code: "queue_full", message: "too many requests waiting; try again".into() })
        }
        Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
            return error_response(&ApiError { status: 500, kind: "server_error", code: "model_stopped", message: "the model thread has stopped".into() })
        }
    }
    let id = format!("chatcmpl-{:x}{:08x}", now(), rand::random::<u32>());
    let (model, created) = (shared.options.model_name.clone(), now());

    // Nothing is sent before the model has taken the request: a refusal is still a 4xx.
    let first = rx.recv().await;
    if let Some(Reply::Refused(e)) = &first {
        return error_response(e);
    }
    if !stream {
        let mut text = String::new();
        let mut reply = first;
        loop {
            match reply {
                Some(Reply::Text(t)) => text.push_str(&t),
                Some(Reply::Done { finish, prompt_tokens, completion_tokens }) => {
                    return axum::Json(serde_json::json!({
                        "id": id, "object": "chat.completion", "created": created, "model": model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
                        "usage": usage(prompt_tokens, completion_tokens),
                    }))
                    .into_response();
                }
                Some(Reply::Failed(m)) => return error_response(&ApiError { status: 500, kind: "server_error", code: "generation_failed", message: m }),
                Some(Reply::Refused(e)) => return error_response(&e),
                None => return error_response(&ApiError { status: 500, kind: "server_error", code: "model_stopped", message: "no answer".into() }),
            }
            reply = rx.recv().await;
        }
    }

    let chunk = move |delta: serde_json::Value, finish: Option<&str>| {
        serde_json::json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let opening = chunk(serde_json::json!({"role": "assistant", "content": ""}), None);
    let state = (Some(first), rx, false);
    let events = futures_util::stream::unfold(state, move |(pending, mut rx, ended)| {
        let chunk = chunk.clone();
        async move {
            if ended {
                return None;
            }
            let reply = match pending {
                Some(r) => r,
                None => rx.recv().await,
            };
            let (events, ended) = match reply {
                Some(Reply::Text(t)) => (vec![chunk(serde_json::json!({"content": t}), None)], false),
                Some(Reply::Done { finish, prompt_tokens, completion_tokens }) => {
                    let mut last = chunk(serde_json::json!({}), Some(finish));
                    if include_usage {
                        last["usage"] = usage(prompt_tokens, completion_tokens);
                    }
                    (vec![last], true)
                }
                Some(Reply::Failed(m)) | Some(Reply::Refused(ApiError { message: m, .. })) => {
                    (vec![serde_json::json!({"error": {"message": m, "type": "server_error"}})], true)
                }
                None => return None,
            };
            let mut out: Vec<Result<Event, std::convert::Infallible>> = events.into_iter().map(|e| Ok(Event::default().data(e.to_string()))).collect();
            if ended {
                out.push(Ok(Event::default().data("[DONE]")));
            }
            Some((futures_util::stream::iter(out), (None, rx, ended)))
        }
    });
    let opening = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(Event::default().data(opening.to_string())) });
    use futures_util::StreamExt;
    Sse::new(opening.chain(events.flatten())).into_response()
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> serde_json::Value {
    serde_json::json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens})
}

/// Runs one request on the model thread, replying as text is released.
fn answer<B: Backend>(assistant: &Assistant<B>, job: Job, graph_decoder: &GraphDecoderSlot) {
    let Job { ask, image, replies } = job;
    if replies.is_closed() {
        return;
    }
    let refuse = |e: ApiError| {
        let _ = replies.send(Reply::Refused(e));
    };
    let image = image.map(|img| assistant.image_processor.preprocess(&img));
    let conversation = Conversation { history: ask.history, image };
    let prompt = match assistant.prompt(&conversation, &ask.question) {
        Ok(p) => p,
        Err(e) => return refuse(ApiError::bad("invalid_prompt", e.to_string())),
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let config = crate::infer::GenerationConfig {
        cancel: Some(cancel.clone()),
        #[cfg(feature = "cuda")]
        graph_decoder: graph_decoder.clone(),
        ..ask.config
    };
    #[cfg(not(feature = "cuda"))]
    let _ = graph_decoder;
    let mut stream = TextStream::new(&assistant.tokenizer, &config.stop_strings);
    let mut stream_error = None;
    let result = assistant.answer(std::slice::from_ref(&prompt), &config, &mut |_, token| match stream.push(token) {
        Ok(text) => {
            if replies.is_closed() || (!text.is_empty() && replies.send(Reply::Text(text)).is_err()) {
                cancel.store(true, Ordering::Relaxed);
            }
        }
        Err(e) => stream_error = Some(e.to_string()),
    });
    match result {
        Ok((mut answers, _)) => {
            let (generated, _) = answers.pop().expect("one answer per prompt");
            match stream.finish() {
                Ok(tail) if !tail.is_empty() => {
                    let _ = replies.send(Reply::Text(tail));
                }
                Ok(_) => {}
                Err(e) => stream_error = Some(e.to_string()),
            }
            if let Some(e) = stream_error {
                let _ = replies.send(Reply::Failed(e));
                return;
            }
            let _ = replies.send(Reply::Done {
                finish: generated.finish.openai(),
                prompt_tokens: generated.prompt_tokens,
                completion_tokens: generated.tokens.len(),
            });
        }
        // Generation checks the prompt's length against the model's positions first.
        Err(e) => refuse(ApiError::bad("invalid_prompt", e.to_string())),
    }
}

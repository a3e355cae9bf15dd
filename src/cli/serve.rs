//! `serve`: the OpenAI-compatible HTTP API and the web page, on any backend.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};

use burn::prelude::Backend;
use clap::Args;
use llava_jp::backend::{dispatch, BackendJob, BackendKind, FloatType};
use llava_jp::infer::Assistant;
use llava_jp::serve::{serve, Limits, ServeOptions};

use super::chat::ModelArgs;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on; 127.0.0.1 keeps it to this machine (0.0.0.0 opens it to the network).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// The model's name in requests and /v1/models (default: the model directory's name).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Require `Authorization: Bearer <key>` on /v1/* (also read from LLAVA_JP_API_KEY).
    #[arg(long, env = "LLAVA_JP_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[arg(long, default_value = "flex")]
    pub backend: BackendKind,
    #[arg(long, default_value = "f32")]
    pub dtype: FloatType,
    /// Largest request body in MiB (the image's base64 included).
    #[arg(long, default_value_t = 16)]
    pub max_body_mib: usize,
    /// Largest image, in megapixels (width x height, checked before decoding).
    #[arg(long, default_value_t = 40.0)]
    pub max_image_megapixels: f64,
    /// Most new tokens a request may ask for.
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    /// Requests that may wait for the model; more get 503.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// `graph`: on the cuda backend, requests decode through a CUDA graph of the project's own
    /// kernels (several times faster; requests are answered one at a time, at batch 1 anyway);
    /// `eager`: burn's operations; `auto` (the default): `graph` on the cuda backend where it
    /// takes the model (which costs a second copy of the language model's weights, for bf16
    /// the vision tower's and projector's too, and a full-length key/value cache on the GPU:
    /// about 4 GB at LLaVA-JP 1.3b's size).
    #[arg(long, default_value = "auto", value_parser = ["auto", "eager", "graph"])]
    pub decode: String,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.max_queue > 0 && args.max_tokens > 0, "--max-queue and --max-tokens must be at least 1");
    let (backend, dtype) = (args.backend, args.dtype);
    dispatch(backend, dtype, ServeJob(args)).map_err(anyhow::Error::msg)?
}

struct ServeJob(ServeArgs);

impl BackendJob for ServeJob {
    type Output = anyhow::Result<()>;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let args = self.0;
        let assistant = Assistant::<B>::load(&args.model.model, &args.model.options(), &device)?;
        let name = args.model_name.clone().unwrap_or_else(|| {
            let dir = std::fs::canonicalize(&args.model.model).unwrap_or_else(|_| args.model.model.clone());
            dir.file_name().map_or_else(|| "llava-jp".to_string(), |n| n.to_string_lossy().into_owned())
        });
        let limits = Limits {
            max_body_bytes: args.max_body_mib << 20,
            max_image_bytes: (args.max_body_mib << 20) * 3 / 4,
            max_image_pixels: (args.max_image_megapixels * 1e6) as u64,
            max_tokens: args.max_tokens,
            default_max_tokens: 256.min(args.max_tokens),
            max_queue: args.max_queue,
        };
        let options = ServeOptions {
            addr: SocketAddr::new(args.host, args.port),
            model_name: name.clone(),
            api_key: args.api_key.clone(),
            limits,
            #[cfg(feature = "cuda")]
            graph_decoder: super::chat::graph_decoder(&args.decode, &assistant.model)?,
        };
        #[cfg(not(feature = "cuda"))]
        anyhow::ensure!(args.decode != "graph", "--decode graph needs a build with the cuda feature");
        serve(assistant, options, move |addr| {
            println!("serving {name} on http://{addr} (web page at /, API at /v1/chat/completions)");
            let _ = std::io::stdout().flush();
        })
    }
}

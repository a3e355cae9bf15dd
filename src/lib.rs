//! LLaVA-JP on burn: a CLIP vision tower, an MLP projector and a GPT-2 language model
//! (llm-jp-1.3b), generic over burn backends, importing Hugging Face checkpoints and matching
//! transformers' numbers.

pub mod backend;
#[cfg(feature = "cuda")]
pub mod cublaslt;
#[cfg(feature = "cuda")]
pub mod cuda_kernel;
#[cfg(feature = "cuda")]
pub mod cupti;
pub mod config;
pub mod data;
pub mod demo;
#[cfg(feature = "cuda")]
pub mod flash;
#[cfg(feature = "cuda")]
pub mod fused_ops;
#[cfg(feature = "cuda")]
pub mod fused_optim;
#[cfg(feature = "cuda")]
pub mod graph_decode;
pub mod infer;
#[cfg(feature = "cuda")]
pub mod linear_cross_entropy;
pub mod model;
pub mod parity;
pub mod serve;
pub mod train;
pub mod weights;

pub use llava_jp_import as import;

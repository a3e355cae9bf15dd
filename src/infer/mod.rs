//! Inference: generation with a KV cache ([`generate`]), token choice ([`sampling`]), and model
//! directories made ready to answer and exported for every backend ([`assistant`]).

pub mod assistant;
pub mod generate;
pub mod sampling;

pub use assistant::{export, Assistant, Conversation, LoadOptions};
pub use generate::{generate, FinishReason, Generated, GenerationConfig, GenerationStats, Prompt, TextStream};
pub use sampling::SamplingConfig;

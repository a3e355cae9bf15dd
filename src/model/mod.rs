pub mod clip;
pub mod gpt2;
pub mod llava;
pub mod nn;
pub mod projector;
pub mod rows;

pub use clip::ClipVisionModel;
pub use gpt2::{Gpt2LmHeadModel, Gpt2Model, KvCache};
pub use llava::{LlavaModel, LlavaOutput, MultimodalBatch, Sample, IGNORE_INDEX, IMAGE_TOKEN_INDEX};
pub use projector::{Projector, ProjectorKind};

//! Reading Hugging Face checkpoints (`pytorch_model.bin`, `model.safetensors`, sharded
//! `*.index.json`, a projector-only `mm_projector.bin`) and mapping their tensor names onto the
//! module paths of llava-jp's burn modules.
//!
//! The model crate's module tree mirrors the checkpoint names and keeps every weight in the
//! layout the checkpoint stores it (`[out, in]` for `nn.Linear`, `[in, out]` for GPT-2's
//! `Conv1D`), so importing is a table of prefixes ([`names`]) and a dtype cast ([`load`]).

pub mod checkpoint;
pub mod error;
pub mod load;
pub mod names;

pub use checkpoint::{Checkpoint, StoredTensor};
pub use error::ImportError;
pub use load::{load_module, LoadReport};
pub use names::{Layout, ProjectorLayout};

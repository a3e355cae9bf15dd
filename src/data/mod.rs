//! Turning LLaVA data into what the model eats, token for token as the reference does:
//! the tokenizer with image placeholders, conversation templates, label masking, image
//! preprocessing, data files, and the loader that batches them on worker threads.

pub mod ahead;
pub mod convert;
pub mod conversation;
pub mod dataset;
pub mod image;
pub mod loader;
pub mod preprocess;
pub mod tokenizer;
pub mod tokenizer_train;

pub use ahead::ReadAhead;
pub use conversation::{SeparatorStyle, Template};
pub use dataset::{BadSamplePolicy, DataReport, Example, LlavaDataset, Problem, Record, Rejection, SampleBuilder};
pub use image::{AspectMode, ImageProcessor};
pub use loader::{epoch_order, Batch, DataLoader, EpochIter, LoaderConfig, PaddedBatch, Prefetched};
pub use preprocess::{generation_prompt, preprocess, Encoded, PreprocessError, Turn};
pub use tokenizer::TextTokenizer;

//! Turning LLaVA data into what the model eats, token for token as the reference does:
//! the tokenizer with image placeholders, conversation templates, and label masking.

pub mod conversation;
pub mod image;
pub mod preprocess;
pub mod tokenizer;

pub use conversation::{SeparatorStyle, Template};
pub use image::{AspectMode, ImageProcessor};
pub use preprocess::{generation_prompt, preprocess, Encoded, PreprocessError, Turn};
pub use tokenizer::TextTokenizer;

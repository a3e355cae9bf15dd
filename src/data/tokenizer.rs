//! The text tokenizer: any Hugging Face `tokenizer.json` (llm-jp v2.1's is Unigram with byte
//! fallback and a post-processor that appends `<EOD|LLM-jp>`), with the reference's handling of
//! `<image>` placeholders.

use std::path::{Path, PathBuf};

use crate::model::IMAGE_TOKEN_INDEX;

pub const IMAGE_PLACEHOLDER: &str = "<image>";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: cannot load tokenizer: {message}")]
    Load { path: PathBuf, message: String },
    #[error("cannot encode {text:?}: {message}")]
    Encode { text: String, message: String },
}

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// `bos_token` of `tokenizer_config.json`, when it names a token of the vocabulary.
    pub bos_id: Option<i64>,
    pub eos_id: Option<i64>,
}

impl TextTokenizer {
    /// Loads `tokenizer.json` (a file, or a directory holding it) and the bos/eos names of the
    /// `tokenizer_config.json` / `special_tokens_map.json` beside it.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
        let inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| TokenizerError::Load { path: file.clone(), message: e.to_string() })?;
        let dir = file.parent().unwrap_or(Path::new("."));
        let named = |key: &str| -> Option<i64> {
            ["tokenizer_config.json", "special_tokens_map.json"].iter().find_map(|f| {
                let text = std::fs::read_to_string(dir.join(f)).ok()?;
                let json: serde_json::Value = serde_json::from_str(&text).ok()?;
                let token = match json.get(key)? {
                    serde_json::Value::String(s) => s.clone(),
                    v => v.get("content")?.as_str()?.to_string(),
                };
                inner.token_to_id(&token).map(i64::from)
            })
        };
        let (bos_id, eos_id) = (named("bos_token"), named("eos_token"));
        Ok(Self { inner, bos_id, eos_id })
    }

    /// How many tokens the post-processor appends after a text (llm-jp: 1, its `<EOD|LLM-jp>`).
    pub fn trailing_special_tokens(&self) -> Result<usize, TokenizerError> {
        let empty = self.encode("")?;
        Ok(empty.len() - usize::from(empty.first().is_some_and(|&id| Some(id) == self.bos_id)))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    /// The piece an id stands for.
    pub fn id_to_token(&self, id: i64) -> Option<String> {
        u32::try_from(id).ok().and_then(|id| self.inner.id_to_token(id))
    }

    /// `tokenizer(text).input_ids`: the post-processor's special tokens included.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| TokenizerError::Encode { text: text.to_string(), message: e.to_string() })?;
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    /// The reference's `tokenizer_image_token`: the text is split at each `<image>`, every chunk
    /// encoded on its own (so each keeps its post-processor tokens), and -200 put between the
    /// chunks. A leading bos, if the tokenizer adds one, is kept once.
    pub fn encode_with_images(&self, prompt: &str) -> Result<Vec<i64>, TokenizerError> {
        let chunks = prompt.split(IMAGE_PLACEHOLDER).map(|c| self.encode(c)).collect::<Result<Vec<_>, _>>()?;
        let offset = usize::from(chunks.first().and_then(|c| c.first()).is_some_and(|&id| Some(id) == self.bos_id));
        let mut ids = Vec::new();
        if offset == 1 {
            ids.push(chunks[0][0]);
        }
        for (i, chunk) in chunks.iter().enumerate() {
            if i > 0 {
                ids.push(IMAGE_TOKEN_INDEX);
            }
            ids.extend_from_slice(&chunk[offset.min(chunk.len())..]);
        }
        Ok(ids)
    }

    /// Text of `ids`, special tokens and image placeholders skipped.
    pub fn decode(&self, ids: &[i64]) -> Result<String, TokenizerError> {
        let ids: Vec<u32> = ids.iter().filter(|&&id| id >= 0).map(|&id| id as u32).collect();
        self.inner
            .decode(&ids, true)
            .map_err(|e| TokenizerError::Encode { text: format!("{ids:?}"), message: e.to_string() })
    }
}

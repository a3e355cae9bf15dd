//! LLaVA data files: a JSON array or JSON lines of `{"id", "image", "conversations"}`, with image
//! paths relative to an image folder. The text of every record is read up front (it is small and
//! length grouping needs it); tokenizing, decoding and preprocessing happen per sample, when the
//! loader asks for it, as the reference's `LazySupervisedDataset` does.
//!
//! A bad record or sample never stops a run by itself: it becomes a [`Rejection`] naming the
//! sample and the reason, and the [`BadSamplePolicy`] decides whether it is skipped or fatal.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::conversation::Template;
use super::image::ImageProcessor;
use super::preprocess::{preprocess, PreprocessError, Turn};
use super::tokenizer::{TextTokenizer, IMAGE_PLACEHOLDER};
use crate::model::{IGNORE_INDEX, IMAGE_TOKEN_INDEX};

/// One record of a data file, as read (nothing tokenized or decoded yet).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    pub conversations: Vec<Turn>,
}

/// Where a record came from, for messages: the file and the 1-based line (JSON lines) or the
/// 0-based index in the array (JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub index: Option<usize>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.index) {
            (Some(line), _) => write!(f, "{}:{line}", self.file.display()),
            (None, Some(index)) => write!(f, "{}[{index}]", self.file.display()),
            (None, None) => write!(f, "{}", self.file.display()),
        }
    }
}

/// Why a sample cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Problem {
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("malformed record: {0}")]
    MalformedRecord(String),
    #[error("image file not found: {0}")]
    MissingImage(PathBuf),
    #[error("{0}")]
    UnreadableImage(String),
    #[error("the sample has an image but no `<image>` in its first turn")]
    NoImagePlaceholder,
    #[error("{0} `<image>` placeholders: one image per sample is supported")]
    SeveralImagePlaceholders(usize),
    #[error("`<image>` in the text but no `image` file named")]
    PlaceholderWithoutImage,
    #[error("the conversation is empty")]
    EmptyConversation,
    #[error("malformed conversation: {0}")]
    MalformedConversation(String),
    #[error("{length} tokens after splicing the image in, more than the maximum length {max_length}")]
    TooLong { length: usize, max_length: usize },
    #[error("tokenization mismatch: the label masking walked {masked} tokens but the sample has {actual}")]
    TokenizationMismatch { masked: usize, actual: usize },
    #[error("no token is trained (every label is -100)")]
    NoTargets,
    #[error("preparing the sample panicked: {0}")]
    Panicked(String),
}

impl Problem {
    /// A short stable name, for counting and for filtering reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Problem::MalformedJson(_) => "malformed-json",
            Problem::MalformedRecord(_) => "malformed-record",
            Problem::MissingImage(_) => "missing-image",
            Problem::UnreadableImage(_) => "unreadable-image",
            Problem::NoImagePlaceholder => "no-image-placeholder",
            Problem::SeveralImagePlaceholders(_) => "several-image-placeholders",
            Problem::PlaceholderWithoutImage => "placeholder-without-image",
            Problem::EmptyConversation => "empty-conversation",
            Problem::MalformedConversation(_) => "malformed-conversation",
            Problem::TooLong { .. } => "too-long",
            Problem::TokenizationMismatch { .. } => "tokenization-mismatch",
            Problem::NoTargets => "no-targets",
            Problem::Panicked(_) => "panicked",
        }
    }
}

impl From<PreprocessError> for Problem {
    fn from(e: PreprocessError) -> Self {
        match e {
            PreprocessError::Empty => Problem::EmptyConversation,
            PreprocessError::NoImagePlaceholder => Problem::NoImagePlaceholder,
            PreprocessError::SeveralImages(n) => Problem::SeveralImagePlaceholders(n),
            PreprocessError::Mismatch { masked, actual } => Problem::TokenizationMismatch { masked, actual },
            e @ (PreprocessError::UnknownSpeaker { .. }
            | PreprocessError::OutOfOrder { .. }
            | PreprocessError::PlainNeedsTwoTurns(_)
            | PreprocessError::Tokenizer(_)) => Problem::MalformedConversation(e.to_string()),
        }
    }
}

/// A sample left out, with what identifies it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("sample {id} ({origin}): {problem}")]
pub struct Rejection {
    /// The record's `id`, or `?` when it has none (then `origin` says where it is).
    pub id: String,
    pub origin: Origin,
    pub problem: Problem,
}

/// What to do with a bad sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BadSamplePolicy {
    /// Report it, count it, go on with the next sample.
    #[default]
    Skip,
    /// Stop with an error naming the sample.
    Fail,
}

impl std::str::FromStr for BadSamplePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "skip" => Ok(Self::Skip),
            "fail" => Ok(Self::Fail),
            _ => Err(format!("unknown bad-sample policy `{s}`: expected skip or fail")),
        }
    }
}

/// Counts of what was used and what was left out, and the first rejections in full.
#[derive(Debug, Clone, Default)]
pub struct DataReport {
    pub accepted: usize,
    pub counts: BTreeMap<&'static str, usize>,
    pub rejections: Vec<Rejection>,
}

impl DataReport {
    /// Rejections kept in full; beyond this only counts grow.
    pub const KEPT: usize = 1000;

    pub fn reject(&mut self, rejection: Rejection) {
        *self.counts.entry(rejection.problem.kind()).or_default() += 1;
        if self.rejections.len() < Self::KEPT {
            self.rejections.push(rejection);
        }
    }

    pub fn rejected(&self) -> usize {
        self.counts.values().sum()
    }

    /// Takes back `rejections`, the last ones [`Self::reject`] was given (kept in full while
    /// there was room, so the kept ones stay the first [`Self::KEPT`] of the rest).
    pub fn forget_last(&mut self, rejections: &[Rejection]) {
        for rejection in rejections {
            let count = self.counts.get_mut(rejection.problem.kind()).expect("a rejection counted before");
            *count -= 1;
            if *count == 0 {
                self.counts.remove(rejection.problem.kind());
            }
        }
        self.rejections.truncate(self.rejected().min(Self::KEPT));
    }

    pub fn merge(&mut self, other: &DataReport) {
        self.accepted += other.accepted;
        for (kind, n) in &other.counts {
            *self.counts.entry(kind).or_default() += n;
        }
        let room = Self::KEPT.saturating_sub(self.rejections.len());
        self.rejections.extend(other.rejections.iter().take(room).cloned());
    }
}

impl fmt::Display for DataReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} samples used, {} left out", self.accepted, self.rejected())?;
        for (kind, n) in &self.counts {
            write!(f, "\n  {kind}: {n}")?;
        }
        Ok(())
    }
}

/// The records of one or more data files.
#[derive(Debug, Clone, Default)]
pub struct LlavaDataset {
    pub records: Vec<Record>,
    pub origins: Vec<Origin>,
    /// Records that could not be read (malformed JSON lines, wrong field types).
    pub load_report: DataReport,
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error(transparent)]
    Rejected(#[from] Rejection),
}

impl LlavaDataset {
    /// Reads `files` in order. JSON lines (`.jsonl`, or any file not starting with `[`) are read
    /// line by line, a malformed line becoming a rejection; a JSON array must parse as a whole.
    pub fn open(files: &[PathBuf], policy: BadSamplePolicy) -> Result<Self, DatasetError> {
        let mut out = Self::default();
        for file in files {
            out.read_file(file, policy)?;
        }
        Ok(out)
    }

    fn read_file(&mut self, path: &Path, policy: BadSamplePolicy) -> Result<(), DatasetError> {
        let err = |message: String| DatasetError::Read { path: path.to_path_buf(), message };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let is_array = path.extension().is_none_or(|e| e != "jsonl") && text.trim_start().starts_with('[');
        let add = |value: Result<Value, String>, origin: Origin, this: &mut Self| -> Result<(), DatasetError> {
            let record = value.map_err(Problem::MalformedJson).and_then(|v| record_from_json(&v, &origin));
            match record {
                Ok(r) => {
                    this.records.push(r);
                    this.origins.push(origin);
                }
                Err(problem) => {
                    let rejection = Rejection { id: "?".into(), origin, problem };
                    if policy == BadSamplePolicy::Fail {
                        return Err(rejection.into());
                    }
                    this.load_report.reject(rejection);
                }
            }
            Ok(())
        };
        if is_array {
            let items: Vec<Value> = serde_json::from_str(&text).map_err(|e| err(format!("not a JSON array of records: {e}")))?;
            for (index, item) in items.into_iter().enumerate() {
                add(Ok(item), Origin { file: path.to_path_buf(), line: None, index: Some(index) }, self)?;
            }
        } else {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let value = serde_json::from_str::<Value>(line).map_err(|e| e.to_string());
                add(value, Origin { file: path.to_path_buf(), line: Some(i + 1), index: None }, self)?;
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// A cheap length estimate for grouping batches: characters of the text, plus the image's
    /// tokens. (The reference counts whitespace-separated words, which says little for Japanese.)
    pub fn length_estimate(&self, index: usize, image_tokens: usize) -> usize {
        let r = &self.records[index];
        r.conversations.iter().map(|t| t.value.chars().count()).sum::<usize>()
            + if r.image.is_some() { image_tokens } else { 0 }
    }

    pub fn has_image(&self, index: usize) -> bool {
        self.records[index].image.is_some()
    }
}

/// A record from JSON, with a reason naming the field when it is not one.
fn record_from_json(value: &Value, origin: &Origin) -> Result<Record, Problem> {
    let bad = |m: String| Problem::MalformedRecord(m);
    let obj = value.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
    let id = match obj.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        None | Some(Value::Null) => origin.to_string(),
        Some(other) => return Err(bad(format!("`id` is {other}, expected a string or a number"))),
    };
    let image = match obj.get("image") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => return Err(bad(format!("sample {id}: `image` is empty"))),
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => return Err(bad(format!("sample {id}: `image` is {other}, expected one path"))),
    };
    let turns = match obj.get("conversations") {
        Some(Value::Array(turns)) => turns,
        None => return Err(bad(format!("sample {id}: no `conversations`"))),
        Some(other) => return Err(bad(format!("sample {id}: `conversations` is {other}, expected a list"))),
    };
    let mut conversations = Vec::with_capacity(turns.len());
    for (i, turn) in turns.iter().enumerate() {
        let field = |key: &str| -> Result<String, Problem> {
            match turn.get(key) {
                Some(Value::String(s)) => Ok(s.clone()),
                _ => Err(bad(format!("sample {id}: conversations[{i}].{key} is missing or not a string"))),
            }
        };
        conversations.push(Turn { from: field("from")?, value: field("value")? });
    }
    Ok(Record { id, image, conversations })
}

/// One sample ready for collation.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Position of the record in the dataset.
    pub index: usize,
    pub id: String,
    /// Token ids with -200 where the image goes.
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    /// `[3, size, size]` normalised pixels, when the sample has an image.
    pub pixel_values: Option<Vec<f32>>,
}

/// Everything that turns a record into an [`Example`].
pub struct SampleBuilder {
    pub tokenizer: TextTokenizer,
    pub template: Template,
    pub image_processor: ImageProcessor,
    pub image_folder: PathBuf,
    /// `tokenizer_model_max_length`.
    pub max_length: usize,
    /// Features one image becomes (576 for ViT-L/14-336 patches).
    pub image_tokens: usize,
    /// Cut samples longer than `max_length` as the reference does, instead of rejecting them.
    pub truncate_long: bool,
}

impl SampleBuilder {
    pub fn image_path(&self, image: &str) -> PathBuf {
        self.image_folder.join(image)
    }

    /// The rejection for a sample whose preparation panicked (a decoder bug on a strange file).
    pub fn panicked(&self, dataset: &LlavaDataset, index: usize, panic: &(dyn std::any::Any + Send)) -> Rejection {
        let message = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into());
        Rejection { id: dataset.records[index].id.clone(), origin: dataset.origins[index].clone(), problem: Problem::Panicked(message) }
    }

    /// Tokenizes, masks, checks and (when there is one) decodes and preprocesses the image of
    /// record `index`. Text is checked before the image is decoded, so a bad text costs no decode.
    pub fn build(&self, dataset: &LlavaDataset, index: usize) -> Result<Example, Rejection> {
        let record = &dataset.records[index];
        let reject = |problem: Problem| Rejection { id: record.id.clone(), origin: dataset.origins[index].clone(), problem };
        let has_image = record.image.is_some();
        if !has_image && record.conversations.iter().any(|t| t.value.contains(IMAGE_PLACEHOLDER)) {
            return Err(reject(Problem::PlaceholderWithoutImage));
        }
        let text_limit = if self.truncate_long { self.max_length } else { usize::MAX };
        let mut encoded = preprocess(&self.tokenizer, &self.template, &record.conversations, has_image, text_limit)
            .map_err(|e| reject(e.into()))?;
        let placeholders = encoded.input_ids.iter().filter(|&&id| id == IMAGE_TOKEN_INDEX).count();
        let spliced = encoded.input_ids.len() - placeholders + placeholders * self.image_tokens;
        if spliced > self.max_length {
            if !self.truncate_long {
                return Err(reject(Problem::TooLong { length: spliced, max_length: self.max_length }));
            }
            // The reference cuts the text to max_length before splicing (the model cuts the
            // spliced sequence again); keep the labels that survive both cuts.
            encoded.input_ids.truncate(self.max_length);
            encoded.labels.truncate(self.max_length);
        }
        if !trains_something(&encoded.labels, &encoded.input_ids, self.image_tokens, self.max_length) {
            return Err(reject(Problem::NoTargets));
        }
        let pixel_values = match &record.image {
            None => None,
            Some(image) => {
                let path = self.image_path(image);
                if !path.is_file() {
                    return Err(reject(Problem::MissingImage(path)));
                }
                let img = ImageProcessor::open(&path).map_err(|e| reject(Problem::UnreadableImage(e.to_string())))?;
                Some(self.image_processor.preprocess(&img))
            }
        };
        Ok(Example { index, id: record.id.clone(), input_ids: encoded.input_ids, labels: encoded.labels, pixel_values })
    }
}

/// Whether a label other than -100 survives splicing and the cut to `max_length`.
fn trains_something(labels: &[i64], ids: &[i64], image_tokens: usize, max_length: usize) -> bool {
    let mut position = 0;
    for (&label, &id) in labels.iter().zip(ids) {
        if position >= max_length {
            return false;
        }
        if id == IMAGE_TOKEN_INDEX {
            position += image_tokens;
        } else {
            if label != IGNORE_INDEX {
                return true;
            }
            position += 1;
        }
    }
    false
}

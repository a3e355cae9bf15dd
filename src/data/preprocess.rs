//! A conversation sample to token ids and labels, as LLaVA-JP's training code does it
//! (`preprocess_multimodal`, `preprocess_plain`, `preprocess_v1`), plus the length check that
//! upstream LLaVA has and LLaVA-JP dropped, and the generation prompt of its demos.

use super::conversation::{SeparatorStyle, Template};
use super::tokenizer::{TextTokenizer, TokenizerError, IMAGE_PLACEHOLDER};
use crate::model::IGNORE_INDEX;

/// One turn of a LLaVA data file: `{"from": "ユーザー" | "システム" | "human" | "gpt", "value": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Turn {
    pub from: String,
    pub value: String,
}

/// Token ids (-200 where the image goes) and labels (-100 where no loss is taken).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PreprocessError {
    #[error("the conversation is empty")]
    Empty,
    #[error("turn {index}: unknown speaker `{from}` (expected ユーザー/システム or human/gpt)")]
    UnknownSpeaker { index: usize, from: String },
    #[error("turn {index}: expected a {expected} turn, found `{from}`")]
    OutOfOrder { index: usize, expected: &'static str, from: String },
    #[error("the plain template takes exactly one question and one caption, found {0} turns")]
    PlainNeedsTwoTurns(usize),
    #[error("the first turn has no `<image>` although the sample has an image")]
    NoImagePlaceholder,
    #[error("{0} `<image>` placeholders: one image per sample is supported")]
    SeveralImages(usize),
    #[error("tokenization mismatch: the label masking walked {masked} tokens but the sample has {actual}")]
    Mismatch { masked: usize, actual: usize },
    #[error("{0}")]
    Tokenizer(String),
}

impl From<TokenizerError> for PreprocessError {
    fn from(e: TokenizerError) -> Self {
        Self::Tokenizer(e.to_string())
    }
}

/// `preprocess_multimodal`: the `<image>` of a turn moves to its start, followed by a newline.
fn move_image_first(value: &str) -> String {
    if !value.contains(IMAGE_PLACEHOLDER) {
        return value.to_string();
    }
    let text = value.replace(IMAGE_PLACEHOLDER, "");
    format!("{IMAGE_PLACEHOLDER}\n{}", text.trim()).trim().to_string()
}

/// Ids and labels of one sample. `has_image` says whether an image comes with it (its first
/// user turn then carries the single `<image>`); `max_length` cuts image-less samples as the
/// reference's tokenizer call does (samples with an image are cut by the collator).
pub fn preprocess(
    tokenizer: &TextTokenizer,
    template: &Template,
    turns: &[Turn],
    has_image: bool,
    max_length: usize,
) -> Result<Encoded, PreprocessError> {
    if turns.is_empty() {
        return Err(PreprocessError::Empty);
    }
    let placeholders: usize = turns.iter().map(|t| t.value.matches(IMAGE_PLACEHOLDER).count()).sum();
    if has_image {
        match placeholders {
            0 => return Err(PreprocessError::NoImagePlaceholder),
            1 => {}
            n => return Err(PreprocessError::SeveralImages(n)),
        }
    }
    match template.style {
        SeparatorStyle::Plain => preprocess_plain(tokenizer, template, turns),
        SeparatorStyle::Two => preprocess_two(tokenizer, template, turns, has_image, max_length),
    }
}

fn preprocess_plain(tokenizer: &TextTokenizer, template: &Template, turns: &[Turn]) -> Result<Encoded, PreprocessError> {
    if turns.len() != 2 {
        return Err(PreprocessError::PlainNeedsTwoTurns(turns.len()));
    }
    if !turns[0].value.contains(IMAGE_PLACEHOLDER) {
        return Err(PreprocessError::NoImagePlaceholder);
    }
    // The instruction is dropped: the sample is the image followed by the caption.
    let text = format!("{IMAGE_PLACEHOLDER}{}{}", turns[1].value, template.sep);
    let input_ids = tokenizer.encode_with_images(&text)?;
    let masked = tokenizer.encode_with_images(IMAGE_PLACEHOLDER)?.len().min(input_ids.len());
    let mut labels = input_ids.clone();
    labels[..masked].fill(IGNORE_INDEX);
    Ok(Encoded { input_ids, labels })
}

fn preprocess_two(
    tokenizer: &TextTokenizer,
    template: &Template,
    turns: &[Turn],
    has_image: bool,
    max_length: usize,
) -> Result<Encoded, PreprocessError> {
    // The reference skips a leading assistant turn, then requires strict alternation.
    let mut messages = Vec::new();
    let start = match Template::role_index(&turns[0].from) {
        Some(1) => 1,
        Some(_) => 0,
        None => return Err(PreprocessError::UnknownSpeaker { index: 0, from: turns[0].from.clone() }),
    };
    let values: Vec<String> = turns.iter().map(|t| if has_image { move_image_first(&t.value) } else { t.value.clone() }).collect();
    for (j, (index, turn)) in turns.iter().enumerate().skip(start).enumerate() {
        let role = Template::role_index(&turn.from)
            .ok_or_else(|| PreprocessError::UnknownSpeaker { index, from: turn.from.clone() })?;
        if role != j % 2 {
            let expected = if j % 2 == 0 { "user" } else { "assistant" };
            return Err(PreprocessError::OutOfOrder { index, expected, from: turn.from.clone() });
        }
        messages.push((role, Some(values[index].as_str())));
    }
    if messages.is_empty() {
        return Err(PreprocessError::Empty);
    }
    let conversation = template.prompt(&messages);
    let count = |text: &str| -> Result<usize, PreprocessError> {
        Ok(if has_image { tokenizer.encode_with_images(text)?.len() } else { tokenizer.encode(text)?.len() })
    };
    let mut input_ids = if has_image { tokenizer.encode_with_images(&conversation)? } else { tokenizer.encode(&conversation)? };
    if !has_image {
        input_ids.truncate(max_length);
    }
    let mut labels = input_ids.clone();
    let len = labels.len();

    // The reference's masking walk: each round (text up to an answer's end-of-turn separator) is
    // tokenized on its own; its instruction part (up to and including "システム: ", less the
    // two tokens the tokenizer ends such a piece with) is masked.
    let sep = format!("{}{}: ", template.sep, template.roles[1]);
    let mut cur = 0usize;
    for round in conversation.split(template.sep2) {
        if round.is_empty() {
            break;
        }
        let parts: Vec<&str> = round.split(sep.as_str()).collect();
        if parts.len() != 2 {
            break;
        }
        let instruction = format!("{}{sep}", parts[0]);
        let round_len = count(round)?;
        let instruction_len = count(&instruction)?.saturating_sub(2);
        let (from, to) = (cur.min(len), (cur + instruction_len).min(len));
        labels[from..to].fill(IGNORE_INDEX);
        cur += round_len;
    }
    labels[cur.min(len)..].fill(IGNORE_INDEX);
    // Upstream LLaVA's check, which LLaVA-JP dropped: the walk must end where the tokens do,
    // but for what the post-processor appends after the last round (llm-jp's final EOD).
    let expected = len.saturating_sub(tokenizer.trailing_special_tokens()?);
    if cur < max_length && cur != expected {
        return Err(PreprocessError::Mismatch { masked: cur, actual: expected });
    }
    Ok(Encoded { input_ids, labels })
}

/// The prompt for generation, as the reference's demos build it: the history and the new
/// question in the template (`<image>\n` before the first question when there is an image), an
/// open assistant slot, and the trailing end-of-text id the tokenizer appends dropped, so the
/// prompt ends with the space after `システム:`.
pub fn generation_prompt(
    tokenizer: &TextTokenizer,
    template: &Template,
    history: &[(String, String)],
    question: &str,
    has_image: bool,
) -> Result<Vec<i64>, PreprocessError> {
    let mut texts: Vec<(usize, Option<String>)> = Vec::new();
    for (q, a) in history {
        texts.push((0, Some(q.clone())));
        texts.push((1, Some(a.clone())));
    }
    texts.push((0, Some(question.to_string())));
    if has_image {
        if let Some((_, Some(first))) = texts.first_mut() {
            *first = format!("{IMAGE_PLACEHOLDER}\n{}", first.replace(IMAGE_PLACEHOLDER, "").trim());
        }
    }
    texts.push((1, None));
    let messages: Vec<(usize, Option<&str>)> = texts.iter().map(|(r, m)| (*r, m.as_deref())).collect();
    let mut ids = tokenizer.encode_with_images(&template.prompt(&messages))?;
    ids.pop();
    Ok(ids)
}

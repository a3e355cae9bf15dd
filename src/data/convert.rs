//! Converters from the datasets LLaVA-JP trains on to the LLaVA format:
//! STAIR Captions (COCO caption JSON, stage 1) and Japanese Visual Genome VQA
//! (`question_answers.json`, stage 2).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::dataset::{DataReport, Origin, Problem, Record, Rejection};
use super::preprocess::Turn;
use super::tokenizer::IMAGE_PLACEHOLDER;

/// The instruction a caption sample gets (the `plain` template drops it; `v1` would keep it).
pub const CAPTION_INSTRUCTION: &str = "画像を簡潔に説明してください。";

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
}

fn read_json(path: &Path) -> Result<Value, ConvertError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConvertError::Io { path: path.into(), message: e.to_string() })?;
    serde_json::from_str(&text).map_err(|e| ConvertError::Format { path: path.into(), message: format!("not JSON: {e}") })
}

/// An id as text: a number as written, a string without quotes.
fn id_text(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(s)) => s.clone(),
        Some(v @ Value::Number(_)) => v.to_string(),
        _ => "?".into(),
    }
}

fn user(value: String) -> Turn {
    Turn { from: "ユーザー".into(), value }
}

fn assistant(value: String) -> Turn {
    Turn { from: "システム".into(), value }
}

/// Options shared by the converters.
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// Put before each image's file name (e.g. `train2014/`, `VG_100K/`).
    pub image_prefix: String,
    /// When set, records whose image is not in this folder are left out (and counted).
    pub check_images_in: Option<PathBuf>,
}

impl ConvertOptions {
    fn image_missing(&self, image: &str) -> Option<PathBuf> {
        let folder = self.check_images_in.as_ref()?;
        let path = folder.join(image);
        (!path.is_file()).then_some(path)
    }
}

/// STAIR Captions: one record per caption, `<image>` + the instruction, then the caption.
pub fn stair_captions(path: &Path, options: &ConvertOptions, instruction: &str) -> Result<(Vec<Record>, DataReport), ConvertError> {
    let json = read_json(path)?;
    let format = |message: &str| ConvertError::Format { path: path.into(), message: message.into() };
    let images = json.get("images").and_then(Value::as_array).ok_or_else(|| format("no `images` list (expected COCO caption JSON)"))?;
    let annotations =
        json.get("annotations").and_then(Value::as_array).ok_or_else(|| format("no `annotations` list (expected COCO caption JSON)"))?;
    let mut file_names = BTreeMap::new();
    for image in images {
        if let (Some(id), Some(name)) = (image.get("id").and_then(Value::as_i64), image.get("file_name").and_then(Value::as_str)) {
            file_names.insert(id, name.to_string());
        }
    }
    let mut records = Vec::new();
    let mut report = DataReport::default();
    for (index, ann) in annotations.iter().enumerate() {
        let origin = Origin { file: path.into(), line: None, index: Some(index) };
        let id = id_text(ann.get("id"));
        let reject = |problem: Problem| Rejection { id: id.clone(), origin: origin.clone(), problem };
        let Some(image_id) = ann.get("image_id").and_then(Value::as_i64) else {
            report.reject(reject(Problem::MalformedRecord("annotation without a numeric `image_id`".into())));
            continue;
        };
        let Some(file_name) = file_names.get(&image_id) else {
            report.reject(reject(Problem::MalformedRecord(format!("image_id {image_id} is not in `images`"))));
            continue;
        };
        let caption = ann.get("caption").and_then(Value::as_str).map(str::trim).unwrap_or("");
        if caption.is_empty() {
            report.reject(reject(Problem::MalformedRecord("empty or missing `caption`".into())));
            continue;
        }
        let image = format!("{}{file_name}", options.image_prefix);
        if let Some(missing) = options.image_missing(&image) {
            report.reject(reject(Problem::MissingImage(missing)));
            continue;
        }
        records.push(Record {
            id,
            image: Some(image),
            conversations: vec![user(format!("{IMAGE_PLACEHOLDER}\n{instruction}")), assistant(caption.to_string())],
        });
        report.accepted += 1;
    }
    Ok((records, report))
}

/// Japanese Visual Genome VQA: the question/answer pairs of each image, `qa_per_sample` of them
/// per record as turns of one conversation (1, the default, is what the reference's script
/// makes: one pair per row). Images are `{prefix}{image_id}.jpg`.
pub fn ja_vg_vqa(path: &Path, options: &ConvertOptions, qa_per_sample: usize) -> Result<(Vec<Record>, DataReport), ConvertError> {
    let json = read_json(path)?;
    let entries = json
        .as_array()
        .ok_or_else(|| ConvertError::Format { path: path.into(), message: "expected a list of {\"qas\": [...]} entries".into() })?;
    let qa_per_sample = qa_per_sample.max(1);
    let mut records = Vec::new();
    let mut report = DataReport::default();
    for (index, entry) in entries.iter().enumerate() {
        let origin = Origin { file: path.into(), line: None, index: Some(index) };
        let Some(qas) = entry.get("qas").and_then(Value::as_array) else {
            let id = id_text(entry.get("id"));
            report.reject(Rejection { id, origin, problem: Problem::MalformedRecord("no `qas` list".into()) });
            continue;
        };
        // Pairs grouped per image, in file order.
        let mut per_image: Vec<(i64, Vec<(String, String, String)>)> = Vec::new();
        for qa in qas {
            let qa_id = id_text(qa.get("qa_id"));
            let image_id = qa.get("image_id").and_then(Value::as_i64).or_else(|| entry.get("id").and_then(Value::as_i64));
            let text = |key: &str| qa.get(key).and_then(Value::as_str).map(str::trim).unwrap_or("").to_string();
            let (question, answer) = (text("question"), text("answer"));
            let problem = match image_id {
                None => Some("no numeric `image_id`"),
                Some(_) if question.is_empty() => Some("empty or missing `question`"),
                Some(_) if answer.is_empty() => Some("empty or missing `answer`"),
                Some(_) => None,
            };
            if let Some(p) = problem {
                report.reject(Rejection { id: qa_id, origin: origin.clone(), problem: Problem::MalformedRecord(p.into()) });
                continue;
            }
            let image_id = image_id.expect("checked");
            match per_image.iter_mut().find(|(id, _)| *id == image_id) {
                Some((_, list)) => list.push((qa_id, question, answer)),
                None => per_image.push((image_id, vec![(qa_id, question, answer)])),
            }
        }
        for (image_id, pairs) in per_image {
            let image = format!("{}{image_id}.jpg", options.image_prefix);
            if let Some(missing) = options.image_missing(&image) {
                for (qa_id, _, _) in &pairs {
                    report.reject(Rejection { id: qa_id.clone(), origin: origin.clone(), problem: Problem::MissingImage(missing.clone()) });
                }
                continue;
            }
            for chunk in pairs.chunks(qa_per_sample) {
                let mut conversations = Vec::with_capacity(2 * chunk.len());
                for (k, (_, q, a)) in chunk.iter().enumerate() {
                    let q = if k == 0 { format!("{IMAGE_PLACEHOLDER}\n{q}") } else { q.clone() };
                    conversations.push(user(q));
                    conversations.push(assistant(a.clone()));
                }
                let id = format!("{image_id}-{}", chunk[0].0);
                records.push(Record { id, image: Some(image.clone()), conversations });
                report.accepted += chunk.len();
            }
        }
    }
    Ok((records, report))
}

/// Writes records as a JSON array, or as JSON lines when the file name ends in `.jsonl`;
/// through a temporary file, so an interrupted write never leaves half a file.
pub fn write_records(path: &Path, records: &[Record]) -> Result<(), ConvertError> {
    let io = |e: std::io::Error| ConvertError::Io { path: path.into(), message: e.to_string() };
    let text = if path.extension().is_some_and(|e| e == "jsonl") {
        let mut s = String::new();
        for r in records {
            s.push_str(&serde_json::to_string(r).expect("records serialise"));
            s.push('\n');
        }
        s
    } else {
        serde_json::to_string_pretty(records).expect("records serialise")
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

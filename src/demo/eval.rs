//! Exact-match evaluation on the held-out pictures: each record asks one question; the model's
//! greedy answer (read as the reference reads it) must equal the truth. Reported per question
//! type, beside what guessing would score.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::prelude::Backend;

use super::synth::QuestionType;
use crate::infer::{Assistant, Conversation, GenerationConfig, Prompt};

#[derive(Debug, Clone)]
pub struct Answered {
    pub id: String,
    pub image: PathBuf,
    pub kind: QuestionType,
    pub question: String,
    pub answer: String,
    pub truth: String,
}

impl Answered {
    pub fn correct(&self) -> bool {
        self.answer == self.truth
    }
}

#[derive(Debug, Clone, Default)]
pub struct EvalReport {
    pub answered: Vec<Answered>,
}

impl EvalReport {
    /// (correct, total) per question type.
    pub fn per_type(&self) -> BTreeMap<QuestionType, (usize, usize)> {
        let mut counts = BTreeMap::new();
        for a in &self.answered {
            let e = counts.entry(a.kind).or_insert((0, 0));
            e.0 += usize::from(a.correct());
            e.1 += 1;
        }
        counts
    }

    pub fn accuracy(&self, kind: QuestionType) -> f64 {
        self.per_type().get(&kind).map_or(0.0, |&(c, n)| c as f64 / n.max(1) as f64)
    }

    /// A table: type, accuracy, count, chance.
    pub fn table(&self) -> String {
        let mut out = format!("{:<10} {:>9} {:>9} {:>8}\n", "question", "accuracy", "correct", "chance");
        for (kind, (c, n)) in self.per_type() {
            out.push_str(&format!(
                "{:<10} {:>8.1}% {:>5}/{:<4} {:>7.1}%\n",
                kind.name(),
                100.0 * c as f64 / n.max(1) as f64,
                c,
                n,
                100.0 / kind.choices() as f64
            ));
        }
        let (c, n) = self.answered.iter().fold((0, 0), |(c, n), a| (c + usize::from(a.correct()), n + 1));
        out.push_str(&format!("{:<10} {:>8.1}% {:>5}/{:<4}\n", "all", 100.0 * c as f64 / n.max(1) as f64, c, n));
        out
    }
}

/// Answers every record of `eval_file` (images under `image_folder`) greedily, `batch_size` at a
/// time.
pub fn evaluate<B: Backend>(
    assistant: &Assistant<B>,
    eval_file: &Path,
    image_folder: &Path,
    batch_size: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<EvalReport> {
    let text = std::fs::read_to_string(eval_file).with_context(|| eval_file.display().to_string())?;
    let mut pending = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let where_ = || format!("{}:{}", eval_file.display(), i + 1);
        let record: serde_json::Value = serde_json::from_str(line).with_context(where_)?;
        let id = record["id"].as_str().with_context(where_)?.to_string();
        let kind = id.rsplit('-').next().and_then(QuestionType::parse).with_context(|| format!("{}: id {id} names no question type", where_()))?;
        let image = image_folder.join(record["image"].as_str().with_context(where_)?);
        let question = record["conversations"][0]["value"].as_str().with_context(where_)?.replace("<image>", "").trim().to_string();
        let truth = record["conversations"][1]["value"].as_str().with_context(where_)?.to_string();
        pending.push(Answered { id, image, kind, question, answer: String::new(), truth });
    }
    let config = GenerationConfig { max_new_tokens: 16, ..GenerationConfig::default() };
    let total = pending.len();
    let mut done = 0;
    for chunk in pending.chunks_mut(batch_size.max(1)) {
        let prompts = chunk
            .iter()
            .map(|a| {
                let conversation = Conversation { history: vec![], image: Some(assistant.load_image(&a.image)?) };
                assistant.prompt(&conversation, &a.question)
            })
            .collect::<anyhow::Result<Vec<Prompt>>>()?;
        let (answers, _) = assistant.answer(&prompts, &config, &mut |_, _| {})?;
        for (a, (_, text)) in chunk.iter_mut().zip(answers) {
            a.answer = text;
        }
        done += chunk.len();
        progress(done, total);
    }
    Ok(EvalReport { answered: pending })
}

/// The picture as terminal art: two pixel rows per line with 24-bit colour half blocks.
pub fn terminal_image(path: &Path, width: u32) -> anyhow::Result<String> {
    let img = image::open(path).with_context(|| path.display().to_string())?.to_rgb8();
    let height = (img.height() * width / img.width()).max(2) & !1;
    let small = image::imageops::resize(&img, width, height, image::imageops::FilterType::Nearest);
    let mut out = String::new();
    for y in (0..height).step_by(2) {
        for x in 0..width {
            let [r1, g1, b1] = small.get_pixel(x, y).0;
            let [r2, g2, b2] = small.get_pixel(x, y + 1).0;
            out.push_str(&format!("\x1b[38;2;{r1};{g1};{b1}m\x1b[48;2;{r2};{g2};{b2}m\u{2580}"));
        }
        out.push_str("\x1b[0m\n");
    }
    Ok(out)
}

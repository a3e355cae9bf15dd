//! A synthetic Japanese visual QA dataset: pictures of one kind of object (a shape in a colour and
//! a size) repeated 1–4 times on a 2x2 grid, a caption for stage 1, question/answer turns for
//! stage 2, and a held-out set with one question of each type per picture. Everything is written
//! in the LLaVA format (JSON lines + an image folder), so it goes through the real data pipeline.

use std::io::Write;
use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// (name as an answer, attributive form, RGB)
pub const COLOURS: [(&str, &str, [u8; 3]); 6] = [
    ("赤", "赤い", [215, 35, 35]),
    ("青", "青い", [35, 75, 220]),
    ("緑", "緑の", [35, 160, 60]),
    ("黄色", "黄色い", [235, 200, 20]),
    ("紫", "紫の", [135, 50, 175]),
    ("黒", "黒い", [25, 25, 25]),
];
pub const SHAPES: [&str; 3] = ["円", "四角", "三角"];
/// Grid cells, row-major.
pub const POSITIONS: [&str; 4] = ["左上", "右上", "左下", "右下"];
pub const GRID: usize = 2;
pub const SIZES: [&str; 2] = ["小さい", "大きい"];
pub const MAX_COUNT: usize = 4;

/// The kinds of question, in the order reports list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QuestionType {
    Colour,
    Shape,
    Count,
    Position,
    Size,
}

impl QuestionType {
    pub const ALL: [QuestionType; 5] = [Self::Colour, Self::Shape, Self::Count, Self::Position, Self::Size];

    pub fn name(self) -> &'static str {
        match self {
            Self::Colour => "colour",
            Self::Shape => "shape",
            Self::Count => "count",
            Self::Position => "position",
            Self::Size => "size",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    pub fn question(self) -> &'static str {
        match self {
            Self::Colour => "何色ですか？",
            Self::Shape => "何の形ですか？",
            Self::Count => "何個ありますか？",
            Self::Position => "どこにありますか？",
            Self::Size => "大きいですか、小さいですか？",
        }
    }

    /// How many answers there are to choose from (what guessing scores is 1 / this).
    pub fn choices(self) -> usize {
        match self {
            Self::Colour => COLOURS.len(),
            Self::Shape => SHAPES.len(),
            Self::Count => MAX_COUNT,
            Self::Position => POSITIONS.len(),
            Self::Size => SIZES.len(),
        }
    }
}

/// What a picture shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub colour: usize,
    pub shape: usize,
    pub large: bool,
    /// Grid cells (indices into [`POSITIONS`]) holding an object; their number is the count.
    pub cells: Vec<usize>,
}

impl Scene {
    pub fn random(rng: &mut impl Rng) -> Self {
        let count = rng.random_range(1..=MAX_COUNT);
        let mut cells: Vec<usize> = (0..GRID * GRID).collect();
        cells.shuffle(rng);
        cells.truncate(count);
        cells.sort();
        Self { colour: rng.random_range(0..COLOURS.len()), shape: rng.random_range(0..SHAPES.len()), large: rng.random(), cells }
    }

    /// Question types that have an answer here (a position only for a single object).
    pub fn question_types(&self) -> Vec<QuestionType> {
        QuestionType::ALL.into_iter().filter(|&t| t != QuestionType::Position || self.cells.len() == 1).collect()
    }

    pub fn answer(&self, t: QuestionType) -> String {
        match t {
            QuestionType::Colour => format!("{}です。", COLOURS[self.colour].0),
            QuestionType::Shape => format!("{}です。", SHAPES[self.shape]),
            QuestionType::Count => format!("{}個です。", self.cells.len()),
            QuestionType::Position => format!("{}です。", POSITIONS[self.cells[0]]),
            QuestionType::Size => format!("{}です。", SIZES[usize::from(self.large)]),
        }
    }

    pub fn caption(&self) -> String {
        let object = format!("{}{}{}", SIZES[usize::from(self.large)], COLOURS[self.colour].1, SHAPES[self.shape]);
        match self.cells.len() {
            1 => format!("{}に{object}があります。", POSITIONS[self.cells[0]]),
            n => format!("{object}が{n}個あります。"),
        }
    }

    /// Draws the scene on a slightly noisy grey background, each object centred in its cell.
    ///
    /// Why this grey and no jitter: nothing is pretrained here, so the vision tower learns from
    /// the answers alone. On a light background every patch embedding is dominated by the same
    /// large background term and the objects barely move the features; near CLIP's mean colour
    /// an empty patch normalises to about zero and the object is the signal. Objects that jitter
    /// inside their cell kept shape at chance for 1500 steps in every setting we tried
    /// (`model-import/scripts/demo_recipe_sweep.py`); centred, it is learnt in under 1000.
    pub fn draw(&self, size: u32, rng: &mut impl Rng) -> RgbImage {
        let mut img = RgbImage::from_fn(size, size, |_, _| {
            let g = 110 + rng.random_range(0..16u8);
            Rgb([g, g, g - 4])
        });
        let cell = size as f32 / GRID as f32;
        let radius = cell * if self.large { 0.42 } else { 0.24 };
        let colour = COLOURS[self.colour].2;
        for &c in &self.cells {
            let cx = (c % GRID) as f32 * cell + cell / 2.0;
            let cy = (c / GRID) as f32 * cell + cell / 2.0;
            for y in 0..size {
                for x in 0..size {
                    let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
                    let inside = match self.shape {
                        0 => dx * dx + dy * dy <= radius * radius,
                        1 => dx.abs() <= radius * 0.85 && dy.abs() <= radius * 0.85,
                        // Apex up: the half-width grows from 0 at the top to `radius` at the base.
                        _ => dy >= -radius && dy <= radius * 0.8 && dx.abs() <= (dy + radius) / 1.8 * 0.95,
                    };
                    if inside {
                        img.put_pixel(x, y, Rgb(colour));
                    }
                }
            }
        }
        img
    }
}

#[derive(Debug, Clone)]
pub struct SynthConfig {
    pub train_images: usize,
    pub eval_images: usize,
    pub image_size: u32,
    pub seed: u64,
}

/// Where the dataset was written.
#[derive(Debug, Clone)]
pub struct SynthDataset {
    pub image_folder: PathBuf,
    /// Stage 1: one caption per training picture.
    pub captions: PathBuf,
    /// Stage 2: every question type that has an answer, in a random order, per training picture.
    pub conversations: PathBuf,
    /// Held out: one single-turn record per picture and question type; the `id` ends with the type.
    pub eval: PathBuf,
    pub train_images: usize,
    pub eval_records: usize,
}

/// Writes the dataset under `out` (`images/`, `captions.jsonl`, `conversations.jsonl`,
/// `eval.jsonl`), calling `progress(done, total)` as pictures are drawn.
pub fn write_dataset(out: &Path, config: &SynthConfig, progress: &mut dyn FnMut(usize, usize)) -> anyhow::Result<SynthDataset> {
    use anyhow::Context;
    let images = out.join("images");
    std::fs::create_dir_all(&images).with_context(|| images.display().to_string())?;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let open = |name: &str| -> anyhow::Result<std::io::BufWriter<std::fs::File>> {
        let path = out.join(name);
        Ok(std::io::BufWriter::new(std::fs::File::create(&path).with_context(|| path.display().to_string())?))
    };
    let (mut captions, mut conversations, mut eval) = (open("captions.jsonl")?, open("conversations.jsonl")?, open("eval.jsonl")?);
    let total = config.train_images + config.eval_images;
    let mut eval_records = 0;
    for i in 0..total {
        let held_out = i >= config.train_images;
        let scene = Scene::random(&mut rng);
        let file = if held_out { format!("eval-{:05}.png", i - config.train_images) } else { format!("train-{i:05}.png") };
        scene.draw(config.image_size, &mut rng).save(images.join(&file)).with_context(|| file.clone())?;
        let turn = |from: &str, value: String| serde_json::json!({"from": from, "value": value});
        if held_out {
            for t in scene.question_types() {
                let record = serde_json::json!({
                    "id": format!("{}-{}", file.trim_end_matches(".png"), t.name()), "image": file,
                    "conversations": [turn("ユーザー", format!("<image>\n{}", t.question())), turn("システム", scene.answer(t))],
                });
                writeln!(eval, "{record}")?;
                eval_records += 1;
            }
        } else {
            let record = serde_json::json!({
                "id": format!("c{i:05}"), "image": file,
                "conversations": [turn("ユーザー", "<image>\n画像を説明してください。".into()), turn("システム", scene.caption())],
            });
            writeln!(captions, "{record}")?;
            // Every type in every conversation: each picture drawn and read teaches all it can.
            let mut types = scene.question_types();
            types.shuffle(&mut rng);
            let mut turns = Vec::new();
            for (k, t) in types.iter().enumerate() {
                let q = if k == 0 { format!("<image>\n{}", t.question()) } else { t.question().to_string() };
                turns.push(turn("ユーザー", q));
                turns.push(turn("システム", scene.answer(*t)));
            }
            writeln!(conversations, "{}", serde_json::json!({"id": format!("q{i:05}"), "image": file, "conversations": turns}))?;
        }
        progress(i + 1, total);
    }
    for mut w in [captions, conversations, eval] {
        w.flush()?;
    }
    Ok(SynthDataset {
        image_folder: images,
        captions: out.join("captions.jsonl"),
        conversations: out.join("conversations.jsonl"),
        eval: out.join("eval.jsonl"),
        train_images: config.train_images,
        eval_records,
    })
}

/// Every text the model will read, as the templates render it (so that the tokenizer learns
/// the system text and role names as a few pieces), split where the image goes.
pub fn corpus() -> Vec<String> {
    use crate::data::conversation::Template;
    let (v1, plain) = (Template::v1(), Template::plain());
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut texts = Vec::new();
    for _ in 0..400 {
        let scene = Scene::random(&mut rng);
        let caption = plain.prompt(&[(0, Some("<image>")), (1, Some(&scene.caption()))]);
        let mut turns: Vec<(usize, String)> = Vec::new();
        for (k, t) in scene.question_types().into_iter().enumerate() {
            let q = if k == 0 { format!("<image>\n{}", t.question()) } else { t.question().to_string() };
            turns.push((0, q));
            turns.push((1, scene.answer(t)));
        }
        let messages: Vec<(usize, Option<&str>)> = turns.iter().map(|(r, m)| (*r, Some(m.as_str()))).collect();
        for prompt in [caption, v1.prompt(&messages)] {
            texts.extend(prompt.split("<image>").map(str::to_string).filter(|s| !s.is_empty()));
        }
    }
    texts
}

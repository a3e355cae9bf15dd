//! The demo's parts: the synthetic dataset (pictures agree with their answers; every record goes
//! through the real data pipeline with no rejection) and the llm-jp-form tokenizer trained for it.
use std::path::PathBuf;

use llava_jp::data::tokenizer_train::{train_tokenizer, write_tokenizer, SPECIAL_TOKENS};
use llava_jp::data::{AspectMode, BadSamplePolicy, ImageProcessor, LlavaDataset, SampleBuilder, Template, TextTokenizer};
use llava_jp::demo::synth::{self, QuestionType, Scene, SynthConfig, COLOURS};
use rand::SeedableRng;

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llava-jp-demo-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn the_trained_tokenizer_has_llm_jp_form() {
    let dir = temp("tokenizer");
    let (file, size) = write_tokenizer(&dir, &synth::corpus(), 640).unwrap();
    assert!(size <= 640 && size > 300, "{size} tokens");
    let tokenizer = TextTokenizer::from_file(&file).unwrap();
    for (id, token) in SPECIAL_TOKENS.iter().enumerate() {
        assert_eq!(tokenizer.token_to_id(token), Some(id as i64), "{token}");
    }
    assert_eq!(tokenizer.eos_id, Some(7));
    assert_eq!(tokenizer.bos_id, Some(1));
    assert_eq!(tokenizer.trailing_special_tokens().unwrap(), 1, "the post-processor appends <EOD|LLM-jp> only");
    // Every corpus text round-trips (those holding a special token decode without it); the
    // trailing id is 7.
    for text in synth::corpus().iter().filter(|t| !t.contains("<EOD|LLM-jp>")).take(200) {
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(ids.last(), Some(&7), "{text}");
        assert_eq!(tokenizer.decode(&ids).unwrap(), *text, "{ids:?}");
    }
    // Frequent words of the template are learnt as pieces, not spelt character by character.
    let system_text = llava_jp::data::conversation::V1_JA_SYSTEM;
    let system = tokenizer.encode(system_text).unwrap();
    assert!(system.len() <= 24, "{} tokens for the system text ({} characters)", system.len(), system_text.chars().count());
    // A space is a token of its own, so the answer after a generation prompt's final space
    // starts as it did in training, and the reference's label masking lines up.
    for id in 8..size as i64 {
        let piece = tokenizer.id_to_token(id).unwrap();
        assert!(piece == "\u{2581}" || !piece.contains('\u{2581}'), "piece {id} {piece:?}");
    }
    assert_eq!(tokenizer.encode("ユーザー").unwrap().len(), 3, "▁, ユーザー, EOD");
    // Unseen characters fall back to bytes and still decode.
    let unseen = "犬🐕";
    let ids = tokenizer.encode(unseen).unwrap();
    assert!(ids.iter().all(|&id| id != 0), "no <unk>: {ids:?}");
    assert_eq!(tokenizer.decode(&ids).unwrap(), unseen);
    assert!(train_tokenizer(&[], 640).is_err());
    assert!(train_tokenizer(&["a".to_string()], 100).unwrap_err().contains("no room"));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn pictures_agree_with_their_captions_and_answers() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    for _ in 0..50 {
        let scene = Scene::random(&mut rng);
        let img = scene.draw(32, &mut rng);
        let colour = COLOURS[scene.colour].2;
        // Each object's cell holds pixels of its colour; an empty cell holds none.
        for cell in 0..4 {
            let (x0, y0) = ((cell % 2) * 16, (cell / 2) * 16);
            let coloured = (0..16).flat_map(|y| (0..16).map(move |x| (x, y))).filter(|&(x, y)| img.get_pixel((x0 + x) as u32, (y0 + y) as u32).0 == colour).count();
            assert_eq!(coloured > 0, scene.cells.contains(&cell), "cell {cell} of {scene:?}");
        }
        let types = scene.question_types();
        assert_eq!(types.contains(&QuestionType::Position), scene.cells.len() == 1);
        assert_eq!(scene.answer(QuestionType::Count), format!("{}個です。", scene.cells.len()));
        assert!(scene.caption().contains(synth::SHAPES[scene.shape]));
    }
}

#[test]
fn the_synthetic_dataset_goes_through_the_real_pipeline() {
    let dir = temp("data");
    let config = SynthConfig { train_images: 30, eval_images: 6, image_size: 32, seed: 3 };
    let mut calls = 0;
    let ds = synth::write_dataset(&dir, &config, &mut |_, _| calls += 1).unwrap();
    assert_eq!(calls, 36);
    assert!(ds.eval_records >= 6 * 4 && ds.eval_records <= 6 * 5);
    let (tokenizer_file, _) = write_tokenizer(&dir.join("tokenizer"), &synth::corpus(), 640).unwrap();
    for (file, template, records) in [(&ds.captions, "plain", 30), (&ds.conversations, "v1", 30), (&ds.eval, "v1", ds.eval_records)] {
        let dataset = LlavaDataset::open(std::slice::from_ref(file), BadSamplePolicy::Fail).unwrap();
        assert_eq!(dataset.len(), records, "{}", file.display());
        let builder = SampleBuilder {
            tokenizer: TextTokenizer::from_file(&tokenizer_file).unwrap(),
            template: Template::by_name(template).unwrap(),
            image_processor: ImageProcessor::clip(32, AspectMode::Square),
            image_folder: ds.image_folder.clone(),
            max_length: 192,
            image_tokens: 16,
            truncate_long: false,
        };
        let tokenizer = TextTokenizer::from_file(&tokenizer_file).unwrap();
        let lines: Vec<String> = std::fs::read_to_string(file).unwrap().lines().map(str::to_owned).collect();
        for i in 0..dataset.len() {
            let example = builder.build(&dataset, i).unwrap_or_else(|r| panic!("{}: {r:?}", file.display()));
            assert_eq!(example.pixel_values.as_ref().map(Vec::len), Some(3 * 32 * 32));
            assert!(example.input_ids.len() < 80, "{} tokens", example.input_ids.len());
            // Exactly the answers are trained: the labelled tokens spell them, turn by turn.
            let record: serde_json::Value = serde_json::from_str(&lines[i]).unwrap();
            let answers: String = record["conversations"].as_array().unwrap().iter().skip(1).step_by(2).map(|t| t["value"].as_str().unwrap()).collect();
            let labelled: Vec<i64> = example.labels.iter().copied().filter(|&l| l >= 0).collect();
            let squeeze = |t: &str| t.split_whitespace().collect::<String>();
            assert_eq!(squeeze(&tokenizer.decode(&labelled).unwrap()), squeeze(&answers), "{}: sample {i}", file.display());
        }
    }
    // Held-out ids end with the question type, and each answers its own question.
    let eval = std::fs::read_to_string(&ds.eval).unwrap();
    for line in eval.lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        let kind = QuestionType::parse(r["id"].as_str().unwrap().rsplit('-').next().unwrap()).unwrap();
        assert!(r["conversations"][0]["value"].as_str().unwrap().ends_with(kind.question()));
        assert!(r["image"].as_str().unwrap().starts_with("eval-"));
    }
    std::fs::remove_dir_all(dir).ok();
}

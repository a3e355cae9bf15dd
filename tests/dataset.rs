//! Data files, the loader and the converters: good samples arrive as `preprocess` and the image
//! processor make them, in an order fixed by the seed, whatever the number of threads; every kind
//! of bad input is reported with its sample id and reason while the other samples still arrive.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use llava_jp::data::convert::{ja_vg_vqa, stair_captions, write_records, ConvertOptions};
use llava_jp::data::{
    epoch_order, preprocess, AspectMode, BadSamplePolicy, Batch, DataLoader, ImageProcessor, LlavaDataset, LoaderConfig, SampleBuilder,
    Template, TextTokenizer, Turn,
};
use serde_json::json;

fn tokenizer() -> TextTokenizer {
    let path = std::env::var_os("LLAVA_JP_TOKENIZER").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/reference/llm-jp-tokenizer-v2.1/tokenizer.json")
    });
    TextTokenizer::from_file(&path).unwrap_or_else(|e| panic!("the llm-jp v2.1 tokenizer (set LLAVA_JP_TOKENIZER): {e}"))
}

/// A fresh folder under the system's temp dir, with a PNG, a JPEG and broken images in it.
fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llava-jp-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let img = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([(x * 6) as u8, (y * 8) as u8, ((x + y) * 3) as u8]));
    img.save(dir.join("images/a.png")).unwrap();
    img.save(dir.join("images/b.jpg")).unwrap();
    let jpeg = std::fs::read(dir.join("images/b.jpg")).unwrap();
    let png = std::fs::read(dir.join("images/a.png")).unwrap();
    std::fs::write(dir.join("images/truncated.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    std::fs::write(dir.join("images/truncated.png"), &png[..png.len() / 2]).unwrap();
    let mut corrupt = jpeg[..20].to_vec();
    corrupt.extend(std::iter::repeat_n(0x5Au8, 200));
    std::fs::write(dir.join("images/corrupt.jpg"), corrupt).unwrap();
    std::fs::write(dir.join("images/not-an-image.png"), "hello").unwrap();
    dir
}

fn builder(dir: &Path, template: Template) -> SampleBuilder {
    SampleBuilder {
        tokenizer: tokenizer(),
        template,
        image_processor: ImageProcessor::clip(16, AspectMode::Square),
        image_folder: dir.join("images"),
        max_length: 96,
        image_tokens: 4,
        truncate_long: false,
    }
}

fn qa(id: &str, image: Option<&str>, q: &str, a: &str) -> serde_json::Value {
    let mut v = json!({"id": id, "conversations": [{"from": "ユーザー", "value": q}, {"from": "システム", "value": a}]});
    if let Some(image) = image {
        v["image"] = json!(image);
    }
    v
}

fn write_jsonl(dir: &Path, lines: &[String]) -> PathBuf {
    let path = dir.join("data.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

fn good_lines() -> Vec<serde_json::Value> {
    vec![
        qa("good-png", Some("a.png"), "<image>\nこれは何色ですか？", "赤です。"),
        qa("good-jpeg", Some("b.jpg"), "画像を説明して。\n<image>", "四角があります。"),
        qa("good-text", None, "日本の首都は？", "東京です。"),
    ]
}

fn all_batches(loader: &DataLoader, epoch: usize, position: usize) -> (Vec<Batch>, llava_jp::data::DataReport) {
    let mut it = loader.epoch(epoch, position);
    let batches: Vec<Batch> = it.by_ref().map(|b| b.unwrap()).collect();
    (batches, it.report.clone())
}

fn ids(batches: &[Batch]) -> Vec<String> {
    batches.iter().flat_map(|b| b.examples.iter().map(|e| e.id.clone())).collect()
}

#[test]
fn good_samples_arrive_as_preprocess_and_the_image_processor_make_them() {
    let dir = workdir("good");
    let lines: Vec<String> = good_lines().iter().map(|v| v.to_string()).collect();
    let path = write_jsonl(&dir, &lines);
    let dataset = Arc::new(LlavaDataset::open(&[path], BadSamplePolicy::Fail).unwrap());
    let builder = Arc::new(builder(&dir, Template::v1()));
    let config = LoaderConfig { batch_size: 2, shuffle: false, workers: 3, policy: BadSamplePolicy::Fail, ..Default::default() };
    let loader = DataLoader::new(dataset.clone(), builder.clone(), config);
    let (batches, report) = all_batches(&loader, 0, 0);
    assert_eq!(ids(&batches), ["good-png", "good-jpeg", "good-text"]);
    assert_eq!((report.accepted, report.rejected()), (3, 0));
    assert_eq!(batches.iter().map(Batch::len).collect::<Vec<_>>(), [2, 1]);
    assert_eq!(batches[0].images, 2);
    assert_eq!(batches[0].pixel_values.len(), 2 * 3 * 16 * 16);
    assert_eq!(batches[1].images, 0);

    let tok = tokenizer();
    for (e, record) in batches.iter().flat_map(|b| &b.examples).zip(&dataset.records) {
        let expected = preprocess(&tok, &Template::v1(), &record.conversations, record.image.is_some(), usize::MAX).unwrap();
        assert_eq!(e.input_ids, expected.input_ids, "{}", e.id);
        assert_eq!(e.labels, expected.labels, "{}", e.id);
        match &record.image {
            Some(image) => {
                let img = ImageProcessor::open(dir.join("images").join(image)).unwrap();
                assert_eq!(e.pixel_values.as_ref().unwrap(), &builder.image_processor.preprocess(&img), "{}", e.id);
            }
            None => assert!(e.pixel_values.is_none()),
        }
    }
    // The image moved to the front of the first turn: one -200, right after the system prompt.
    assert_eq!(batches[0].examples[1].input_ids.iter().filter(|&&i| i == -200).count(), 1);
}

/// A data file with `bad` between two good samples: the bad one is reported with its id and the
/// reason, the good ones arrive, and with `--bad-samples fail` the run stops naming it.
fn assert_left_out(name: &str, bad_line: &str, kind: &str, reason: &str) {
    let dir = workdir(name);
    let good = good_lines();
    let lines = vec![good[0].to_string(), bad_line.to_string(), good[2].to_string()];
    let path = write_jsonl(&dir, &lines);
    let dataset = Arc::new(LlavaDataset::open(std::slice::from_ref(&path), BadSamplePolicy::Skip).unwrap());
    let builder = Arc::new(builder(&dir, Template::v1()));
    let config = LoaderConfig { batch_size: 2, shuffle: false, workers: 2, ..Default::default() };
    let loader = DataLoader::new(dataset.clone(), builder.clone(), config.clone());
    let (batches, mut report) = all_batches(&loader, 0, 0);
    report.merge(&dataset.load_report);
    assert_eq!(ids(&batches), ["good-png", "good-text"], "{name}: the good samples still arrive");
    assert_eq!(batches.len(), 1, "{name}: the batch is filled from the next good sample");
    assert_eq!(report.accepted, 2);
    assert_eq!(report.counts.get(kind), Some(&1), "{name}: counted as {kind}: {report}");
    assert_eq!(report.rejected(), 1, "{report}");
    let message = report.rejections[0].to_string();
    println!("{name}: {message}");
    assert!(message.contains("bad-one") || message.contains("data.jsonl:2"), "{name}: the sample is named: {message}");
    assert!(message.contains(reason), "{name}: `{reason}` in `{message}`");
    assert!(report.to_string().contains(&format!("{kind}: 1")), "{name}: summary {report}");
    // Gathered ahead on a thread but not taken: neither used nor left out.
    let ahead = loader.epoch(0, 0).prefetched(1);
    std::thread::sleep(std::time::Duration::from_millis(50)); // let the thread gather the batch
    let untaken = ahead.finish();
    assert_eq!((untaken.accepted, untaken.rejected(), untaken.rejections.len()), (0, 0, 0), "{name}: {untaken}");

    // Fail policy: the run stops at the bad sample, naming it.
    let failed = match LlavaDataset::open(&[path], BadSamplePolicy::Fail) {
        Err(e) => e.to_string(),
        Ok(dataset) => {
            let loader = DataLoader::new(Arc::new(dataset), builder, LoaderConfig { policy: BadSamplePolicy::Fail, ..config });
            let mut it = loader.epoch(0, 0);
            let first_error = it.by_ref().find_map(|b| b.err()).expect("fail policy stops the run");
            assert!(it.next().is_none(), "nothing after the failure");
            first_error.to_string()
        }
    };
    assert!(failed.contains(reason) && (failed.contains("bad-one") || failed.contains("data.jsonl:2")), "{name}: {failed}");
}

fn bad(image: Option<&str>, q: &str, a: &str) -> String {
    qa("bad-one", image, q, a).to_string()
}

#[test]
fn missing_image() {
    assert_left_out("missing", &bad(Some("nowhere.jpg"), "<image>\n何？", "猫。"), "missing-image", "nowhere.jpg");
}

#[test]
fn unreadable_image() {
    assert_left_out("unreadable", &bad(Some("not-an-image.png"), "<image>\n何？", "猫。"), "unreadable-image", "not-an-image.png");
}

#[test]
fn corrupt_jpeg() {
    assert_left_out("corrupt", &bad(Some("corrupt.jpg"), "<image>\n何？", "猫。"), "unreadable-image", "corrupt.jpg");
}

#[test]
fn truncated_jpeg() {
    assert_left_out("truncated-jpeg", &bad(Some("truncated.jpg"), "<image>\n何？", "猫。"), "unreadable-image", "truncated JPEG");
}

#[test]
fn truncated_png() {
    assert_left_out("truncated-png", &bad(Some("truncated.png"), "<image>\n何？", "猫。"), "unreadable-image", "truncated.png");
}

#[test]
fn image_without_placeholder() {
    assert_left_out("no-placeholder", &bad(Some("a.png"), "何？", "猫。"), "no-image-placeholder", "no `<image>`");
}

#[test]
fn several_placeholders() {
    assert_left_out("several", &bad(Some("a.png"), "<image>\n何？<image>", "猫。"), "several-image-placeholders", "2 `<image>`");
}

#[test]
fn placeholder_without_image() {
    assert_left_out("placeholder-no-image", &bad(None, "<image>\n何？", "猫。"), "placeholder-without-image", "no `image` file");
}

#[test]
fn empty_conversation() {
    let line = json!({"id": "bad-one", "image": "a.png", "conversations": []}).to_string();
    assert_left_out("empty", &line, "empty-conversation", "empty");
}

#[test]
fn malformed_conversation() {
    let line = json!({"id": "bad-one", "conversations": [{"from": "ロボット", "value": "こんにちは"}, {"from": "システム", "value": "はい"}]});
    assert_left_out("speaker", &line.to_string(), "malformed-conversation", "unknown speaker `ロボット`");
    let line = json!({"id": "bad-one", "conversations": [{"from": "ユーザー", "value": 3}]});
    assert_left_out("value-type", &line.to_string(), "malformed-record", "conversations[0].value");
    let line = json!({"id": "bad-one", "conversations": "こんにちは"});
    assert_left_out("not-a-list", &line.to_string(), "malformed-record", "expected a list");
}

#[test]
fn longer_than_the_maximum_after_splicing() {
    let long_answer = "とても長い答えです。".repeat(20);
    assert_left_out("long", &bad(Some("a.png"), "<image>\n何？", &long_answer), "too-long", "more than the maximum length 96");
}

#[test]
fn malformed_json_line() {
    assert_left_out("json", r#"{"id": "bad-one", "conversations": [ "#, "malformed-json", "EOF");
}

#[test]
fn long_samples_are_cut_like_the_reference_when_asked() {
    let dir = workdir("truncate");
    let long_answer = "とても長い答えです。".repeat(20);
    let path = write_jsonl(&dir, &[qa("long", Some("a.png"), "<image>\n何？", &long_answer).to_string()]);
    let dataset = Arc::new(LlavaDataset::open(&[path], BadSamplePolicy::Fail).unwrap());
    let mut b = builder(&dir, Template::v1());
    b.truncate_long = true;
    let loader = DataLoader::new(dataset, Arc::new(b), LoaderConfig { shuffle: false, policy: BadSamplePolicy::Fail, ..Default::default() });
    let (batches, _) = all_batches(&loader, 0, 0);
    let e = &batches[0].examples[0];
    assert_eq!(e.input_ids.len(), 96, "text cut to max_length before splicing, as the reference's tokenizer call does");
    assert_eq!(e.labels.len(), 96);
}

fn many_records(dir: &Path, n: usize) -> PathBuf {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let answer = "はい。".repeat(1 + i % 7);
            if i % 3 == 0 {
                qa(&format!("s{i}"), None, &format!("質問{i}"), &answer).to_string()
            } else {
                let image = if i % 2 == 0 { "a.png" } else { "b.jpg" };
                qa(&format!("s{i}"), Some(image), &format!("<image>\n質問{i}"), &answer).to_string()
            }
        })
        .collect();
    write_jsonl(dir, &lines)
}

#[test]
fn order_is_fixed_by_the_seed_and_resuming_sees_the_same_batches() {
    let dir = workdir("order");
    let path = many_records(&dir, 23);
    let dataset = Arc::new(LlavaDataset::open(&[path], BadSamplePolicy::Fail).unwrap());
    let builder = Arc::new(builder(&dir, Template::v1()));
    let config = LoaderConfig { batch_size: 4, seed: 7, workers: 1, ..Default::default() };
    let one = DataLoader::new(dataset.clone(), builder.clone(), config.clone());
    let many = DataLoader::new(dataset.clone(), builder.clone(), LoaderConfig { workers: 4, prefetch_batches: 1, ..config.clone() });
    let (a, _) = all_batches(&one, 0, 0);
    let (b, _) = all_batches(&many, 0, 0);
    assert_eq!(ids(&a), ids(&b), "threads do not change the order");
    assert_eq!(a.iter().map(|x| x.pixel_values.clone()).collect::<Vec<_>>(), b.iter().map(|x| x.pixel_values.clone()).collect::<Vec<_>>());
    let mut sorted = ids(&a);
    sorted.sort();
    let mut all: Vec<String> = (0..23).map(|i| format!("s{i}")).collect();
    all.sort();
    assert_eq!(sorted, all, "an epoch visits every record once");
    assert_ne!(ids(&a), (0..23).map(|i| format!("s{i}")).collect::<Vec<_>>(), "shuffled");
    let (next_epoch, _) = all_batches(&one, 1, 0);
    assert_ne!(ids(&a), ids(&next_epoch), "each epoch has its own order");

    // Resuming after the second batch gives the rest of the epoch, batch for batch.
    let (rest, _) = all_batches(&many, 0, a[1].next_position);
    assert_eq!(ids(&rest), ids(&a[2..]));
    assert_eq!(rest.len(), a.len() - 2);

    // Dropping the iterator early stops the workers (the test would hang otherwise).
    let mut it = many.epoch(0, 0);
    assert!(it.next().unwrap().is_ok());
    drop(it);

    // Gathered ahead on a thread: the same batches; the report counts only those taken.
    let mut ahead = many.epoch(0, 0).prefetched(2);
    let prefetched: Vec<Batch> = ahead.by_ref().map(|b| b.unwrap()).collect();
    assert_eq!(ids(&prefetched), ids(&a));
    assert_eq!(ahead.finish().accepted, 23);
    let mut ahead = many.epoch(0, 0).prefetched(2);
    let taken: Vec<Batch> = ahead.by_ref().take(2).map(|b| b.unwrap()).collect();
    assert_eq!(ids(&taken), ids(&a[..2]));
    std::thread::sleep(std::time::Duration::from_millis(50)); // let the thread run ahead
    assert_eq!(ahead.finish().accepted, 8, "batches gathered ahead but not taken are not counted");
    let mut ahead = many.epoch(0, 0).prefetched(1);
    assert!(ahead.next().unwrap().is_ok());
    drop(ahead); // stops the thread and the workers (the test would hang otherwise)

    // With the pixels sent to the device a step ahead (the trainer's upload thread): the same
    // batches, each one's pixels on the device as they were gathered; the report counts only
    // the batches taken, not those gathered or uploaded ahead.
    #[cfg(feature = "flex")]
    {
        use llava_jp::train::device_batches::DeviceBatches;
        type F = burn::backend::Flex;
        use burn::backend::flex::FlexDevice;
        let mut uploaded = DeviceBatches::<F>::new(many.epoch(0, 0).prefetched(2), vec![FlexDevice, FlexDevice], 2, 16);
        let taken: Vec<_> = uploaded.by_ref().map(|b| b.unwrap()).collect();
        assert_eq!(taken.iter().map(|b| b.batch.examples.iter().map(|e| e.id.clone()).collect::<Vec<_>>()).collect::<Vec<_>>(), ids_per_batch(&a));
        for (got, want) in taken.iter().zip(&a) {
            assert!(got.batch.pixel_values.is_empty(), "the pixels left the batch");
            let on_device = got.pixels.as_ref().map(|p| p.clone().into_data().to_vec::<f32>().unwrap()).unwrap_or_default();
            assert_eq!(on_device, want.pixel_values);
        }
        assert_eq!(uploaded.finish().accepted, 23);
        let mut uploaded = DeviceBatches::<F>::new(many.epoch(0, 0).prefetched(2), vec![FlexDevice], 2, 16);
        assert!(uploaded.next().unwrap().is_ok());
        std::thread::sleep(std::time::Duration::from_millis(100)); // let both threads run ahead
        assert_eq!(uploaded.finish().accepted, 4, "batches uploaded ahead but not taken are not counted");
        let mut uploaded = DeviceBatches::<F>::new(many.epoch(0, 0).prefetched(1), vec![FlexDevice], 1, 16);
        assert!(uploaded.next().unwrap().is_ok());
        drop(uploaded); // stops both threads and the workers (the test would hang otherwise)
    }
}

#[cfg(feature = "flex")]
fn ids_per_batch(batches: &[Batch]) -> Vec<Vec<String>> {
    batches.iter().map(|b| b.examples.iter().map(|e| e.id.clone()).collect()).collect()
}

#[test]
fn length_grouping_keeps_one_modality_per_batch_and_similar_lengths() {
    let dir = workdir("group");
    let path = many_records(&dir, 200);
    let dataset = LlavaDataset::open(&[path], BadSamplePolicy::Fail).unwrap();
    let config = LoaderConfig { batch_size: 4, group_by_length: true, ..Default::default() };
    let order = epoch_order(&dataset, &config, 4, 0);
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, (0..200).collect::<Vec<_>>());
    let mut spread_grouped = 0;
    // 133 samples with an image and 67 without: the last two partial batches (1 + 3) come last
    // and share a chunk of the stream; every full batch is of one modality.
    let chunks: Vec<&[usize]> = order.chunks(4).collect();
    assert!(chunks.last().unwrap().iter().any(|&i| dataset.has_image(i)) && chunks.last().unwrap().iter().any(|&i| !dataset.has_image(i)));
    for batch in &chunks[..chunks.len() - 1] {
        let with_image: Vec<bool> = batch.iter().map(|&i| dataset.has_image(i)).collect();
        assert!(with_image.iter().all(|&m| m == with_image[0]), "one modality per batch: {batch:?}");
        let lengths: Vec<usize> = batch.iter().map(|&i| dataset.length_estimate(i, 4)).collect();
        spread_grouped += lengths.iter().max().unwrap() - lengths.iter().min().unwrap();
    }
    let plain = epoch_order(&dataset, &LoaderConfig { batch_size: 4, ..Default::default() }, 4, 0);
    let spread_plain: usize = plain
        .chunks(4)
        .map(|b| {
            let l: Vec<usize> = b.iter().map(|&i| dataset.length_estimate(i, 4)).collect();
            l.iter().max().unwrap() - l.iter().min().unwrap()
        })
        .sum();
    assert!(spread_grouped * 4 < spread_plain, "grouped batches waste less: {spread_grouped} vs {spread_plain}");
}

#[test]
fn collation_pads_on_either_side_with_the_mask_from_lengths() {
    let dir = workdir("collate");
    let lines: Vec<String> = good_lines().iter().map(|v| v.to_string()).collect();
    let dataset = Arc::new(LlavaDataset::open(&[write_jsonl(&dir, &lines)], BadSamplePolicy::Fail).unwrap());
    let loader = DataLoader::new(dataset, Arc::new(builder(&dir, Template::v1())), LoaderConfig { batch_size: 3, shuffle: false, ..Default::default() });
    let (batches, _) = all_batches(&loader, 0, 0);
    let batch = &batches[0];
    let lens: Vec<usize> = batch.examples.iter().map(|e| e.input_ids.len()).collect();
    let width = *lens.iter().max().unwrap();
    for pad_left in [false, true] {
        let p = batch.padded(1000, 0, pad_left);
        assert_eq!(p.width, width);
        for (k, e) in batch.examples.iter().enumerate() {
            let pad = width - lens[k];
            let (real, fill) = if pad_left { (pad..width, 0..pad) } else { (0..lens[k], lens[k]..width) };
            assert_eq!(&p.input_ids[k][real.clone()], &e.input_ids[..]);
            assert_eq!(&p.labels[k][real.clone()], &e.labels[..]);
            assert!(p.input_ids[k][fill.clone()].iter().all(|&i| i == 0));
            assert!(p.labels[k][fill.clone()].iter().all(|&l| l == -100));
            assert!(real.clone().all(|j| p.attention_mask[k][j]) && fill.clone().all(|j| !p.attention_mask[k][j]));
        }
    }
    let cut = batch.padded(10, 0, false);
    assert_eq!(cut.width, 10);
    assert!(cut.input_ids.iter().all(|r| r.len() == 10));
}

#[test]
fn stair_captions_convert_to_plain_samples() {
    let dir = workdir("stair");
    let coco = json!({
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.jpg"}, {"id": 3, "file_name": "gone.jpg"}],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "赤い四角がある。"},
            {"id": 11, "image_id": 2, "caption": " 青い丸が二つある。 "},
            {"id": 12, "image_id": 9, "caption": "存在しない画像"},
            {"id": 13, "image_id": 1, "caption": ""},
            {"id": 14, "image_id": 3, "caption": "画像ファイルがない"}
        ]
    });
    let input = dir.join("stair.json");
    std::fs::write(&input, coco.to_string()).unwrap();
    let options = ConvertOptions { image_prefix: String::new(), check_images_in: Some(dir.join("images")) };
    let (records, report) = stair_captions(&input, &options, "画像を簡潔に説明してください。").unwrap();
    assert_eq!(records.len(), 2);
    assert_eq!(records[1].id, "11");
    assert_eq!(records[1].image.as_deref(), Some("b.jpg"));
    assert_eq!(
        records[1].conversations,
        [
            Turn { from: "ユーザー".into(), value: "<image>\n画像を簡潔に説明してください。".into() },
            Turn { from: "システム".into(), value: "青い丸が二つある。".into() }
        ]
    );
    assert_eq!((report.accepted, report.rejected()), (2, 3));
    assert_eq!(report.counts.get("missing-image"), Some(&1));
    assert!(report.rejections.iter().any(|r| r.id == "12" && r.to_string().contains("image_id 9")));

    // The output is a data file the loader reads with the stage-1 template.
    let out = dir.join("out/stair.jsonl");
    write_records(&out, &records).unwrap();
    let dataset = Arc::new(LlavaDataset::open(&[out], BadSamplePolicy::Fail).unwrap());
    let loader = DataLoader::new(dataset, Arc::new(builder(&dir, Template::plain())), LoaderConfig { batch_size: 2, policy: BadSamplePolicy::Fail, ..Default::default() });
    let (batches, report) = all_batches(&loader, 0, 0);
    assert_eq!((report.accepted, batches[0].images), (2, 2));
    let tok = tokenizer();
    let e = batches[0].examples.iter().find(|e| e.id == "10").unwrap();
    let caption = tok.decode(&e.labels.iter().copied().filter(|&l| l >= 0).collect::<Vec<_>>()).unwrap();
    assert_eq!(caption.trim(), "赤い四角がある。", "stage 1 trains on the caption only");
}

#[test]
fn ja_vg_vqa_converts_to_v1_samples() {
    let dir = workdir("vg");
    let qas = json!([
        {"id": 1, "qas": [
            {"qa_id": 100, "image_id": 1, "question": "何色？", "answer": "赤。"},
            {"qa_id": 101, "image_id": 1, "question": "いくつ？", "answer": "二つ。"},
            {"qa_id": 102, "image_id": 1, "question": "", "answer": "空の質問"}
        ]},
        {"id": 2, "qas": [{"qa_id": 200, "image_id": 2, "question": "どこ？", "answer": "左。"}]},
        {"id": 3}
    ]);
    let input = dir.join("question_answers.json");
    std::fs::write(&input, qas.to_string()).unwrap();
    let options = ConvertOptions { image_prefix: "VG_100K/".into(), check_images_in: None };
    let (records, report) = ja_vg_vqa(&input, &options, 1).unwrap();
    assert_eq!(records.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["1-100", "1-101", "2-200"]);
    assert_eq!(records[0].image.as_deref(), Some("VG_100K/1.jpg"));
    assert_eq!(records[1].conversations[0].value, "<image>\nいくつ？");
    assert_eq!((report.accepted, report.rejected()), (3, 2));
    assert!(report.rejections.iter().any(|r| r.id == "102" && r.to_string().contains("question")));

    let (records, _) = ja_vg_vqa(&input, &options, 5).unwrap();
    assert_eq!(records.len(), 2);
    let turns: Vec<&str> = records[0].conversations.iter().map(|t| t.value.as_str()).collect();
    assert_eq!(turns, ["<image>\n何色？", "赤。", "いくつ？", "二つ。"]);

    // Multi-turn records make samples with one image and two trained answers.
    let out = dir.join("vg.json");
    write_records(&out, &records).unwrap();
    std::fs::create_dir_all(dir.join("images/VG_100K")).unwrap();
    std::fs::copy(dir.join("images/b.jpg"), dir.join("images/VG_100K/1.jpg")).unwrap();
    std::fs::copy(dir.join("images/a.png"), dir.join("images/VG_100K/2.jpg")).unwrap();
    let dataset = Arc::new(LlavaDataset::open(&[out], BadSamplePolicy::Fail).unwrap());
    let loader = DataLoader::new(dataset, Arc::new(builder(&dir, Template::v1())), LoaderConfig { batch_size: 2, shuffle: false, policy: BadSamplePolicy::Fail, ..Default::default() });
    let (batches, _) = all_batches(&loader, 0, 0);
    let e = &batches[0].examples[0];
    let tok = tokenizer();
    let trained: Vec<i64> = e.labels.iter().copied().filter(|&l| l >= 0).collect();
    assert_eq!(tok.decode(&trained).unwrap().replace(' ', ""), "赤。二つ。");
}

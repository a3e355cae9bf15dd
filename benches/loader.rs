//! Loader throughput: JPEG file to normalised CLIP pixels (`[3, 336, 336]`), on one core and
//! through the threaded loader on all cores, beside the same work in Python (PIL +
//! transformers' PIL-based CLIP image processor, `model-import/scripts/bench_loader.py`) in the
//! same run.
//!
//!     cargo bench --bench loader [-- --seconds 5 --size 336 IMAGE...]
//!
//! Images default to the shared photographs (`../shared/reference/images/*.jpg`).
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use llava_jp::data::{
    AspectMode, BadSamplePolicy, DataLoader, ImageProcessor, LlavaDataset, LoaderConfig, Record, SampleBuilder, Template, TextTokenizer, Turn,
};

fn main() {
    let mut seconds = 5.0f64;
    let mut size = 336usize;
    let mut images: Vec<PathBuf> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => seconds = args.next().and_then(|s| s.parse().ok()).expect("--seconds N"),
            "--size" => size = args.next().and_then(|s| s.parse().ok()).expect("--size N"),
            "--bench" => {}
            other => images.push(other.into()),
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if images.is_empty() {
        let dir = root.join("../shared/reference/images");
        images = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (pass image paths)", dir.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("jpg") || e.eq_ignore_ascii_case("jpeg")))
            .collect();
        images.sort();
    }
    assert!(!images.is_empty(), "no images to read");
    let processor = ImageProcessor::clip(size, AspectMode::Square);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("loader benchmark: {} JPEGs -> [3, {size}, {size}] f32, {cores} cores", images.len());
    for p in &images {
        let img = ImageProcessor::open(p).unwrap();
        println!("  {} ({}x{})", p.display(), img.width(), img.height());
    }

    // One core: decode + resize + normalise, and the decode alone.
    let (mut done, mut decode_s) = (0usize, 0f64);
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds {
        for p in &images {
            let t = Instant::now();
            let img = ImageProcessor::open(p).unwrap();
            decode_s += t.elapsed().as_secs_f64();
            std::hint::black_box(processor.preprocess(&img));
            done += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let ours = done as f64 / elapsed;

    // All cores through the loader (tokenizing a short conversation as well, when the tokenizer
    // is there, as in training).
    let tokenizer_path = root.join("../shared/reference/llm-jp-tokenizer-v2.1/tokenizer.json");
    let loader_rate = |workers: usize| TextTokenizer::from_file(&tokenizer_path).ok().map(|tokenizer| {
        let per_pass = images.len();
        let passes = ((ours * seconds * workers as f64) as usize / per_pass).max(2);
        let mut dataset = LlavaDataset::default();
        for i in 0..passes * per_pass {
            let path = &images[i % per_pass];
            dataset.records.push(Record {
                id: i.to_string(),
                image: Some(path.display().to_string()),
                conversations: vec![
                    Turn { from: "ユーザー".into(), value: "<image>\nこの写真には何が写っていますか？".into() },
                    Turn { from: "システム".into(), value: "街の風景が写っています。".into() },
                ],
            });
            dataset.origins.push(llava_jp::data::dataset::Origin { file: "bench".into(), line: None, index: Some(i) });
        }
        let builder = SampleBuilder {
            tokenizer,
            template: Template::v1(),
            image_processor: processor.clone(),
            image_folder: PathBuf::from("/"),
            max_length: 4096,
            image_tokens: 576,
            truncate_long: false,
        };
        let config = LoaderConfig { batch_size: 8, workers, policy: BadSamplePolicy::Fail, ..Default::default() };
        let loader = DataLoader::new(Arc::new(dataset), Arc::new(builder), config);
        let start = Instant::now();
        let n: usize = loader.epoch(0, 0).map(|b| b.unwrap().len()).sum();
        n as f64 / start.elapsed().as_secs_f64()
    });

    // Python, same images, same size, one core.
    let script = root.join("model-import/scripts/bench_loader.py");
    let python = std::process::Command::new("python3")
        .arg(&script)
        .args(["--size", &size.to_string(), "--seconds", &seconds.to_string()])
        .args(&images)
        .output();
    let py: Option<(f64, String)> = match python {
        Ok(out) if out.status.success() => {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the script prints JSON");
            Some((v["images_per_s"].as_f64().unwrap(), v["processor"].as_str().unwrap_or("?").to_string()))
        }
        Ok(out) => {
            eprintln!("python side failed: {}", String::from_utf8_lossy(&out.stderr));
            None
        }
        Err(e) => {
            eprintln!("python3 not runnable: {e}");
            None
        }
    };

    println!();
    println!("| work | images/s | ms/image |");
    println!("|---|---|---|");
    println!("| ours, 1 core (decode {:.1} ms + resize/normalise {:.1} ms) | {ours:.1} | {:.2} |", 1e3 * decode_s / done as f64, 1e3 * (elapsed - decode_s) / done as f64, 1e3 / ours);
    if let Some((rate, processor)) = &py {
        println!("| Python PIL + {processor}, 1 core | {rate:.1} | {:.2} |", 1e3 / rate);
    }
    for workers in [1, cores] {
        match loader_rate(workers) {
            Some(rate) => println!("| ours, loader with {workers} worker thread(s) (+ tokenizing) | {rate:.1} | {:.2} |", 1e3 / rate),
            None => println!("| ours, loader | (skipped: no tokenizer at {}) | |", tokenizer_path.display()),
        }
    }
    if let Some((rate, _)) = py {
        println!("\nper core, ours / Python: {:.2}x", ours / rate);
    }
}

//! Image preprocessing against transformers' PIL-based CLIP image processor
//! (`model-import/scripts/make_image_fixtures.py` -> `tests/fixtures/images/`).
use std::path::{Path, PathBuf};

use llava_jp::data::image::{expand_to_square, resize_bicubic};
use llava_jp::data::{AspectMode, ImageProcessor};
use llava_jp::parity::Tensors;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images")
}

/// The photographs live beside the checkout (`../shared/reference/images`), not in it.
fn photo(file: &str) -> PathBuf {
    let dir = std::env::var_os("LLAVA_JP_IMAGES").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/reference/images")
    });
    let path = dir.join(file);
    assert!(path.exists(), "reference photograph {} is missing (set LLAVA_JP_IMAGES)", path.display());
    path
}

fn diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let max = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let mean = a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
    (max, mean)
}

#[test]
fn pixels_match_transformers_clip_processor() {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("images.json")).unwrap()).unwrap();
    let expected = Tensors::open(&fixtures().join("pixels.safetensors")).unwrap();
    let size = meta["size"].as_u64().unwrap() as usize;
    for image in meta["images"].as_array().unwrap() {
        let name = image["name"].as_str().unwrap();
        let file = image["file"].as_str().unwrap();
        // Committed: the synthetic PNG and two of scikit-image's sample images (CC0 / public
        // domain, see SOURCES.md there); the photographs are read from ../shared.
        let path = if fixtures().join(file).exists() { fixtures().join(file) } else { photo(file) };
        let rgb = ImageProcessor::open(&path).unwrap();
        for (mode, label) in [(AspectMode::Square, "square"), (AspectMode::Pad, "pad")] {
            let ours = ImageProcessor::clip(size, mode).preprocess(&rgb);
            let (max, mean) = diff(&ours, &expected.f32(&format!("{name}.{label}")).unwrap());
            println!("{name} {label}: max {max:.4} mean {mean:.5}");
            if file.ends_with(".png") {
                // Same decoded bytes: PIL's resampler is reproduced exactly.
                assert!(max < 1e-6, "{name} {label}: max {max}");
            } else {
                // JPEG decoders differ by a few levels (image crate vs libjpeg).
                assert!(mean < 0.01 && max < 0.1, "{name} {label}: max {max}, mean {mean}");
            }
        }
    }
}

#[test]
fn resize_keeps_a_flat_image_flat_and_pads_with_the_mean_colour() {
    let flat = image::RgbImage::from_pixel(37, 11, image::Rgb([10, 200, 77]));
    let out = resize_bicubic(&flat, 16, 16);
    assert!(out.pixels().all(|p| p.0 == [10, 200, 77]));
    let padded = expand_to_square(&flat, ImageProcessor::clip(16, AspectMode::Pad).background());
    assert_eq!(padded.dimensions(), (37, 37));
    assert_eq!(padded.get_pixel(0, 0).0, [122, 116, 104], "LLaVA's mean colour");
    assert_eq!(padded.get_pixel(0, 13).0, [10, 200, 77], "image centred vertically");
}

#[test]
fn unreadable_images_are_errors_that_name_the_file() {
    let err = ImageProcessor::open("tests/fixtures/images/no-such.jpg").unwrap_err().to_string();
    assert!(err.contains("no-such.jpg"), "{err}");
    let dir = std::env::temp_dir().join(format!("llava-jp-img-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bytes = std::fs::read(photo("cat-laptop.jpg")).unwrap();
    let truncated = dir.join("truncated.jpg");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let not_an_image = dir.join("text.png");
    std::fs::write(&not_an_image, b"this is not a PNG").unwrap();
    for path in [truncated, not_an_image] {
        let err = ImageProcessor::open(&path).unwrap_err().to_string();
        assert!(err.contains(path.file_name().unwrap().to_str().unwrap()), "{err}");
    }
    std::fs::remove_dir_all(dir).ok();
}

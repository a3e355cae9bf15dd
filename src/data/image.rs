//! Image preprocessing as transformers' (PIL-based) `CLIPImageProcessor` does it for LLaVA-JP:
//! open as RGB, optionally pad to a square with the mean colour (`image_aspect_ratio = pad`),
//! resize to the tower's size with PIL's bicubic filter, rescale by 1/255, normalise.
//!
//! The resize is a port of PIL's `ImagingResample` on 8-bit pixels (separable convolution whose
//! support widens when shrinking, fixed-point coefficients, horizontal pass first), so that
//! from the same decoded pixels it gives PIL's bytes exactly.

use std::path::Path;

use image::RgbImage;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: cannot read image: {message}")]
    Read { path: String, message: String },
    #[error("{path}: {message}")]
    Config { path: String, message: String },
}

/// How an image is brought to the tower's input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AspectMode {
    /// Resize to exactly the tower's size, aspect ratio not kept (LLaVA-JP's scripts).
    Square,
    /// Pad to a square with the mean colour first (LLaVA's `expand2square`), then resize.
    Pad,
}

impl AspectMode {
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "square" => Ok(Self::Square),
            "pad" => Ok(Self::Pad),
            _ => Err(format!("unknown image_aspect_ratio `{name}`: expected square or pad")),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    /// Output height and width.
    pub size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub mode: AspectMode,
}

/// OpenAI CLIP's normalisation, which every CLIP tower of the reference uses.
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

impl ImageProcessor {
    pub fn clip(size: usize, mode: AspectMode) -> Self {
        Self { size, mean: CLIP_MEAN, std: CLIP_STD, mode }
    }

    /// From an HF `preprocessor_config.json`: `crop_size` (or `size`) and `image_mean` /
    /// `image_std`.
    pub fn from_file(path: impl AsRef<Path>, mode: AspectMode) -> Result<Self, ImageError> {
        let path = path.as_ref();
        let err = |message: String| ImageError::Config { path: path.display().to_string(), message };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        let side = |v: &serde_json::Value| -> Option<usize> {
            v.as_u64().or_else(|| v.get("height").and_then(|h| h.as_u64())).or_else(|| v.get("shortest_edge").and_then(|h| h.as_u64())).map(|n| n as usize)
        };
        let size = json.get("crop_size").and_then(side).or_else(|| json.get("size").and_then(side)).ok_or_else(|| err("no `crop_size` or `size`".into()))?;
        let triple = |key: &str, default: [f32; 3]| -> Result<[f32; 3], ImageError> {
            match json.get(key) {
                None => Ok(default),
                Some(v) => serde_json::from_value::<[f32; 3]>(v.clone()).map_err(|_| err(format!("`{key}` is not three numbers"))),
            }
        };
        Ok(Self { size, mean: triple("image_mean", CLIP_MEAN)?, std: triple("image_std", CLIP_STD)?, mode })
    }

    /// The colour `pad` fills with: the mean as 8-bit values, truncated as the reference does.
    pub fn background(&self) -> [u8; 3] {
        self.mean.map(|m| (m * 255.0) as u8)
    }

    /// Decodes a file as RGB (alpha dropped, grey replicated, as PIL's `convert("RGB")`).
    /// A truncated JPEG is an error: the decoder would fill the missing rows with grey.
    pub fn open(path: impl AsRef<Path>) -> Result<RgbImage, ImageError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| ImageError::Read { path: path.display().to_string(), message: e.to_string() })?;
        Self::decode(&bytes, &path.display().to_string())
    }

    /// [`open`](Self::open) for bytes in memory; `name` says where they came from in errors.
    pub fn decode(bytes: &[u8], name: &str) -> Result<RgbImage, ImageError> {
        let err = |message: String| ImageError::Read { path: name.to_string(), message };
        if bytes.starts_with(&[0xFF, 0xD8]) && !jpeg_is_complete(bytes) {
            return Err(err("truncated JPEG: no end-of-image marker after the scan data".into()));
        }
        let decoded = image::load_from_memory(bytes).map_err(|e| err(e.to_string()))?;
        Ok(decoded.to_rgb8())
    }

    /// `[3, size, size]` normalised pixels, channel-major.
    pub fn preprocess(&self, img: &RgbImage) -> Vec<f32> {
        let padded;
        let img = match self.mode {
            AspectMode::Square => img,
            AspectMode::Pad => {
                padded = expand_to_square(img, self.background());
                &padded
            }
        };
        let resized = resize_bicubic(img, self.size, self.size);
        let plane = self.size * self.size;
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in resized.pixels().enumerate() {
            for c in 0..3 {
                // transformers: rescale (x * 1/255) then (x - mean) / std, in float32.
                let x = px[c] as f32 * (1.0 / 255.0);
                out[c * plane + i] = (x - self.mean[c]) / self.std[c];
            }
        }
        out
    }
}

/// Whether a JPEG's last scan (`FF DA`) is followed by an end-of-image marker (`FF D9`). Inside
/// entropy-coded data `FF` is always stuffed, so neither marker can appear there by chance.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last_scan = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
    let last_end = bytes.windows(2).rposition(|w| w == [0xFF, 0xD9]);
    matches!((last_scan, last_end), (Some(scan), Some(end)) if end > scan)
}

/// LLaVA's `expand2square`: the image centred on a square of its longer side.
pub fn expand_to_square(img: &RgbImage, background: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == h {
        return img.clone();
    }
    let side = w.max(h);
    let mut out = RgbImage::from_pixel(side, side, image::Rgb(background));
    let (x0, y0) = if w > h { (0, (w - h) / 2) } else { ((h - w) / 2, 0) };
    image::imageops::replace(&mut out, img, i64::from(x0), i64::from(y0));
    out
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc`: for each output index, the first input
/// index and the fixed-point weights of the inputs it reads.
fn coefficients(in_size: usize, out_size: usize) -> (Vec<(usize, usize)>, Vec<i32>, usize) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let k: Vec<f64> = (0..xmax).map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
        let total: f64 = k.iter().sum();
        for (x, w) in k.iter().enumerate() {
            let w = if total != 0.0 { w / total } else { *w };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            weights[xx * ksize + x] = if w < 0.0 { (-0.5 + fixed) as i32 } else { (0.5 + fixed) as i32 };
        }
        bounds.push((xmin, xmax));
    }
    (bounds, weights, ksize)
}

fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// PIL's `Image.resize(size, Image.BICUBIC)` on RGB bytes. Sums are in i32 as in PIL (the
/// weights add up to 2^22, so they cannot overflow); the vertical pass runs over whole rows so
/// that the compiler can vectorise it.
pub fn resize_bicubic(img: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let src = img.as_raw();
    const HALF: i32 = 1 << (PRECISION_BITS - 1);
    // Horizontal pass (skipped when the width does not change, as PIL does).
    let (hw, horizontal): (usize, Vec<u8>) = if in_w == out_w {
        (in_w, src.clone())
    } else {
        let (bounds, k, ksize) = coefficients(in_w, out_w);
        let mut out = vec![0u8; out_w * in_h * 3];
        for (src_row, out_row) in src.chunks_exact(in_w * 3).zip(out.chunks_exact_mut(out_w * 3)) {
            for (xx, &(xmin, xmax)) in bounds.iter().enumerate() {
                let w = &k[xx * ksize..xx * ksize + xmax];
                let px = &src_row[xmin * 3..(xmin + xmax) * 3];
                let (mut r, mut g, mut b) = (HALF, HALF, HALF);
                for (p, &wx) in px.chunks_exact(3).zip(w) {
                    r += i32::from(p[0]) * wx;
                    g += i32::from(p[1]) * wx;
                    b += i32::from(p[2]) * wx;
                }
                out_row[xx * 3..xx * 3 + 3].copy_from_slice(&[clip8(r), clip8(g), clip8(b)]);
            }
        }
        (out_w, out)
    };
    // Vertical pass.
    let result = if in_h == out_h {
        horizontal
    } else {
        let (bounds, k, ksize) = coefficients(in_h, out_h);
        let row = hw * 3;
        let mut out = vec![0u8; row * out_h];
        let mut acc = vec![0i32; row];
        for (yy, &(ymin, ymax)) in bounds.iter().enumerate() {
            acc.fill(HALF);
            for (y, &wy) in k[yy * ksize..yy * ksize + ymax].iter().enumerate() {
                let src_row = &horizontal[(ymin + y) * row..(ymin + y + 1) * row];
                for (a, &p) in acc.iter_mut().zip(src_row) {
                    *a += i32::from(p) * wy;
                }
            }
            for (o, &a) in out[yy * row..(yy + 1) * row].iter_mut().zip(&acc) {
                *o = clip8(a);
            }
        }
        out
    };
    RgbImage::from_raw(out_w as u32, out_h as u32, result).expect("buffer of the right size")
}

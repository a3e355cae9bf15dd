//! The loss / learning-rate plot of a run (`loss.png`): two panels over the optimizer steps, the
//! raw loss in a light line and its moving average in a dark one, with labelled axes. Drawn with
//! the `image` crate and a small built-in bitmap font, so no plotting or font stack is needed.

use std::path::Path;

use image::{Rgb, RgbImage};

use super::trainer::StepMetrics;

const W: u32 = 960;
const H: u32 = 640;
const BG: Rgb<u8> = Rgb([255, 255, 255]);
const AXIS: Rgb<u8> = Rgb([40, 40, 40]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const RAW: Rgb<u8> = Rgb([160, 190, 235]);
const SMOOTH: Rgb<u8> = Rgb([20, 70, 170]);
const LR: Rgb<u8> = Rgb([200, 90, 20]);

/// 5x7 glyphs, one byte per row, the low 5 bits left to right.
fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        'e' => [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'o' => [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        's' => [0x00, 0x00, 0x0F, 0x10, 0x0E, 0x01, 0x1E],
        'r' => [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'p' => [0x00, 0x00, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'a' => [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'v' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'g' => [0x00, 0x00, 0x0F, 0x11, 0x0F, 0x01, 0x0E],
        'n' => [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11],
        'i' => [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        _ => [0; 7],
    }
}

fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, scale: i64, colour: Rgb<u8>) {
    for (i, c) in s.chars().enumerate() {
        let g = glyph(c);
        for (row, bits) in g.iter().enumerate() {
            for col in 0..5 {
                if bits & (0x10 >> col) != 0 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            put(img, x + (i as i64 * 6 + col) * scale + dx, y + row as i64 * scale + dy, colour);
                        }
                    }
                }
            }
        }
    }
}

fn text_width(s: &str, scale: i64) -> i64 {
    s.chars().count() as i64 * 6 * scale
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb<u8>, thick: i64) {
    let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as i64).max(1);
    for i in 0..=steps {
        let t = i as f64 / steps as f64;
        let (x, y) = ((x0 + (x1 - x0) * t).round() as i64, (y0 + (y1 - y0) * t).round() as i64);
        for d in 0..thick {
            put(img, x, y + d, c);
            put(img, x + d, y, c);
        }
    }
}

fn label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() < 1e-2 || v.abs() >= 1e4 {
        format!("{v:.1e}")
    } else {
        format!("{v:.3}")
    }
}

/// One panel: the series over steps, with y-axis ticks and grid.
fn panel(img: &mut RgbImage, top: i64, height: i64, title: &str, series: &[(&[(f64, f64)], Rgb<u8>, i64)], max_step: f64) {
    let (left, right) = (90i64, W as i64 - 20);
    let (plot_top, plot_bottom) = (top + 28, top + height - 30);
    let ys = series.iter().flat_map(|(s, _, _)| s.iter().map(|p| p.1)).filter(|v| v.is_finite());
    let (mut lo, mut hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        hi = lo + 1e-12_f64.max(lo.abs() * 0.1);
    }
    let x_of = |s: f64| left as f64 + (s / max_step.max(1.0)) * (right - left) as f64;
    let y_of = |v: f64| plot_bottom as f64 - (v - lo) / (hi - lo) * (plot_bottom - plot_top) as f64;
    text(img, left, top + 6, title, 2, AXIS);
    for k in 0..=4 {
        let v = lo + (hi - lo) * k as f64 / 4.0;
        let y = y_of(v);
        line(img, (left as f64, y), (right as f64, y), GRID, 1);
        let l = label(v);
        text(img, left - 8 - text_width(&l, 1), y as i64 - 3, &l, 1, AXIS);
    }
    for k in 0..=5 {
        let s = max_step * k as f64 / 5.0;
        let x = x_of(s);
        line(img, (x, plot_top as f64), (x, plot_bottom as f64), GRID, 1);
        let l = format!("{}", s.round() as u64);
        text(img, x as i64 - text_width(&l, 1) / 2, plot_bottom + 8, &l, 1, AXIS);
    }
    line(img, (left as f64, plot_top as f64), (left as f64, plot_bottom as f64), AXIS, 1);
    line(img, (left as f64, plot_bottom as f64), (right as f64, plot_bottom as f64), AXIS, 1);
    for (points, colour, thick) in series {
        let finite: Vec<&(f64, f64)> = points.iter().filter(|p| p.1.is_finite()).collect();
        if finite.len() == 1 {
            line(img, (x_of(finite[0].0) - 2.0, y_of(finite[0].1)), (x_of(finite[0].0) + 2.0, y_of(finite[0].1)), *colour, 3);
        }
        for w in finite.windows(2) {
            line(img, (x_of(w[0].0), y_of(w[0].1)), (x_of(w[1].0), y_of(w[1].1)), *colour, *thick);
        }
    }
}

/// Draws the plot of `metrics` into a PNG at `path` (written through a temporary file).
pub fn plot_metrics(metrics: &[StepMetrics], path: &Path) -> anyhow::Result<()> {
    let mut img = RgbImage::from_pixel(W, H, BG);
    let max_step = metrics.last().map_or(1.0, |m| m.step as f64);
    let loss: Vec<(f64, f64)> = metrics.iter().map(|m| (m.step as f64, m.loss)).collect();
    // Exponential moving average, as training dashboards smooth the loss.
    let alpha = 2.0 / (1.0 + (metrics.len() as f64 / 20.0).max(1.0) * 2.0);
    let mut ema: Option<f64> = None;
    let smooth: Vec<(f64, f64)> = loss
        .iter()
        .map(|&(s, v)| {
            if v.is_finite() {
                ema = Some(ema.map_or(v, |e| e + alpha * (v - e)));
            }
            (s, ema.unwrap_or(f64::NAN))
        })
        .collect();
    let lr: Vec<(f64, f64)> = metrics.iter().map(|m| (m.step as f64, m.lr)).collect();
    panel(&mut img, 0, H as i64 * 3 / 5, "loss", &[(&loss, RAW, 1), (&smooth, SMOOTH, 2)], max_step);
    panel(&mut img, H as i64 * 3 / 5, H as i64 * 2 / 5, "lr", &[(&lr, LR, 2)], max_step);
    text(&mut img, W as i64 / 2 - text_width("step", 1) / 2, H as i64 - 12, "step", 1, AXIS);
    let tmp = path.with_extension("png.partial");
    img.save_with_format(&tmp, image::ImageFormat::Png)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The plot of a `metrics.jsonl` file (for a run in progress or finished).
pub fn plot_metrics_file(metrics: &Path, out: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(metrics).map_err(|e| anyhow::anyhow!("{}: {e}", metrics.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        rows.push(serde_json::from_str::<StepMetrics>(line).map_err(|e| anyhow::anyhow!("{}:{}: {e}", metrics.display(), i + 1))?);
    }
    anyhow::ensure!(!rows.is_empty(), "{}: no steps yet", metrics.display());
    plot_metrics(&rows, out)
}

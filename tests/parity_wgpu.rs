//! Parity with transformers on the wgpu backend (f32; lavapipe on a CPU-only machine).
mod common;

use burn::backend::wgpu::WgpuDevice;
type B = burn::backend::Wgpu<f32>;

#[test]
fn clip_matches_transformers() {
    common::clip_matches_transformers::<B>(&WgpuDevice::default());
}

#[test]
fn gpt2_matches_transformers() {
    common::gpt2_matches_transformers::<B>(&WgpuDevice::default());
}

#[test]
fn gpt2_untied_gelu_new_matches_transformers() {
    common::gpt2_untied_gelu_new_matches_transformers::<B>(&WgpuDevice::default());
}

#[test]
fn llava_matches_transformers() {
    common::llava_matches_transformers::<B>(&WgpuDevice::default());
}

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

/// An export (f16 weights) answers on wgpu exactly as on the CPU backend.
#[test]
fn export_loads_on_wgpu_with_the_cpu_answer() {
    use burn::backend::flex::FlexDevice;
    use llava_jp::infer::{export, Assistant, LoadOptions};
    let dir = common::tiny_model_dir("wgpu", true);
    let assistant = Assistant::<burn::backend::Flex>::load(&dir, &LoadOptions::default(), &FlexDevice).unwrap();
    let out = dir.with_extension("export");
    export(&assistant, &out, burn::tensor::DType::F16).unwrap();
    let cpu = common::greedy_answer::<burn::backend::Flex>(&out, &FlexDevice);
    let gpu = common::greedy_answer::<B>(&out, &WgpuDevice::default());
    println!("cpu {cpu:?}\nwgpu {gpu:?}");
    assert_eq!(cpu.0.len(), 8);
    assert_eq!(cpu, gpu);
}

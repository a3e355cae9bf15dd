//! Parity with transformers on the CPU backend (burn-flex, f32).
mod common;

use burn::backend::flex::FlexDevice;
type B = burn::backend::Flex<f32>;

#[test]
fn clip_matches_transformers() {
    common::clip_matches_transformers::<B>(&FlexDevice);
}

#[test]
fn gpt2_matches_transformers() {
    common::gpt2_matches_transformers::<B>(&FlexDevice);
}

#[test]
fn gpt2_untied_gelu_new_matches_transformers() {
    common::gpt2_untied_gelu_new_matches_transformers::<B>(&FlexDevice);
}

#[test]
fn llava_matches_transformers() {
    common::llava_matches_transformers::<B>(&FlexDevice);
}

#[test]
fn import_errors_name_key_file_and_shapes() {
    common::import_errors_name_key_file_and_shapes::<B>(&FlexDevice);
}

#[test]
fn half_precision_checkpoints_load_into_f32() {
    common::half_precision_checkpoints_load_into_f32::<B>(&FlexDevice);
}

#[test]
fn sharded_checkpoints_load() {
    common::sharded_checkpoints_load::<B>(&FlexDevice);
}

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

/// Dropout (embeddings, attention probabilities, residuals: 0.1 each in GPT-2) acts while
/// training on an autodiff backend and never in inference.
#[test]
fn dropout_is_active_only_in_training() {
    use burn::backend::Autodiff;
    use burn::module::AutodiffModule;
    use burn::prelude::*;
    use llava_jp::parity::to_f32;
    use llava_jp::weights::load_gpt2;

    fn logits<Bk: Backend>(model: &llava_jp::model::Gpt2LmHeadModel<Bk>, device: &Bk::Device) -> Vec<f32> {
        let ids = Tensor::<Bk, 2, Int>::from_data(TensorData::new(vec![8i64, 20, 31, 9, 77, 12], [1, 6]), device);
        let pos = Tensor::<Bk, 2, Int>::from_data(TensorData::new((0..6i64).collect::<Vec<_>>(), [1, 6]), device);
        let valid = Tensor::<Bk, 2, Bool>::from_data(TensorData::new(vec![true; 6], [1, 6]), device);
        to_f32(model.forward(ids, pos, valid, None))
    }
    let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);

    let (train, _, _) = load_gpt2::<Autodiff<B>>(&common::fixture("gpt2"), &FlexDevice).unwrap();
    let (a, b) = (logits(&train, &FlexDevice), logits(&train, &FlexDevice));
    assert!(max_diff(&a, &b) > 1e-3, "two training forwards should differ under dropout");

    let eval = train.valid();
    let (c, d) = (logits(&eval, &FlexDevice), logits(&eval, &FlexDevice));
    assert_eq!(c, d, "inference is deterministic");
    let (plain, _, _) = load_gpt2::<B>(&common::fixture("gpt2"), &FlexDevice).unwrap();
    assert!(max_diff(&c, &logits(&plain, &FlexDevice)) < 1e-6);
}

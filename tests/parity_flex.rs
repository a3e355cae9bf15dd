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

/// Projectors from stored files: a `linear` one (`model.mm_projector.weight`) and an
/// `mlp3x_gelu` one (`model.mm_projector.{0,2,4}`), checked against arithmetic done here by hand.
#[test]
fn projectors_load_and_compute_as_pytorch() {
    use burn::prelude::*;
    use llava_jp::model::{Projector, ProjectorKind};
    use llava_jp::parity::to_f32;
    use llava_jp::weights::load_projector;

    let dir = std::env::temp_dir().join(format!("llava-jp-proj-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let value = |i: usize, salt: usize| (((i * 7 + salt * 13) % 17) as f32 - 8.0) / 10.0;
    let (d_in, d_out) = (3usize, 2usize);
    // PyTorch layouts: weight [out, in].
    let write = |path: &std::path::Path, tensors: &[(String, Vec<usize>, Vec<f32>)]| {
        let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .zip(&bytes)
            .map(|((k, s, _), b)| (k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap()))
            .collect();
        safetensors::tensor::serialize_to_file(views, None, path).unwrap();
    };
    let x: Vec<f32> = (0..2 * d_in).map(|i| value(i, 5)).collect();
    let gelu = |v: f32| 0.5 * v * (1.0 + erf(v / std::f32::consts::SQRT_2));
    let affine = |x: &[f32], w: &[f32], b: &[f32], n_in: usize, n_out: usize| -> Vec<f32> {
        (0..x.len() / n_in)
            .flat_map(|r| (0..n_out).map(move |o| (0..n_in).map(|i| x[r * n_in + i] * w[o * n_in + i]).sum::<f32>() + b[o]))
            .collect()
    };

    // linear
    let w: Vec<f32> = (0..d_out * d_in).map(|i| value(i, 1)).collect();
    let b: Vec<f32> = (0..d_out).map(|i| value(i, 2)).collect();
    let file = dir.join("linear.safetensors");
    write(&file, &[("model.mm_projector.weight".into(), vec![d_out, d_in], w.clone()), ("model.mm_projector.bias".into(), vec![d_out], b.clone())]);
    let p = Projector::<B>::new(ProjectorKind::Linear, d_in, d_out, &FlexDevice);
    let (p, _) = load_projector(p, ProjectorKind::Linear, &file).unwrap();
    let xt = Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [2, d_in]), &FlexDevice);
    let got = to_f32(p.forward(xt.clone()));
    let want = affine(&x, &w, &b, d_in, d_out);
    assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-6), "{got:?} vs {want:?}");

    // mlp3x_gelu: Linear(in, out), GELU, Linear(out, out), GELU, Linear(out, out)
    let mut tensors = Vec::new();
    let mut layers = Vec::new();
    for (i, n_in) in [d_in, d_out, d_out].into_iter().enumerate() {
        let w: Vec<f32> = (0..d_out * n_in).map(|j| value(j, 3 + i)).collect();
        let b: Vec<f32> = (0..d_out).map(|j| value(j, 9 + i)).collect();
        tensors.push((format!("model.mm_projector.{}.weight", 2 * i), vec![d_out, n_in], w.clone()));
        tensors.push((format!("model.mm_projector.{}.bias", 2 * i), vec![d_out], b.clone()));
        layers.push((w, b, n_in));
    }
    let file = dir.join("mm_projector.safetensors");
    write(&file, &tensors);
    let kind = ProjectorKind::parse("mlp3x_gelu").unwrap();
    let (p, report) = load_projector(Projector::<B>::new(kind, d_in, d_out, &FlexDevice), kind, &file).unwrap();
    assert_eq!(report.loaded, 6);
    let got = to_f32(p.forward(xt));
    let mut h = x.clone();
    for (i, (w, b, n_in)) in layers.iter().enumerate() {
        if i > 0 {
            h = h.iter().map(|&v| gelu(v)).collect();
        }
        h = affine(&h, w, b, *n_in, d_out);
    }
    assert!(got.iter().zip(&h).all(|(g, w)| (g - w).abs() < 1e-5), "{got:?} vs {h:?}");

    // The identity projector has no weights and passes features through.
    let p = Projector::<B>::new(ProjectorKind::Identity, 4, 4, &FlexDevice);
    let t = Tensor::<B, 2>::from_data(TensorData::new(vec![1.0f32, -2.0, 3.0, 0.5], [1, 4]), &FlexDevice);
    assert_eq!(to_f32(p.forward(t)), vec![1.0, -2.0, 3.0, 0.5]);
    std::fs::remove_dir_all(dir).ok();
}

/// erf by Abramowitz-Stegun 7.1.26 (absolute error below 1.5e-7).
fn erf(x: f32) -> f32 {
    let x64 = x as f64;
    let t = 1.0 / (1.0 + 0.3275911 * x64.abs());
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    ((1.0 - poly * (-x64 * x64).exp()).copysign(x64)) as f32
}

/// The batch the language model gets: each sample's text embeddings with its images' feature
/// rows where its -200 ids stand, cut to `max_length` (through an image too), padded with zero
/// rows on either side; labels, positions and the padding mask beside it. Checked against the
/// same splice done here row by row, and so are the gradients that reach the image features
/// and the token embeddings from a weighted sum of the batch.
#[test]
fn images_splice_into_the_batch_and_gradients_reach_them() {
    use burn::backend::Autodiff;
    use burn::prelude::*;
    use burn::tensor::Distribution;
    use llava_jp::model::{LlavaModel, Sample, IGNORE_INDEX, IMAGE_TOKEN_INDEX as IMG};
    type AD = Autodiff<B>;
    let device = FlexDevice;
    let dir = std::env::temp_dir().join(format!("llava-jp-splice-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = serde_json::json!({
        "model_type": "llava", "vocab_size": 16, "n_positions": 32, "n_embd": 8, "n_layer": 1, "n_head": 2,
        "mm_vision_tower": "tiny-clip", "mm_projector_type": "linear", "tokenizer_model_max_length": 11,
        "vision_config": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "image_size": 14, "patch_size": 7}
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let config = llava_jp::config::LlavaConfig::from_file(dir.join("config.json")).unwrap();
    let model = LlavaModel::<AD>::new(&config, &device);
    assert_eq!(model.max_length, 11);
    let (d, image_tokens, images) = (8, 3, 4);
    let samples = vec![
        Sample { input_ids: vec![5, IMG, 6, 7], labels: Some(vec![IGNORE_INDEX, IGNORE_INDEX, 6, 7]) },
        Sample { input_ids: vec![IMG, 8, IMG, 9], labels: None },
        // 9 + 3 + 1 rows: cut to 11, two rows into its image.
        Sample { input_ids: vec![1, 2, 3, 4, 5, 6, 7, 8, 9, IMG, 10], labels: Some(vec![1, 2, 3, 4, 5, 6, 7, 8, 9, IGNORE_INDEX, 10]) },
    ];
    let wte: Vec<f32> = model.transformer.wte.weight.val().into_data().to_vec().unwrap();
    for pad_left in [false, true] {
        let features = Tensor::<AD, 3>::random([images, image_tokens, d], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let feature_rows: Vec<f32> = features.clone().into_data().to_vec().unwrap();
        let batch = model.prepare_inputs_padded(&samples, Some(features.clone()), pad_left);

        // The splice by hand: per sample, (where each row comes from, its label).
        #[derive(Clone, Copy, PartialEq, Debug)]
        enum Row {
            Token(usize),
            Image(usize, usize),
            Pad,
        }
        let mut next_image = 0;
        let mut expected: Vec<(Vec<Row>, Vec<i64>)> = samples
            .iter()
            .map(|s| {
                let mut rows = Vec::new();
                let mut labels = Vec::new();
                for (i, &id) in s.input_ids.iter().enumerate() {
                    if id == IMG {
                        rows.extend((0..image_tokens).map(|r| Row::Image(next_image, r)));
                        labels.extend([IGNORE_INDEX; 3]);
                        next_image += 1;
                    } else {
                        rows.push(Row::Token(id as usize));
                        labels.push(s.labels.as_ref().map_or(IGNORE_INDEX, |l| l[i]));
                    }
                }
                rows.truncate(11);
                labels.truncate(11);
                (rows, labels)
            })
            .collect();
        assert_eq!(batch.lengths, vec![6, 8, 11]);
        let mut valid = Vec::new();
        let mut positions = Vec::new();
        for (rows, labels) in &mut expected {
            let (len, pad) = (rows.len(), 11 - rows.len());
            if pad_left {
                rows.splice(0..0, [Row::Pad].repeat(pad));
                labels[0] = IGNORE_INDEX;
                labels.splice(0..0, [IGNORE_INDEX].repeat(pad));
                valid.extend([false].repeat(pad).into_iter().chain([true].repeat(len)));
                positions.extend([0].repeat(pad).into_iter().chain(0..len as i64));
            } else {
                rows.extend([Row::Pad].repeat(pad));
                labels.extend([IGNORE_INDEX].repeat(pad));
                valid.extend([true].repeat(len).into_iter().chain([false].repeat(pad)));
                positions.extend((0..len as i64).chain([0].repeat(pad)));
            }
        }
        let side = if pad_left { "left" } else { "right" };
        let labels: Vec<Vec<i64>> = expected.iter().map(|(_, l)| l.clone()).collect();
        assert_eq!(batch.labels.as_ref(), Some(&labels), "{side} padding: labels");
        assert_eq!(batch.key_valid.clone().into_data().to_vec::<bool>().unwrap(), valid, "{side} padding: padding mask");
        assert_eq!(batch.position_ids.clone().into_data().convert::<i64>().to_vec::<i64>().unwrap(), positions, "{side} padding: positions");
        let row_of = |row: Row| -> Vec<f32> {
            match row {
                Row::Token(id) => wte[id * d..(id + 1) * d].to_vec(),
                Row::Image(i, r) => feature_rows[(i * image_tokens + r) * d..(i * image_tokens + r + 1) * d].to_vec(),
                Row::Pad => vec![0.0; d],
            }
        };
        let want: Vec<f32> = expected.iter().flat_map(|(rows, _)| rows.iter().flat_map(|&r| row_of(r))).collect();
        assert_eq!(batch.inputs_embeds.dims(), [3, 11, d]);
        assert_eq!(batch.inputs_embeds.clone().into_data().to_vec::<f32>().unwrap(), want, "{side} padding: embeddings");

        // d(sum(embeds * w)) reaches each image row and each token's embedding as the w of the
        // places it was put (a token's summed over its places); nothing from the cut image row.
        let w = Tensor::<AD, 3>::random([3, 11, d], Distribution::Uniform(-1.0, 1.0), &device);
        let w_rows: Vec<f32> = w.clone().into_data().to_vec().unwrap();
        let grads = (batch.inputs_embeds * w).sum().backward();
        let mut want_features = vec![0f32; images * image_tokens * d];
        let mut want_wte = vec![0f32; wte.len()];
        for (place, &row) in expected.iter().flat_map(|(rows, _)| rows).enumerate() {
            let (to, at) = match row {
                Row::Token(id) => (&mut want_wte, id * d),
                Row::Image(i, r) => (&mut want_features, (i * image_tokens + r) * d),
                Row::Pad => continue,
            };
            for k in 0..d {
                to[at + k] += w_rows[place * d + k];
            }
        }
        let got: Vec<f32> = features.grad(&grads).expect("the features' gradient").into_data().to_vec().unwrap();
        assert_eq!(got, want_features, "{side} padding: image feature gradients");
        let got: Vec<f32> = model.transformer.wte.weight.grad(&grads).expect("the embeddings' gradient").into_data().to_vec().unwrap();
        let worst = got.iter().zip(&want_wte).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "{side} padding: token embedding gradients differ by {worst}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The training loss takes `ln_f` and the head over the labelled positions only: its loss and
/// its gradients (the hidden states' and the head's, `ln_f`'s) are the whole logits' loss's,
/// for a batch with a few labelled positions, one with all of them, and one with none.
#[test]
fn the_loss_over_labelled_rows_is_the_whole_logits_loss() {
    use burn::backend::Autodiff;
    use burn::prelude::*;
    use burn::tensor::Distribution;
    use llava_jp::model::llava::shifted_cross_entropy;
    use llava_jp::model::{LlavaModel, IGNORE_INDEX as NO};
    type AD = Autodiff<B>;
    let device = FlexDevice;
    let dir = std::env::temp_dir().join(format!("llava-jp-labelled-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = serde_json::json!({
        "model_type": "llava", "vocab_size": 16, "n_positions": 32, "n_embd": 8, "n_layer": 1, "n_head": 2,
        "mm_vision_tower": "tiny-clip", "mm_projector_type": "linear", "tie_word_embeddings": false,
        "vision_config": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "image_size": 14, "patch_size": 7}
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let config = llava_jp::config::LlavaConfig::from_file(dir.join("config.json")).unwrap();
    let model = LlavaModel::<AD>::new(&config, &device);
    let (b, t, d) = (2, 6, 8);
    let few = vec![vec![NO, NO, 3, 4, NO, 9], vec![NO, NO, NO, 15, 0, NO]];
    let all = vec![(0..t as i64).collect::<Vec<_>>(), (5..5 + t as i64).collect()];
    let none = vec![vec![NO; t]; b];
    for (case, labels) in [("few", few), ("all", all), ("none", none)] {
        let values = Tensor::<B, 3>::random([b, t, d], Distribution::Normal(0.0, 1.0), &device);
        let run = |labelled_only: bool| {
            let hidden = Tensor::<AD, 3>::from_inner(values.clone()).require_grad();
            let loss = match labelled_only {
                true => model.loss_from_hidden(hidden.clone(), &labels),
                false => shifted_cross_entropy(model.logits(model.transformer.ln_f.forward(hidden.clone())), &labels),
            };
            let grads = loss.backward();
            let flat = |t: Option<Tensor<B, 2>>| t.expect("a gradient").into_data().to_vec::<f32>().unwrap();
            let head = model.lm_head.as_ref().expect("an untied head").weight.grad(&grads);
            let gamma = model.transformer.ln_f.weight.grad(&grads).map(|g| g.unsqueeze::<2>());
            let dx = hidden.grad(&grads).map(|g| g.reshape([b * t, d]));
            (loss.into_scalar(), flat(dx), flat(head), flat(gamma))
        };
        let (picked, whole) = (run(true), run(false));
        assert!((picked.0 - whole.0).abs() <= 1e-6 * whole.0.abs().max(1.0), "{case}: loss {} against {}", picked.0, whole.0);
        for (what, got, want) in [("hidden", &picked.1, &whole.1), ("head", &picked.2, &whole.2), ("ln_f", &picked.3, &whole.3)] {
            let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
            assert!(worst <= 1e-6, "{case}: the {what} gradient differs by {worst}");
        }
        if case == "none" {
            assert_eq!(picked.0, 0.0, "no target: a loss of 0");
        }
    }
}

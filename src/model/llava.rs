//! The LLaVA-JP model: CLIP tower -> projector -> GPT-2, with the image features spliced into
//! the token sequence where each image placeholder id (-200) stands, as the reference's
//! `prepare_inputs_labels_for_multimodal` does it.

use burn::prelude::*;

use super::clip::ClipVisionModel;
use super::gpt2::{attention_mask, lm_head_weight, lm_logits, new_lm_head, Gpt2Model, KvCache, LmHead};
use super::nn::{cross_entropy, has_trainable, linear_cross_entropy};
use super::projector::{Projector, ProjectorKind};
use super::rows::pick_rows;
use crate::config::{LlavaConfig, PaddingSide, SelectFeature};

/// The id standing for an image in a token sequence.
pub const IMAGE_TOKEN_INDEX: i64 = -200;
/// The label of a position that carries no loss.
pub const IGNORE_INDEX: i64 = -100;

/// One sample of a batch, before splicing: token ids with -200 where images go, and optional
/// labels of the same length (-100 where no loss is wanted).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub input_ids: Vec<i64>,
    pub labels: Option<Vec<i64>>,
}

/// A batch ready for the language model: embeddings with the images spliced in, padded.
pub struct MultimodalBatch<B: Backend> {
    pub inputs_embeds: Tensor<B, 3>,
    pub position_ids: Tensor<B, 2, Int>,
    /// `[batch, tokens]`, false for padding.
    pub key_valid: Tensor<B, 2, Bool>,
    /// Real length of each sample after splicing and truncation.
    pub lengths: Vec<usize>,
    /// Spliced labels, `[batch, tokens]` (-100 on images and padding), when the samples had labels.
    pub labels: Option<Vec<Vec<i64>>>,
}

/// The first GPT-2 block's input of a training batch ([`LlavaModel::training_inputs`]).
pub struct TrainingInputs<B: Backend> {
    pub hidden: Tensor<B, 3>,
    /// The attention mask (`attention_mask`): true where a query may not see a key.
    pub masked: Tensor<B, 4, Bool>,
    /// Spliced labels, `[batch, tokens]`.
    pub labels: Vec<Vec<i64>>,
}

pub struct LlavaOutput<B: Backend> {
    pub logits: Tensor<B, 3>,
    /// Mean shifted cross-entropy over labels != -100, when labels were given.
    pub loss: Option<Tensor<B, 1>>,
}

#[derive(Module, Debug)]
pub struct LlavaModel<B: Backend> {
    pub vision_tower: ClipVisionModel<B>,
    pub mm_projector: Projector<B>,
    pub transformer: Gpt2Model<B>,
    pub lm_head: Option<LmHead<B>>,
    /// Index of the tower hidden state taken (`mm_vision_select_layer` made non-negative).
    pub select_layer: usize,
    /// Whether the CLS token is kept (`mm_vision_select_feature = cls_patch`).
    pub keep_cls: bool,
    /// Spliced sequences are cut to this many tokens (`tokenizer_model_max_length`).
    pub max_length: usize,
    pub pad_left: bool,
}

impl<B: Backend> LlavaModel<B> {
    /// A model with fresh (random) weights for `config`; import overwrites them.
    pub fn new(config: &LlavaConfig, device: &B::Device) -> Self {
        let kind = ProjectorKind::parse(&config.mm_projector_type).expect("validated config");
        Self {
            vision_tower: ClipVisionModel::new(config.vision(), device),
            mm_projector: Projector::new(kind, config.vision().hidden_size, config.text.n_embd, device),
            transformer: Gpt2Model::new(&config.text, device),
            lm_head: new_lm_head(&config.text, device),
            select_layer: config.select_layer_index(),
            keep_cls: config.mm_vision_select_feature == SelectFeature::ClsPatch,
            max_length: config.max_length(),
            pad_left: config.tokenizer_padding_side == PaddingSide::Left,
        }
    }

    /// Tower then projector: `[images, 3, H, W]` -> `[images, image_tokens, n_embd]`.
    pub fn encode_images(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 3> {
        let features = self.vision_tower.hidden_state(pixel_values, self.select_layer);
        let [n, t, d] = features.dims();
        let features = if self.keep_cls { features } else { features.slice([0..n, 1..t, 0..d]) };
        // Back in the tower's dtype: under autocast the projector's output is in the compute
        // dtype, and it joins the f32 token embeddings (PyTorch's `torch.cat` promotes it).
        let dtype = features.dtype();
        self.mm_projector.forward(features).cast(dtype)
    }

    /// Splices `image_features` (`[images, image_tokens, n_embd]`, consumed in order, one per
    /// -200 id across the batch) into the samples' token embeddings, truncates each spliced
    /// sequence to `max_length` (the tokenizer already cut the text to it), and pads to the longest with zero embeddings on
    /// the configured side. Position ids restart at 0 in each sample.
    pub fn prepare_inputs(&self, samples: &[Sample], image_features: Option<Tensor<B, 3>>) -> MultimodalBatch<B> {
        self.prepare_inputs_padded(samples, image_features, self.pad_left)
    }

    pub fn prepare_inputs_padded(
        &self,
        samples: &[Sample],
        image_features: Option<Tensor<B, 3>>,
        pad_left: bool,
    ) -> MultimodalBatch<B> {
        let device = self.transformer.wte.weight.device();
        let d = self.transformer.wte.weight.dims()[1];
        let images_given = image_features.as_ref().map_or(0, |f| f.dims()[0]);
        let image_tokens = image_features.as_ref().map_or(0, |f| f.dims()[1]);
        let placeholders: usize =
            samples.iter().map(|s| s.input_ids.iter().filter(|&&id| id == IMAGE_TOKEN_INDEX).count()).sum();
        assert_eq!(
            placeholders, images_given,
            "the batch has {placeholders} image placeholders (-200) but {images_given} images were given"
        );

        // Embed every text token of the batch in one lookup.
        let all_ids: Vec<i64> = samples.iter().flat_map(|s| s.input_ids.iter().copied().filter(|&id| id != IMAGE_TOKEN_INDEX)).collect();
        let text_rows = all_ids.len();
        let text_embeds = (text_rows > 0).then(|| {
            let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(all_ids, [1, text_rows]), &device);
            self.transformer.wte.forward(ids).reshape([text_rows, d])
        });

        // The batch is gathered in one pick from the rows [text embeddings; image features]:
        // each sample is a list of row numbers, padding a zero row. (Slicing each sample's
        // pieces out and concatenating them cost, in the backward, a zeroed copy of the whole
        // feature tensor per image slice: 32 of them a stage-1 step.)
        let first_image_row = text_rows;
        let mut next_image = 0;
        let mut next_text = 0;
        let mut rows_per_sample: Vec<Vec<Option<usize>>> = Vec::with_capacity(samples.len());
        let mut labels_per_sample: Vec<Vec<i64>> = Vec::with_capacity(samples.len());
        for sample in samples {
            let ids = &sample.input_ids[..];
            let labels = sample.labels.as_ref().map(|l| {
                assert_eq!(l.len(), ids.len(), "labels and input_ids differ in length");
                &l[..]
            });
            let mut rows = Vec::with_capacity(ids.len() + image_tokens);
            let mut spliced_labels = Vec::with_capacity(ids.len() + image_tokens);
            for (i, &id) in ids.iter().enumerate() {
                if id == IMAGE_TOKEN_INDEX {
                    let first = first_image_row + next_image * image_tokens;
                    rows.extend((first..first + image_tokens).map(Some));
                    spliced_labels.extend(std::iter::repeat_n(IGNORE_INDEX, image_tokens));
                    next_image += 1;
                } else {
                    rows.push(Some(next_text));
                    spliced_labels.push(labels.map_or(IGNORE_INDEX, |l| l[i]));
                    next_text += 1;
                }
            }
            // Truncate again after splicing (an image can push the text past the limit).
            rows.truncate(self.max_length);
            spliced_labels.truncate(self.max_length);
            assert!(!rows.is_empty(), "sample {} of the batch is empty", rows_per_sample.len());
            rows_per_sample.push(rows);
            labels_per_sample.push(spliced_labels);
        }
        let lengths: Vec<usize> = rows_per_sample.iter().map(Vec::len).collect();
        let longest = lengths.iter().copied().max().unwrap_or(0).max(1);
        let b = samples.len();
        let mut index = Vec::with_capacity(b * longest);
        let mut positions = Vec::with_capacity(b * longest);
        let mut valid = Vec::with_capacity(b * longest);
        let mut padded_labels = Vec::with_capacity(b);
        for ((rows, mut labels), &len) in rows_per_sample.into_iter().zip(labels_per_sample).zip(&lengths) {
            let pad = longest - len;
            let padding = std::iter::repeat_n(None, pad);
            if pad_left {
                index.extend(padding.chain(rows));
                // Nothing real precedes a sample's first token, so it is never a target; with
                // left padding the shifted loss would otherwise predict it from a padding row.
                if let Some(first) = labels.first_mut() {
                    *first = IGNORE_INDEX;
                }
                positions.extend(std::iter::repeat_n(0i64, pad).chain(0..len as i64));
                valid.extend(std::iter::repeat_n(false, pad).chain(std::iter::repeat_n(true, len)));
                padded_labels.push(std::iter::repeat_n(IGNORE_INDEX, pad).chain(labels).collect());
            } else {
                index.extend(rows.into_iter().chain(padding));
                positions.extend((0..len as i64).chain(std::iter::repeat_n(0, pad)));
                valid.extend(std::iter::repeat_n(true, len).chain(std::iter::repeat_n(false, pad)));
                padded_labels.push(labels.into_iter().chain(std::iter::repeat_n(IGNORE_INDEX, pad)).collect());
            }
        }
        let mut sources: Vec<Tensor<B, 2>> = Vec::with_capacity(2);
        sources.extend(text_embeds);
        sources.extend(image_features.map(|f| f.reshape([images_given * image_tokens, d])));
        let source = if sources.len() == 1 { sources.pop().expect("one source") } else { Tensor::cat(sources, 0) };
        let has_labels = samples.iter().any(|s| s.labels.is_some());
        MultimodalBatch {
            inputs_embeds: pick_rows(source, &index).reshape([b, longest, d]),
            position_ids: Tensor::from_data(TensorData::new(positions, [b, longest]), &device),
            key_valid: Tensor::from_data(TensorData::new(valid, [b, longest]), &device),
            lengths,
            labels: has_labels.then_some(padded_labels),
        }
    }

    /// The language model over a prepared batch (and a cache, for generation): logits.
    pub fn forward_embeds(
        &self,
        inputs_embeds: Tensor<B, 3>,
        position_ids: Tensor<B, 2, Int>,
        key_valid: Tensor<B, 2, Bool>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        self.logits(self.transformer.forward(inputs_embeds, position_ids, key_valid, cache))
    }

    /// Logits and, when the samples carry labels, the loss: the whole training forward.
    pub fn forward(&self, samples: &[Sample], pixel_values: Option<Tensor<B, 4>>) -> LlavaOutput<B> {
        let features = pixel_values.map(|p| self.encode_images(p));
        let batch = self.prepare_inputs(samples, features);
        let logits = self.forward_embeds(batch.inputs_embeds, batch.position_ids, batch.key_valid, None);
        let loss = batch.labels.as_ref().map(|labels| shifted_cross_entropy(logits.clone(), labels));
        LlavaOutput { logits, loss }
    }

    /// The training forward up to the first GPT-2 block, for a caller that runs the blocks
    /// itself (`crate::train::micro_batch`): images encoded and spliced, position embeddings
    /// and embedding dropout applied.
    pub fn training_inputs(&self, samples: &[Sample], pixel_values: Option<Tensor<B, 4>>) -> TrainingInputs<B> {
        let features = pixel_values.map(|p| self.encode_images(p));
        let batch = self.prepare_inputs(samples, features);
        let t = batch.inputs_embeds.dims()[1];
        TrainingInputs {
            hidden: self.transformer.embed(batch.inputs_embeds, batch.position_ids),
            masked: attention_mask(batch.key_valid, t, self.transformer.n_head()),
            labels: batch.labels.expect("training samples carry labels"),
        }
    }

    /// The training forward after the last block: `ln_f`, the output projection and the loss
    /// ([`linear_cross_entropy`]: on CUDA under autocast, without the whole logits).
    ///
    /// Only the positions with a target go through `ln_f` and the head: the others add nothing
    /// to the loss nor to any gradient, and in LLaVA's batches they are most of them (the image's
    /// 576 positions, the prompts, the padding). The reference computes every position's logits.
    pub fn loss_from_hidden(&self, hidden: Tensor<B, 3>, labels: &[Vec<i64>]) -> Tensor<B, 1> {
        let [b, t, width] = hidden.dims();
        let weight = lm_head_weight(&self.transformer, self.lm_head.as_ref());
        let targets = shifted_targets(labels, t, weight.dims()[0]);
        let mut hidden = hidden.reshape([b * t, width]);
        let labelled: Vec<Option<usize>> = (0..targets.len()).filter(|&i| targets[i] >= 0).map(Some).collect();
        // All rows or none (the loss is then 0 over the whole batch, no empty tensor made): as is.
        let targets = match 0 < labelled.len() && labelled.len() < targets.len() {
            true => {
                hidden = pick_rows(hidden, &labelled);
                targets.into_iter().filter(|&target| target >= 0).collect()
            }
            false => targets,
        };
        linear_cross_entropy(self.transformer.ln_f.forward(hidden), weight, &targets)
    }

    /// Whether [`Self::training_inputs`]'s output depends on a trainable parameter: the tower
    /// or projector (when the batch has images), or the embeddings.
    pub fn trains_before_blocks(&self, with_images: bool) -> bool {
        let images = with_images && (has_trainable(&self.vision_tower) || has_trainable(&self.mm_projector));
        images || has_trainable(&self.transformer.wte) || has_trainable(&self.transformer.wpe)
    }

    /// Whether [`Self::loss_from_hidden`] uses a trainable parameter: `ln_f` or the output
    /// projection.
    pub fn trains_after_blocks(&self) -> bool {
        let head = match &self.lm_head {
            Some(head) => has_trainable(head),
            None => has_trainable(&self.transformer.wte),
        };
        head || has_trainable(&self.transformer.ln_f)
    }

    /// Logits of the hidden states the language model returned (`ln_f`'s output).
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        lm_logits(&self.transformer, self.lm_head.as_ref(), hidden)
    }

    /// Tokens each image takes in the spliced sequence.
    pub fn image_tokens(&self) -> usize {
        self.vision_tower.num_patches() + usize::from(self.keep_cls)
    }

    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.transformer.h.len())
    }
}

/// Mean cross-entropy of predicting `labels[t + 1]` from `logits[t]`, over the positions whose
/// label is not -100 (transformers' causal-LM loss). Computed in f32 whatever the model's dtype.
/// A batch with no trained position gives 0 (transformers gives NaN).
pub fn shifted_cross_entropy<B: Backend>(logits: Tensor<B, 3>, labels: &[Vec<i64>]) -> Tensor<B, 1> {
    let [b, t, v] = logits.dims();
    cross_entropy(logits.reshape([b * t, v]), &shifted_targets(labels, t, v))
}

/// Each position's target in transformers' causal-LM loss: the next position's label, or -100
/// (none) for the last position and where the label is -100.
///
/// # Panics
/// When a row of `labels` is not `t` long, or a label is neither -100 nor below `vocab`.
pub fn shifted_targets(labels: &[Vec<i64>], t: usize, vocab: usize) -> Vec<i64> {
    let mut targets = Vec::with_capacity(labels.len() * t);
    for row in labels {
        assert_eq!(row.len(), t, "labels have {} positions, logits {t}", row.len());
        for pos in 0..t {
            let next = if pos + 1 < t { row[pos + 1] } else { IGNORE_INDEX };
            assert!(next == IGNORE_INDEX || (0..vocab as i64).contains(&next), "label {next} is outside the vocabulary of {vocab}");
            targets.push(next);
        }
    }
    targets
}

//! GPT-2 as transformers' `GPT2LMHeadModel` computes it (llm-jp-1.3b is one). Module paths
//! mirror the checkpoint: `transformer.h.N.attn.c_attn.weight`, weights in `Conv1D`'s `[in, out]`.

use burn::module::Param;
use burn::prelude::*;

use super::nn::{attention, attention_from_qkv, merge_heads, split_heads, Activation, Conv1D, Dropout, Embedding, LayerNorm};
use crate::config::Gpt2Config;

/// Keys and values of every layer for the tokens seen so far, and which of those tokens are
/// real (left padding of a batch is not).
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    key_valid: Option<Tensor<B, 2, Bool>>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(n_layer: usize) -> Self {
        Self { layers: vec![None; n_layer], key_valid: None }
    }

    /// Number of tokens cached.
    pub fn len(&self) -> usize {
        self.key_valid.as_ref().map_or(0, |v| v.dims()[1])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each layer's `(keys, values)`, `[batch, heads, tokens, head_dim]`, once filled.
    pub fn layers(&self) -> &[Option<(Tensor<B, 4>, Tensor<B, 4>)>] {
        &self.layers
    }
}

/// `masked[b, h, i, j]`: query `i` of this chunk (at absolute position `past + i`) may not see
/// key `j`: it lies in the future or is padding. A query always sees itself, so that padding
/// rows stay finite (their outputs are never used).
pub fn attention_mask<B: Backend>(key_valid: Tensor<B, 2, Bool>, queries: usize, heads: usize) -> Tensor<B, 4, Bool> {
    let [b, keys] = key_valid.dims();
    let device = key_valid.device();
    let past = (keys - queries) as i64;
    let future = Tensor::<B, 2, Bool>::tril_mask([queries, keys], past, &device);
    let not_self = Tensor::<B, 2, Bool>::diag_mask([queries, keys], past, &device);
    let padding = key_valid.bool_not().unsqueeze_dim::<3>(1).expand([b, queries, keys]);
    let masked = future.unsqueeze::<3>().expand([b, queries, keys]).bool_or(padding);
    let masked = masked.bool_and(not_self.unsqueeze::<3>().expand([b, queries, keys]));
    masked.unsqueeze_dim::<4>(1).expand([b, heads, queries, keys])
}

#[derive(Module, Debug)]
pub struct Gpt2Attention<B: Backend> {
    pub c_attn: Conv1D<B>,
    pub c_proj: Conv1D<B>,
    pub attn_dropout: Dropout,
    pub resid_dropout: Dropout,
    pub n_head: usize,
    /// 1/sqrt(head_dim) (or 1), divided by the layer number when
    /// `scale_attn_by_inverse_layer_idx`.
    pub scale: f64,
}

impl<B: Backend> Gpt2Attention<B> {
    /// The attention's output before `resid_dropout`, which [`Gpt2Block`] applies together
    /// with its residual add ([`Dropout::add_to`]: one kernel on CUDA).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        masked: Tensor<B, 4, Bool>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        let qkv = self.c_attn.forward(x);
        let Some(slot) = cache else {
            return self.c_proj.forward(attention_from_qkv(qkv, self.n_head, Some(masked), self.scale, &self.attn_dropout));
        };
        let q = split_heads(qkv.clone().slice([0..b, 0..t, 0..d]), self.n_head);
        let mut k = split_heads(qkv.clone().slice([0..b, 0..t, d..2 * d]), self.n_head);
        let mut v = split_heads(qkv.slice([0..b, 0..t, 2 * d..3 * d]), self.n_head);
        if let Some((k_past, v_past)) = slot.take() {
            k = Tensor::cat(vec![k_past, k], 2);
            v = Tensor::cat(vec![v_past, v], 2);
        }
        *slot = Some((k.clone(), v.clone()));
        let out = attention(q, k, v, Some(masked), self.scale, &self.attn_dropout);
        self.c_proj.forward(merge_heads(out))
    }
}

#[derive(Module, Debug)]
pub struct Gpt2Mlp<B: Backend> {
    pub c_fc: Conv1D<B>,
    pub c_proj: Conv1D<B>,
    #[module(skip)]
    pub activation: Activation,
    pub dropout: Dropout,
}

#[derive(Module, Debug)]
pub struct Gpt2Block<B: Backend> {
    pub ln_1: LayerNorm<B>,
    pub attn: Gpt2Attention<B>,
    pub ln_2: LayerNorm<B>,
    pub mlp: Gpt2Mlp<B>,
}

impl<B: Backend> Gpt2Block<B> {
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        masked: Tensor<B, 4, Bool>,
        cache: Option<&mut Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    ) -> Tensor<B, 3> {
        let attended = self.attn.forward(normed_for(&self.ln_1, &self.attn.c_attn, x.clone()), masked, cache);
        let x = self.attn.resid_dropout.add_to(x, attended);
        let h = self.mlp.c_fc.forward(normed_for(&self.ln_2, &self.mlp.c_fc, x.clone()));
        self.mlp.dropout.add_to(x, self.mlp.c_proj.forward(self.mlp.activation.forward(h)))
    }
}

/// `ln(x)` as `layer` reads it: in autocast's compute dtype ([`LayerNorm::forward_to_product`])
/// when the product is its only reader. With a LoRA adapter it stays in f32, as in PyTorch:
/// the adapter's dropout reads the f32 values, and the two products' input gradients are added
/// in f32 (two readers of one bf16 tensor would have burn add them in bf16).
fn normed_for<B: Backend>(ln: &LayerNorm<B>, layer: &Conv1D<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    match layer.lora {
        Some(_) => ln.forward(x),
        None => ln.forward_to_product(x),
    }
}

/// transformers' `GPT2Model` (`transformer.*`).
#[derive(Module, Debug)]
pub struct Gpt2Model<B: Backend> {
    pub wte: Embedding<B>,
    pub wpe: Embedding<B>,
    pub drop: Dropout,
    pub h: Vec<Gpt2Block<B>>,
    pub ln_f: LayerNorm<B>,
}

impl<B: Backend> Gpt2Model<B> {
    pub fn new(config: &Gpt2Config, device: &B::Device) -> Self {
        let d = config.n_embd;
        let activation = Activation::parse(&config.activation_function).expect("validated config");
        let head_dim = d / config.n_head;
        let block = |i: usize| {
            let mut scale = if config.scale_attn_weights { 1.0 / (head_dim as f64).sqrt() } else { 1.0 };
            if config.scale_attn_by_inverse_layer_idx {
                scale /= (i + 1) as f64;
            }
            Gpt2Block {
                ln_1: LayerNorm::new(d, config.layer_norm_epsilon, device),
                attn: Gpt2Attention {
                    c_attn: Conv1D::new(d, 3 * d, device),
                    c_proj: Conv1D::new(d, d, device),
                    attn_dropout: Dropout { prob: config.attn_pdrop },
                    resid_dropout: Dropout { prob: config.resid_pdrop },
                    n_head: config.n_head,
                    scale,
                },
                ln_2: LayerNorm::new(d, config.layer_norm_epsilon, device),
                mlp: Gpt2Mlp {
                    c_fc: Conv1D::new(d, config.inner_size(), device),
                    c_proj: Conv1D::new(config.inner_size(), d, device),
                    activation,
                    dropout: Dropout { prob: config.resid_pdrop },
                },
            }
        };
        Self {
            wte: Embedding::new(config.vocab_size, d, 0.02, device),
            wpe: Embedding::new(config.n_positions, d, 0.01, device),
            drop: Dropout { prob: config.embd_pdrop },
            h: (0..config.n_layer).map(block).collect(),
            ln_f: LayerNorm::new(d, config.layer_norm_epsilon, device),
        }
    }

    pub fn n_head(&self) -> usize {
        self.h.first().map_or(1, |b| b.attn.n_head)
    }

    /// The first block's input: the position embeddings added to `inputs_embeds`, then the
    /// embedding dropout.
    pub fn embed(&self, inputs_embeds: Tensor<B, 3>, position_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.drop.forward(inputs_embeds + self.wpe.forward(position_ids))
    }

    /// Runs the blocks over `inputs_embeds` `[batch, tokens, n_embd]` at `position_ids`
    /// `[batch, tokens]`; `key_valid` `[batch, tokens]` is false for padding. With a cache, the
    /// tokens continue the cached ones and the cache is extended. Returns `ln_f`'s output.
    pub fn forward(
        &self,
        inputs_embeds: Tensor<B, 3>,
        position_ids: Tensor<B, 2, Int>,
        key_valid: Tensor<B, 2, Bool>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let [_, t, _] = inputs_embeds.dims();
        let n_positions = self.wpe.weight.dims()[0];
        // With a cache, left padding makes the cache longer than any real position; generation
        // checks its positions itself.
        assert!(cache.is_some() || t <= n_positions, "{t} tokens exceed the model's {n_positions} positions");
        let all_valid = match cache.as_mut() {
            Some(c) => {
                let all = match c.key_valid.take() {
                    Some(prev) => Tensor::cat(vec![prev, key_valid], 1),
                    None => key_valid,
                };
                c.key_valid = Some(all.clone());
                all
            }
            None => key_valid,
        };
        let masked = attention_mask(all_valid, t, self.n_head());
        let mut x = self.embed(inputs_embeds, position_ids);
        for (i, block) in self.h.iter().enumerate() {
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            x = block.forward(x, masked.clone(), slot);
        }
        self.ln_f.forward(x)
    }
}

/// The output projection: `wte` when tied (GPT-2's default), else an own `[vocab, n_embd]`.
#[derive(Module, Debug)]
pub struct LmHead<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
}

/// transformers' `GPT2LMHeadModel`.
#[derive(Module, Debug)]
pub struct Gpt2LmHeadModel<B: Backend> {
    pub transformer: Gpt2Model<B>,
    pub lm_head: Option<LmHead<B>>,
}

impl<B: Backend> Gpt2LmHeadModel<B> {
    pub fn new(config: &Gpt2Config, device: &B::Device) -> Self {
        Self { transformer: Gpt2Model::new(config, device), lm_head: new_lm_head(config, device) }
    }

    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        lm_logits(&self.transformer, self.lm_head.as_ref(), hidden)
    }

    /// Logits for token ids `[batch, tokens]`.
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        position_ids: Tensor<B, 2, Int>,
        key_valid: Tensor<B, 2, Bool>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let embeds = self.transformer.wte.forward(input_ids);
        self.logits(self.transformer.forward(embeds, position_ids, key_valid, cache))
    }
}

pub(crate) fn new_lm_head<B: Backend>(config: &Gpt2Config, device: &B::Device) -> Option<LmHead<B>> {
    (!config.tie_word_embeddings).then(|| LmHead {
        weight: Param::from_tensor(Tensor::random(
            [config.vocab_size, config.n_embd],
            burn::tensor::Distribution::Normal(0.0, 0.02),
            device,
        )),
    })
}

/// The output projection's weight `[vocabulary, width]`: the head's, or `wte`'s when tied.
pub(crate) fn lm_head_weight<B: Backend>(transformer: &Gpt2Model<B>, lm_head: Option<&LmHead<B>>) -> Tensor<B, 2> {
    match lm_head {
        Some(head) => head.weight.val(),
        None => transformer.wte.weight.val(),
    }
}

/// `hidden · Wᵀ` with [`lm_head_weight`].
pub(crate) fn lm_logits<B: Backend>(
    transformer: &Gpt2Model<B>,
    lm_head: Option<&LmHead<B>>,
    hidden: Tensor<B, 3>,
) -> Tensor<B, 3> {
    super::nn::affine(hidden, lm_head_weight(transformer, lm_head).transpose(), None)
}

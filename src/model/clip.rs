//! The CLIP vision tower as transformers' `CLIPVisionModel` computes it. Module paths mirror the
//! checkpoint: `vision_model.embeddings.patch_embedding.weight`, `vision_model.encoder.layers.N...`.

use burn::module::Param;
use burn::prelude::*;

use super::nn::{add_residual, affine, attention_from_qkv, Activation, Dropout, Embedding, LayerNorm, Linear};
use crate::config::ClipVisionConfig;

/// The patch embedding: a `patch x patch` convolution with stride `patch` and no bias. Stored as
/// the checkpoint's conv weight `[hidden, channels, patch, patch]`; computed as one GEMM over
/// the flattened patches, which is the same arithmetic.
#[derive(Module, Debug)]
pub struct PatchEmbedding<B: Backend> {
    pub weight: Param<Tensor<B, 4>>,
}

#[derive(Module, Debug)]
pub struct ClipVisionEmbeddings<B: Backend> {
    pub class_embedding: Param<Tensor<B, 1>>,
    pub patch_embedding: PatchEmbedding<B>,
    pub position_embedding: Embedding<B>,
    pub patch_size: usize,
}

impl<B: Backend> ClipVisionEmbeddings<B> {
    /// `pixel_values`: `[batch, channels, height, width]` -> `[batch, 1 + patches, hidden]`.
    pub fn forward(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, c, h, w] = pixel_values.dims();
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        let weight = self.patch_embedding.weight.val();
        let hidden = weight.dims()[0];
        assert!(h % p == 0 && w % p == 0, "image {h}x{w} is not a multiple of the patch size {p}");
        // [b, c, gh, p, gw, p] -> [b, gh, gw, c, p, p]: one row per patch, in the conv's order.
        let patches = pixel_values
            .reshape([b, c, gh, p, gw, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b, gh * gw, c * p * p]);
        let cls = self.class_embedding.val().reshape([1, 1, hidden]).expand([b, 1, hidden]);
        // In the class embedding's dtype: under autocast the product's output is in the
        // compute dtype (PyTorch's `torch.cat` promotes it back).
        let patch_embeds = affine(patches, weight.reshape([hidden, c * p * p]).transpose(), None).cast(cls.dtype());
        let embeddings = Tensor::cat(vec![cls, patch_embeds], 1);
        let positions_count = self.position_embedding.weight.dims()[0];
        assert_eq!(
            positions_count,
            1 + gh * gw,
            "image {h}x{w} gives {} tokens but the tower has {positions_count} positions",
            1 + gh * gw
        );
        embeddings + self.position_embedding.weight.val().unsqueeze::<3>()
    }
}

#[derive(Module, Debug)]
pub struct ClipAttention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub out_proj: Linear<B>,
    pub attention_dropout: Dropout,
    pub num_heads: usize,
}

impl<B: Backend> ClipAttention<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let head_dim = x.dims()[2] / self.num_heads;
        // Queries, keys and values as one product, then one attention operation over it (on
        // CUDA: one cast of the input and no per-head copies instead of three of each).
        let qkv = Linear::forward_stacked(&[&self.q_proj, &self.k_proj, &self.v_proj], x);
        let out = attention_from_qkv(qkv, self.num_heads, None, 1.0 / (head_dim as f64).sqrt(), &self.attention_dropout);
        self.out_proj.forward(out)
    }
}

#[derive(Module, Debug)]
pub struct ClipMlp<B: Backend> {
    pub fc1: Linear<B>,
    pub fc2: Linear<B>,
    #[module(skip)]
    pub activation: Activation,
}

#[derive(Module, Debug)]
pub struct ClipEncoderLayer<B: Backend> {
    pub self_attn: ClipAttention<B>,
    pub layer_norm1: LayerNorm<B>,
    pub mlp: ClipMlp<B>,
    pub layer_norm2: LayerNorm<B>,
}

impl<B: Backend> ClipEncoderLayer<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = add_residual(x.clone(), self.self_attn.forward(self.layer_norm1.forward_to_product(x)));
        let h = self.layer_norm2.forward_to_product(x.clone());
        add_residual(x, self.mlp.fc2.forward(self.mlp.activation.forward(self.mlp.fc1.forward(h))))
    }
}

#[derive(Module, Debug)]
pub struct ClipEncoder<B: Backend> {
    pub layers: Vec<ClipEncoderLayer<B>>,
}

#[derive(Module, Debug)]
pub struct ClipVisionTransformer<B: Backend> {
    pub embeddings: ClipVisionEmbeddings<B>,
    pub pre_layrnorm: LayerNorm<B>,
    pub encoder: ClipEncoder<B>,
    pub post_layernorm: LayerNorm<B>,
}

/// transformers' `CLIPVisionModel`.
#[derive(Module, Debug)]
pub struct ClipVisionModel<B: Backend> {
    pub vision_model: ClipVisionTransformer<B>,
}

/// What the tower computes: `hidden_states[0]` is the embeddings after `pre_layrnorm`,
/// `hidden_states[i]` the output of encoder layer `i`; only as many as were asked for.
pub struct ClipVisionOutput<B: Backend> {
    pub hidden_states: Vec<Tensor<B, 3>>,
    /// `post_layernorm` of the last layer's CLS token, when every layer ran.
    pub pooler_output: Option<Tensor<B, 2>>,
}

impl<B: Backend> ClipVisionModel<B> {
    pub fn new(config: &ClipVisionConfig, device: &B::Device) -> Self {
        let d = config.hidden_size;
        let activation = Activation::parse(&config.hidden_act).expect("validated config");
        let p = config.patch_size;
        let scale = (d as f64).powf(-0.5);
        let dist = burn::tensor::Distribution::Normal(0.0, scale);
        let layer = || ClipEncoderLayer {
            self_attn: ClipAttention {
                q_proj: Linear::new(d, d, true, device),
                k_proj: Linear::new(d, d, true, device),
                v_proj: Linear::new(d, d, true, device),
                out_proj: Linear::new(d, d, true, device),
                attention_dropout: Dropout { prob: config.attention_dropout },
                num_heads: config.num_attention_heads,
            },
            layer_norm1: LayerNorm::new(d, config.layer_norm_eps, device),
            mlp: ClipMlp {
                fc1: Linear::new(d, config.intermediate_size, true, device),
                fc2: Linear::new(config.intermediate_size, d, true, device),
                activation,
            },
            layer_norm2: LayerNorm::new(d, config.layer_norm_eps, device),
        };
        Self {
            vision_model: ClipVisionTransformer {
                embeddings: ClipVisionEmbeddings {
                    class_embedding: Param::from_tensor(Tensor::random([d], dist, device)),
                    patch_embedding: PatchEmbedding {
                        weight: Param::from_tensor(Tensor::random(
                            [d, config.num_channels, p, p],
                            burn::tensor::Distribution::Normal(0.0, 0.02),
                            device,
                        )),
                    },
                    position_embedding: Embedding::new(config.num_patches() + 1, d, 0.02, device),
                    patch_size: p,
                },
                pre_layrnorm: LayerNorm::new(d, config.layer_norm_eps, device),
                encoder: ClipEncoder { layers: (0..config.num_hidden_layers).map(|_| layer()).collect() },
                post_layernorm: LayerNorm::new(d, config.layer_norm_eps, device),
            },
        }
    }

    pub fn num_layers(&self) -> usize {
        self.vision_model.encoder.layers.len()
    }

    /// Patches per image: the position table less the CLS position.
    pub fn num_patches(&self) -> usize {
        self.vision_model.embeddings.position_embedding.weight.dims()[0] - 1
    }

    /// Side of the square images the tower takes.
    pub fn image_size(&self) -> usize {
        let side = (self.num_patches() as f64).sqrt().round() as usize;
        side * self.vision_model.embeddings.patch_size
    }

    /// Runs the tower up to hidden state `upto` (0 = embeddings, `num_layers()` = last layer)
    /// and returns every hidden state on the way; later layers are not computed.
    pub fn forward(&self, pixel_values: Tensor<B, 4>, upto: usize) -> ClipVisionOutput<B> {
        let mut hidden_states = Vec::with_capacity(upto + 1);
        let x = self.run(pixel_values, upto, |x| hidden_states.push(x.clone()));
        hidden_states.push(x.clone());
        let vm = &self.vision_model;
        let pooler_output = (upto == self.num_layers()).then(|| {
            let [b, _, d] = x.dims();
            vm.post_layernorm.forward(x.slice([0..b, 0..1]).reshape([b, d]))
        });
        ClipVisionOutput { hidden_states, pooler_output }
    }

    /// Hidden state `layer` alone (as [`Self::forward`] numbers them): the states before it are
    /// dropped as the tower goes, which with a batch of images is memory.
    pub fn hidden_state(&self, pixel_values: Tensor<B, 4>, layer: usize) -> Tensor<B, 3> {
        self.run(pixel_values, layer, |_| ())
    }

    /// Hidden state `upto`, showing each one before it to `each`.
    fn run(&self, pixel_values: Tensor<B, 4>, upto: usize, mut each: impl FnMut(&Tensor<B, 3>)) -> Tensor<B, 3> {
        let vm = &self.vision_model;
        assert!(upto <= self.num_layers(), "hidden state {upto} asked of a {}-layer tower", self.num_layers());
        let mut x = vm.pre_layrnorm.forward(vm.embeddings.forward(pixel_values));
        for layer in &vm.encoder.layers[..upto] {
            each(&x);
            x = layer.forward(x);
        }
        x
    }
}

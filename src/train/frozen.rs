//! Frozen linear layers in autocast's compute dtype, cast once a run.
//!
//! Under autocast a linear layer casts its f32 weight and bias to bf16 on the way into the
//! product, every step. A frozen layer's cast gives the same tensor every time: nothing updates
//! it during the run. So the trainer runs each forward on a copy of the model whose frozen
//! linear weights and biases are already cast ([`FrozenCasts::apply`]), keeping the parameter
//! ids, so gradients still find the trained parameters. The f32 model stays the one optimised
//! and saved. At stage 1 that covers the whole language model and vision tower: every weight
//! cast of a step (on an H100 ~5 ms of a 0.28 s step at 32 x 608 tokens).
//!
//! The values are those of the cast done each step, so the numbers do not change; only linear
//! layers (`Linear`, GPT-2's `Conv1D`) are cast: LayerNorm, the embeddings and the patch
//! convolution read their f32 parameters as before.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};

/// The cast weights of one run, by parameter id: made before its first step, reused after.
pub struct FrozenCasts<B: Backend> {
    compute: Option<DType>,
    cast: HashMap<ParamId, TensorPrimitive<B>>,
}

impl<B: Backend> FrozenCasts<B> {
    /// For a run under autocast to `compute` (`None`: no autocast, nothing is cast).
    pub fn new(compute: Option<DType>) -> Self {
        Self { compute, cast: HashMap::new() }
    }

    /// Makes the casts of `module`'s frozen linear parameters now (the trainer does it inside
    /// `memory_persistent_allocations`, as for the weights themselves: resident for the run,
    /// they belong in allocations of their own size, not in pages of cubecl's sliced pools).
    pub fn prepare<M: Module<B>>(&mut self, module: M) {
        let _ = self.apply(module);
    }

    /// `module` with every frozen f32 linear weight and bias replaced by its cast to the
    /// compute dtype. A parameter must not change between calls while frozen, nor be frozen
    /// again after training (its cast would be the old value): a trainer's run freezes once.
    pub fn apply<M: Module<B>>(&mut self, module: M) -> M {
        let Some(compute) = self.compute else { return module };
        module.map(&mut CastFrozen { compute, cast: &mut self.cast, containers: Vec::new() })
    }

    /// How many parameters have a cast kept.
    pub fn len(&self) -> usize {
        self.cast.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cast.is_empty()
    }
}

struct CastFrozen<'a, B: Backend> {
    compute: DType,
    cast: &'a mut HashMap<ParamId, TensorPrimitive<B>>,
    /// The struct each entered field belongs to (`Struct:Linear`, ...), innermost last.
    containers: Vec<String>,
}

impl<B: Backend> ModuleMapper<B> for CastFrozen<'_, B> {
    fn enter_module(&mut self, _name: &str, container_type: &str) {
        self.containers.push(container_type.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.containers.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let linear = matches!(self.containers.last().map(String::as_str), Some("Struct:Linear" | "Struct:Conv1D"));
        if !linear {
            return param;
        }
        let (id, tensor, mapper) = param.consume();
        if tensor.is_require_grad() || tensor.dtype() != DType::F32 {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let compute = self.compute;
        let dims = tensor.dims();
        let cast = self.cast.entry(id).or_insert_with(|| tensor.cast(compute).into_primitive()).clone();
        let cast = Tensor::<B, D>::from_primitive(cast);
        debug_assert_eq!(cast.dims(), dims, "the kept cast of parameter {id} has another shape: the parameter changed");
        Param::from_mapped_value(id, cast, mapper)
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use crate::model::nn::autocast;
    use crate::model::LlavaModel;
    use burn::backend::Autodiff;
    use burn::tensor::Distribution;
    use burn::backend::flex::FlexDevice;
    use burn::backend::Flex;

    type AD = Autodiff<Flex>;

    fn tiny_model(device: &FlexDevice, test: &str) -> LlavaModel<AD> {
        let dir = std::env::temp_dir().join(format!("llava-jp-frozen-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = serde_json::json!({
            "model_type": "llava", "vocab_size": 16, "n_positions": 32, "n_embd": 8, "n_layer": 2, "n_head": 2, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "mm_vision_tower": "tiny-clip", "mm_projector_type": "mlp2x_gelu",
            "vision_config": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                              "image_size": 14, "patch_size": 7}
        });
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let config = crate::config::LlavaConfig::from_file(dir.join("config.json")).unwrap();
        LlavaModel::new(&config, device)
    }

    /// Stage 1's freezing (tower and LLM frozen, projector trained) under bf16 autocast: the
    /// model with its frozen linear layers cast once gives the loss and the gradients of the
    /// one that casts them each call, bit for bit; only the frozen linear parameters are cast,
    /// and a second step reuses the casts.
    #[test]
    fn frozen_casts_change_no_number() {
        let device = FlexDevice;
        let mut model = tiny_model(&device, "numbers");
        model.vision_tower = crate::train::trainer::set_trainable(model.vision_tower, false);
        model.transformer = crate::train::trainer::set_trainable(model.transformer, false);
        model.lm_head = model.lm_head.map(|h| crate::train::trainer::set_trainable(h, false));
        model.mm_projector = crate::train::trainer::set_trainable(model.mm_projector, true);
        let _bf16 = autocast(Some(DType::BF16));
        let pixels = Tensor::<Flex, 4>::random([2, 3, 14, 14], Distribution::Normal(0.0, 1.0), &device);
        let text = Tensor::<Flex, 3>::random([2, 2, 8], Distribution::Normal(0.0, 1.0), &device);
        let labels = vec![vec![-100, 3, 4, -100, 9, 1], vec![-100, -100, 15, 0, 2, -100]];
        let run = |m: &LlavaModel<AD>| {
            // The projector trains: its gradient comes through the frozen tower's output.
            let features = m.encode_images(Tensor::from_inner(pixels.clone()));
            let projected = features.clone().sum().into_scalar();
            // Four image positions, then two of text.
            let x = Tensor::<AD, 3>::from_inner(text.clone()).require_grad();
            let mut h = Tensor::cat(vec![features.cast(DType::F32), x.clone()], 1);
            let masked = crate::model::gpt2::attention_mask(Tensor::<AD, 2, Bool>::full([2, 6], true, &device), 6, 2);
            for block in &m.transformer.h {
                h = block.forward(h, masked.clone(), None);
            }
            let loss = m.loss_from_hidden(h, &labels);
            let grads = loss.backward();
            let flat = |t: Tensor<Flex, 2>| t.into_data().convert::<f32>().to_vec::<f32>().unwrap();
            let dx = flat(x.grad(&grads).expect("the input's gradient").reshape([4, 8]));
            let projector: Vec<Vec<f32>> = m.mm_projector.linears.iter().map(|l| flat(l.weight.grad(&grads).expect("the projector's gradient"))).collect();
            (loss.into_scalar(), projected, dx, projector)
        };
        let want = run(&model);
        let mut frozen = FrozenCasts::<AD>::new(Some(DType::BF16));
        let cast_model = frozen.apply(model.clone());
        let got = run(&cast_model);
        assert_eq!(got.0.to_bits(), want.0.to_bits(), "loss {} against {}", got.0, want.0);
        assert_eq!(got.1.to_bits(), want.1.to_bits(), "the projector's output sum {} against {}", got.1, want.1);
        assert_eq!(got.2, want.2, "the input's gradient");
        assert_eq!(got.3, want.3, "the projector's gradients");

        let block = &cast_model.transformer.h[0];
        assert_eq!(block.attn.c_attn.weight.val().dtype(), DType::BF16, "a frozen Conv1D weight is cast");
        assert_eq!(block.mlp.c_fc.bias.val().dtype(), DType::BF16, "a frozen Conv1D bias is cast");
        let q_proj = &cast_model.vision_tower.vision_model.encoder.layers[0].self_attn.q_proj;
        assert_eq!(q_proj.weight.val().dtype(), DType::BF16, "a frozen Linear weight is cast");
        assert_eq!(q_proj.bias.as_ref().expect("CLIP's q_proj has a bias").val().dtype(), DType::BF16, "a frozen Linear's optional bias is cast");
        assert_eq!(block.ln_1.weight.val().dtype(), DType::F32, "LayerNorm is not cast");
        assert_eq!(cast_model.transformer.wte.weight.val().dtype(), DType::F32, "the embeddings are not cast");
        assert!(cast_model.mm_projector.linears.iter().all(|l| l.weight.val().dtype() == DType::F32), "the trained projector is not cast");
        assert_eq!(block.attn.c_attn.weight.id, model.transformer.h[0].attn.c_attn.weight.id, "the parameter keeps its id");
        let kept = frozen.len();
        assert!(kept > 0);
        let again = frozen.apply(model.clone());
        assert_eq!(frozen.len(), kept, "a second step casts nothing new");
        assert_eq!(again.transformer.h[1].mlp.c_proj.weight.val().into_data(), cast_model.transformer.h[1].mlp.c_proj.weight.val().into_data());
    }

    /// Without autocast nothing is cast.
    #[test]
    fn no_autocast_no_casts() {
        let device = FlexDevice;
        let model = crate::train::trainer::set_trainable(tiny_model(&device, "no-autocast"), false);
        let mut frozen = FrozenCasts::<AD>::new(None);
        let same = frozen.apply(model);
        assert!(frozen.is_empty());
        assert_eq!(same.transformer.h[0].attn.c_attn.weight.val().dtype(), DType::F32);
    }
}

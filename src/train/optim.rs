//! AdamW exactly as PyTorch's `torch.optim.AdamW` (decoupled weight decay applied first,
//! bias-corrected moments, epsilon outside the root), with HF Trainer's parameter groups (no
//! decay for biases and LayerNorm weights; an optional learning rate of its own for the
//! projector), global-norm gradient clipping as `clip_grad_norm_`, and the cosine schedule with
//! linear warmup of `get_cosine_schedule_with_warmup`.
//!
//! Written here rather than taken from burn because burn's AdamW has other defaults, clips per
//! tensor, has no parameter groups, and keys its state by parameter ids that change between runs;
//! this state is keyed by the parameter's module path, so a checkpoint resumes into a fresh model.
//! Parameters and moments stay in the parameters' dtype (f32 master weights in mixed precision).

use std::collections::BTreeMap;

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's and HF Trainer's defaults, but the weight decay of the reference recipe (0).
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, epsilon: 1e-8, weight_decay: 0.0 }
    }
}

/// First and second moments of one parameter, flattened.
pub struct Moments<B: Backend> {
    pub exp_avg: Tensor<B, 1>,
    pub exp_avg_sq: Tensor<B, 1>,
}

/// The optimizer: hyperparameters, the number of steps taken, and the moments by parameter path.
pub struct AdamW<B: Backend> {
    pub config: AdamWConfig,
    pub step: u64,
    pub state: BTreeMap<String, Moments<B>>,
    /// The forward's autocast dtype: where the fused CUDA kernel updates a parameter it also
    /// writes it in this dtype, so that the next forward need not cast it
    /// ([`crate::fused_optim::cast_parameter`]). `None`: no copies.
    pub compute_copies: Option<burn::tensor::DType>,
}

/// Where a parameter sits, as the module tree names it, and what kind of module holds it.
#[derive(Default)]
struct PathTracker {
    names: Vec<String>,
    types: Vec<String>,
}

impl PathTracker {
    fn enter(&mut self, name: &str, ty: &str) {
        self.names.push(name.to_string());
        self.types.push(ty.to_string());
    }
    fn exit(&mut self) {
        self.names.pop();
        self.types.pop();
    }
    fn path(&self) -> String {
        self.names.join(".")
    }
    /// HF Trainer's rule: biases and LayerNorm parameters are not decayed.
    fn decays(&self) -> bool {
        let is_bias = self.names.last().is_some_and(|n| n == "bias");
        let in_layer_norm = self.types.iter().any(|t| t.ends_with(":LayerNorm"));
        !is_bias && !in_layer_norm
    }
}

/// Which learning rate a parameter gets.
pub fn is_projector(path: &str) -> bool {
    path.starts_with("mm_projector")
}

/// The global L2 norm of the gradients of `module`'s trainable parameters (`clip_grad_norm_`'s
/// `total_norm`), read back as one number.
pub fn global_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M, grads: &GradientsParams) -> f64 {
    struct Norm<'a, B: AutodiffBackend> {
        grads: &'a GradientsParams,
        sum: Option<Tensor<B::InnerBackend, 1>>,
        /// The gradients, for one fused operation instead of four per gradient.
        fused: Option<Vec<burn::tensor::ops::FloatTensor<B::InnerBackend>>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Norm<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
                if let Some(fused) = self.fused.as_mut() {
                    fused.push(g.into_primitive().tensor());
                    return;
                }
                let g = g.cast(burn::tensor::DType::F32);
                let sq = (g.clone() * g).sum();
                self.sum = Some(match self.sum.take() {
                    Some(s) => s + sq,
                    None => sq,
                });
            }
        }
    }
    #[cfg(feature = "cuda")]
    let fused = crate::fused_optim::covers::<B::InnerBackend>().then(Vec::new);
    #[cfg(not(feature = "cuda"))]
    let fused = None;
    let mut norm = Norm::<B> { grads, sum: None, fused };
    module.visit(&mut norm);
    #[cfg(feature = "cuda")]
    if let Some(fused) = norm.fused.take() {
        if let Some(sum) = crate::fused_optim::try_sum_of_squares::<B::InnerBackend>(&fused) {
            return f64::from(sum.into_scalar().elem::<f32>()).sqrt();
        }
        // Not covered after all (a gradient of another dtype): burn's operations.
        let mut norm = Norm::<B> { grads, sum: None, fused: None };
        module.visit(&mut norm);
        return norm.sum.map_or(0.0, |s| f64::from(s.into_scalar().elem::<f32>()).sqrt());
    }
    norm.sum.map_or(0.0, |s| f64::from(s.into_scalar().elem::<f32>()).sqrt())
}

/// Names of the parameters that have a gradient (what training changes).
pub fn trainable_paths<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M) -> Vec<String> {
    struct Paths {
        tracker: PathTracker,
        out: Vec<String>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Paths {
        fn enter_module(&mut self, name: &str, ty: &str) {
            self.tracker.enter(name, ty);
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.tracker.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if param.val().is_require_grad() {
                self.out.push(self.tracker.path());
            }
        }
    }
    let mut v = Paths { tracker: PathTracker::default(), out: vec![] };
    module.visit(&mut v);
    v.out
}

/// Learning rates of one step.
#[derive(Debug, Clone, Copy)]
pub struct StepRates {
    pub lr: f64,
    /// The projector's, when it has its own (`mm_projector_lr`).
    pub projector_lr: Option<f64>,
    /// Multiplies every gradient (global-norm clipping; 1 when not clipping).
    pub grad_scale: f64,
}

impl<B: Backend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        Self { config, step: 0, state: BTreeMap::new(), compute_copies: None }
    }

    /// One update of every parameter of `module` that has a gradient in `grads`.
    pub fn step<A, M>(&mut self, module: M, mut grads: GradientsParams, rates: StepRates) -> M
    where
        A: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<A>,
    {
        self.step += 1;
        let mut mapper = Update::<A> { tracker: PathTracker::default(), grads: &mut grads, optim: self, rates };
        module.map(&mut mapper)
    }
}

struct Update<'a, A: AutodiffBackend> {
    tracker: PathTracker,
    grads: &'a mut GradientsParams,
    optim: &'a mut AdamW<A::InnerBackend>,
    rates: StepRates,
}

impl<A: AutodiffBackend> ModuleMapper<A> for Update<'_, A> {
    fn enter_module(&mut self, name: &str, ty: &str) {
        self.tracker.enter(name, ty);
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.tracker.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<A, D>>) -> Param<Tensor<A, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<A::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let path = self.tracker.path();
        let c = &self.optim.config;
        let lr = match self.rates.projector_lr {
            Some(lr) if is_projector(&path) => lr,
            _ => self.rates.lr,
        };
        let update = AdamWUpdate {
            lr,
            weight_decay: if self.tracker.decays() { c.weight_decay } else { 0.0 },
            beta1: c.beta1,
            beta2: c.beta2,
            epsilon: c.epsilon,
            step: self.optim.step,
            grad_scale: self.rates.grad_scale,
        };
        let require_grad = tensor.is_require_grad();
        let moments = self.optim.state.remove(&path);
        let (p, moments) = update.apply(tensor.inner(), grad, moments, self.optim.compute_copies);
        self.optim.state.insert(path, moments);
        let mut tensor = Tensor::from_inner(p);
        if require_grad {
            tensor = tensor.require_grad();
        }
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// One parameter's AdamW update: the hyperparameters as they apply to it at one step.
#[derive(Debug, Clone, Copy)]
pub struct AdamWUpdate {
    pub lr: f64,
    /// 0 for a parameter that is not decayed.
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub epsilon: f64,
    /// 1-based: the step being taken (the bias corrections' exponent).
    pub step: u64,
    /// Multiplies the gradient first (global-norm clipping).
    pub grad_scale: f64,
}

impl AdamWUpdate {
    /// `param` after the update from `grad` (its shape), and its moments (flattened; zeros when
    /// `moments` is `None`, the parameter's first step). On burn's fused CUDA backend one
    /// kernel does it ([`crate::fused_optim`]); elsewhere burn's operations below, in the same
    /// order. `copy`: the dtype the kernel also writes the new parameter in (see
    /// [`AdamW::compute_copies`]); the tensor version writes none.
    pub fn apply<B: Backend, const D: usize>(
        &self,
        param: Tensor<B, D>,
        grad: Tensor<B, D>,
        moments: Option<Moments<B>>,
        #[allow(unused_variables)] copy: Option<burn::tensor::DType>,
    ) -> (Tensor<B, D>, Moments<B>) {
        let shape = param.shape();
        let n = shape.num_elements();
        let moments = moments.unwrap_or_else(|| Moments {
            exp_avg: Tensor::zeros([n], (&param.device(), param.dtype())),
            exp_avg_sq: Tensor::zeros([n], (&param.device(), param.dtype())),
        });
        #[cfg(feature = "cuda")]
        let (param, grad, moments) = match crate::fused_optim::try_adamw(param, grad, moments.exp_avg, moments.exp_avg_sq, self, copy) {
            Ok((param, exp_avg, exp_avg_sq)) => return (param, Moments { exp_avg, exp_avg_sq }),
            Err((param, grad, exp_avg, exp_avg_sq)) => (param, grad, Moments { exp_avg, exp_avg_sq }),
        };
        let mut p = param.reshape([n]);
        let dtype = p.dtype();
        let g = grad.reshape([n]).cast(dtype) * self.grad_scale;
        if self.weight_decay != 0.0 {
            p = p * (1.0 - self.lr * self.weight_decay);
        }
        let exp_avg = moments.exp_avg * self.beta1 + g.clone() * (1.0 - self.beta1);
        let exp_avg_sq = moments.exp_avg_sq * self.beta2 + g.clone() * g * (1.0 - self.beta2);
        let t = self.step as i32;
        let bias_correction1 = 1.0 - self.beta1.powi(t);
        let bias_correction2 = 1.0 - self.beta2.powi(t);
        let denom = exp_avg_sq.clone().sqrt() / bias_correction2.sqrt() + self.epsilon;
        p = p - exp_avg.clone() / denom * (self.lr / bias_correction1);
        (p.reshape(shape), Moments { exp_avg, exp_avg_sq })
    }
}

/// `clip_grad_norm_`'s factor: `max_norm / (total + 1e-6)`, at most 1.
pub fn clip_scale(total_norm: f64, max_norm: Option<f64>) -> f64 {
    match max_norm {
        Some(max) if max > 0.0 => (max / (total_norm + 1e-6)).min(1.0),
        _ => 1.0,
    }
}

/// `get_cosine_schedule_with_warmup` (half a cosine wave) with HF's warmup steps
/// (`ceil(warmup_ratio * total)`): the learning rate for optimizer step `step` (0-based).
pub fn cosine_lr(base: f64, step: u64, total: u64, warmup_ratio: f64) -> f64 {
    let warmup = (warmup_ratio * total as f64).ceil() as u64;
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    base * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
}

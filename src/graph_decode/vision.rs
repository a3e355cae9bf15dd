//! The vision tower (CLIP) and projector on the decoder's kernels, so that a prompt's image
//! encoding, like its prefill, costs the host a few launches a layer instead of burn's tens of
//! microseconds per operation. The same products (cuBLASLt, f32 sums), flash attention (no
//! mask) and row kernels as the language model's prefill (src/graph_prefill.cu); the patch
//! embedding is a product over the patches' pixels. Only the layers up to `select_layer` run.

use super::*;
use crate::model::nn::Linear;
use crate::model::LlavaModel;

/// Device addresses of a tower layer's parameters (q, k and v side by side as one product).
struct VisionLayer {
    ln_1: (u64, u64, f32),
    qkv: (u64, u64),
    out_proj: (u64, u64),
    ln_2: (u64, u64, f32),
    fc1: (u64, u64),
    fc2: (u64, u64),
}

pub(super) struct Vision {
    width: usize,
    heads: usize,
    inner: usize,
    channels: usize,
    image_size: usize,
    patch: usize,
    /// A patch's pixel count rounded up to a multiple of eight (16-byte rows).
    patch_k: usize,
    /// 1 + patches.
    tokens: usize,
    activation: i32,
    keep_cls: bool,
    patch_weight: u64,
    class_embedding: u64,
    positions: u64,
    pre_ln: (u64, u64, f32),
    layers: Vec<VisionLayer>,
    /// The projector's linears: weight, bias, in and out widths.
    projector: Vec<(u64, u64, usize, usize)>,
    scale: f32,
    _flash_module: Arc<CudaModule>,
    flash: CudaFunction,
    pixels: u64,
    patches: u64,
    h: u64,
    y: u64,
    xn: u64,
    q: u64,
    k: u64,
    v: u64,
    attn: u64,
    lse: u64,
}

/// Why the decoder cannot encode this model's images itself, if it cannot.
pub(super) fn unsupported<B: Backend>(model: &LlavaModel<B>, bf16: bool, capability: (i32, i32)) -> Option<String> {
    let vm = &model.vision_tower.vision_model;
    let [width, ..] = vm.embeddings.patch_embedding.weight.dims();
    let heads = vm.encoder.layers.first().map_or(1, |l| l.self_attn.num_heads);
    let head_dim = width / heads.max(1);
    if !bf16 {
        Some("the model is f32".into())
    } else if capability.0 < 8 {
        Some(format!("the GPU is sm_{}{} (the flash kernel needs sm_80+)", capability.0, capability.1))
    } else if width % heads != 0 || head_dim % 16 != 0 || head_dim > 128 {
        Some(format!("the tower's heads are {head_dim} wide (the flash kernel takes multiples of 16 up to 128)"))
    } else if width > PREFILL_MAX_WIDTH || model.transformer.wte.weight.dims()[1] > PREFILL_MAX_WIDTH {
        Some(format!("a width over {PREFILL_MAX_WIDTH}"))
    } else {
        None
    }
}

/// A PyTorch `Linear` (weight `[out, in]`) as the products take it: weight `[in, out]`, bias
/// f32 (zeros when it has none).
fn linear<B: Backend>(up: &mut Uploader, l: &Linear<B>, what: &str) -> Result<(u64, u64), String> {
    let weight = up.values(l.weight.val().transpose(), true, what)?;
    let bias = match &l.bias {
        Some(b) => b.val(),
        None => Tensor::zeros([l.weight.dims()[0]], &l.weight.device()),
    };
    Ok((weight, up.values(bias, false, what)?))
}

impl Vision {
    /// Copies `model`'s tower (its first `select_layer` layers) and projector to the decoder's
    /// memory and compiles the tower's flash kernel. The caller checked [`unsupported`].
    pub(super) fn new<B: Backend>(model: &LlavaModel<B>, memory: &mut Memory, capability: (i32, i32)) -> Result<Self, String> {
        let vm = &model.vision_tower.vision_model;
        let emb = &vm.embeddings;
        let [width, channels, patch, _] = emb.patch_embedding.weight.dims();
        let tokens = emb.position_embedding.weight.dims()[0];
        let image_size = model.vision_tower.image_size();
        let layers_run = &vm.encoder.layers[..model.select_layer];
        let heads = vm.encoder.layers.first().map_or(1, |l| l.self_attn.num_heads);
        // Linear weights are [out, in].
        let inner = vm.encoder.layers.first().map_or(width, |l| l.mlp.fc1.weight.dims()[0]);
        let activation = activation_code(vm.encoder.layers.first().map_or(Activation::QuickGelu, |l| l.mlp.activation));
        let patch_k = (channels * patch * patch).div_ceil(8) * 8;
        let mut up = Uploader { memory, bf16: true };
        // The convolution's [width, c, p, p] as the product's [c·p·p (padded), width].
        let w = emb.patch_embedding.weight.val().reshape([width, channels * patch * patch]).transpose();
        let w = match patch_k - channels * patch * patch {
            0 => w,
            pad => Tensor::cat(vec![w.clone(), Tensor::zeros([pad, width], &w.device())], 0),
        };
        let patch_weight = up.values(w, true, "vision_model.embeddings.patch_embedding")?;
        let class_embedding = up.values(emb.class_embedding.val(), false, "vision_model.embeddings.class_embedding")?;
        let positions = up.values(emb.position_embedding.weight.val(), false, "vision_model.embeddings.position_embedding")?;
        let pre_ln = {
            let (g, b) = up.layernorm(&vm.pre_layrnorm, "vision_model.pre_layrnorm")?;
            (g, b, vm.pre_layrnorm.eps as f32)
        };
        let mut layers = Vec::with_capacity(layers_run.len());
        for (i, layer) in layers_run.iter().enumerate() {
            let name = |part: &str| format!("vision_model.encoder.layers.{i}.{part}");
            let a = &layer.self_attn;
            let qkv = Linear {
                // [3 width, width]: q, k and v's output rows stacked, so one product gives them side by side.
                weight: burn::module::Param::from_tensor(Tensor::cat(vec![a.q_proj.weight.val(), a.k_proj.weight.val(), a.v_proj.weight.val()], 0)),
                bias: Some(burn::module::Param::from_tensor(Tensor::cat(
                    [&a.q_proj, &a.k_proj, &a.v_proj]
                        .iter()
                        .map(|l| l.bias.as_ref().map_or_else(|| Tensor::zeros([width], &l.weight.device()), |b| b.val()))
                        .collect(),
                    0,
                ))),
            };
            let ln = |up: &mut Uploader, n: &crate::model::nn::LayerNorm<B>, part: &str| -> Result<(u64, u64, f32), String> {
                let (g, b) = up.layernorm(n, &name(part))?;
                Ok((g, b, n.eps as f32))
            };
            layers.push(VisionLayer {
                ln_1: ln(&mut up, &layer.layer_norm1, "layer_norm1")?,
                qkv: linear(&mut up, &qkv, &name("self_attn.{q,k,v}_proj"))?,
                out_proj: linear(&mut up, &a.out_proj, &name("self_attn.out_proj"))?,
                ln_2: ln(&mut up, &layer.layer_norm2, "layer_norm2")?,
                fc1: linear(&mut up, &layer.mlp.fc1, &name("mlp.fc1"))?,
                fc2: linear(&mut up, &layer.mlp.fc2, &name("mlp.fc2"))?,
            });
        }
        let mut projector = vec![];
        for (i, l) in model.mm_projector.linears.iter().enumerate() {
            let [d_out, d_in] = l.weight.dims();
            let (w, b) = linear(&mut up, l, &format!("mm_projector.{i}"))?;
            projector.push((w, b, d_in, d_out));
        }
        drop(up);
        let head_dim = width / heads;
        let (major, minor) = capability;
        let source = format!("#define HEAD_DIM {head_dim}\n#define IS_BF16 1\n#define MASK_BYTES 0\n#define DROPOUT 0\n#define OUT_TOKEN_MAJOR 1\n{}", crate::flash::source());
        let options = cudarc::nvrtc::CompileOptions { arch: Some(compute_arch(major, minor)), ..Default::default() };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, options).map_err(|e| format!("NVRTC on src/flash_attention.cu (head_dim {head_dim}): {e:?}"))?;
        let module = memory.context.load_module(ptx).map_err(|e| format!("loading the tower's flash kernel: {e}"))?;
        let flash = module.load_function("flash_attention_forward").map_err(|e| format!("the tower's flash kernel: {e}"))?;
        let d_text = model.transformer.wte.weight.dims()[1];
        let widest = (3 * width).max(inner).max(d_text);
        let scale = (1.0 / (head_dim as f64).sqrt()) as f32;
        Ok(Vision {
            width,
            heads,
            inner,
            channels,
            image_size,
            patch,
            patch_k,
            tokens,
            activation,
            keep_cls: model.keep_cls,
            patch_weight,
            class_embedding,
            positions,
            pre_ln,
            layers,
            projector,
            scale,
            _flash_module: module,
            flash,
            pixels: memory.alloc(channels * image_size * image_size * 4, "the image's pixels")?,
            patches: memory.alloc(tokens * patch_k * 2, "the image's patches")?,
            h: memory.alloc(tokens * width * 4, "the tower's residual stream")?,
            y: memory.alloc(tokens * widest * 4, "the tower's product sums")?,
            xn: memory.alloc(tokens * widest * 2, "the tower's product inputs")?,
            q: memory.alloc(tokens * width * 2, "the tower's queries")?,
            k: memory.alloc(tokens * width * 2, "the tower's keys")?,
            v: memory.alloc(tokens * width * 2, "the tower's values")?,
            attn: memory.alloc(tokens * width * 2, "the tower's attention output")?,
            lse: memory.alloc(heads * tokens * 4, "the tower's log-sum-exp")?,
        })
    }

    /// Feature rows an image gives the prompt.
    pub(super) fn image_tokens(&self) -> usize {
        self.tokens - usize::from(!self.keep_cls)
    }

    pub(super) fn pixel_count(&self) -> usize {
        self.channels * self.image_size * self.image_size
    }

    /// Queues one image's encoding on `s`: its features (the projector's last sums, before
    /// that linear's bias, which [`Self::last_bias`] gives) land in `features`, image_tokens()
    /// rows of the text width. `pixels` is [channels, size, size].
    pub(super) fn encode(&self, kernels: &Kernels, gemm: &mut crate::cublaslt::RawGemm, s: &CudaStream, pixels: &[f32], features: u64) -> Result<(), String> {
        if pixels.len() != self.pixel_count() {
            return Err(format!("an image of {} values, the tower takes {}x{}x{}", pixels.len(), self.channels, self.image_size, self.image_size));
        }
        let run = |name: &str, r: Result<(), DriverError>| r.map_err(|e| format!("vision kernel {name}: {e}"));
        let (width, tokens, patches) = (self.width, self.tokens, self.tokens - 1);
        let elementwise = |count: usize| (count.div_ceil(256) as u32, 1);
        let rows_grid = (tokens as u32, 1);
        let null = 0u64;
        let w = width as i32;
        // SAFETY: `pixels` holds pixel_count() f32s (checked above); the copy is synchronous
        // with respect to the host buffer.
        unsafe { result::memcpy_htod_async(self.pixels, pixels, s.cu_stream()) }.map_err(|e| format!("copying the image: {e}"))?;
        let (c, size, p, pk) = (self.channels as i32, self.image_size as i32, self.patch as i32, self.patch_k as i32);
        // SAFETY (every launch and product): the parameters are the kernels' in order, device
        // addresses of buffers sized in `new` for one image; all in order on `s`.
        let mut params = params![&self.pixels, &self.patches, &c, &size, &p, &pk];
        run("patches", unsafe { launch_kernel(&kernels.vision_patches, s, elementwise(patches * self.patch_k), 256, 0, false, &mut params) })?;
        unsafe { gemm.bf16_to_f32(s, self.patches, self.patch_weight, self.y, (patches, self.patch_k, width)) }?;
        let (g1, b1, e1) = self.layers.first().map_or((0, 0, 0.0), |l| l.ln_1);
        let (gp, bp, ep) = self.pre_ln;
        let mut params = params![&self.y, &self.class_embedding, &self.positions, &gp, &bp, &ep, &self.h, &g1, &b1, &e1, &self.xn, &w];
        run("embeddings", unsafe { launch_kernel(&kernels.vision_embeddings, s, rows_grid, 256, 0, false, &mut params) })?;
        let head_dim = width / self.heads;
        let (t, hd) = (tokens as i32, head_dim as i32);
        let inner = self.inner as i32;
        for (i, layer) in self.layers.iter().enumerate() {
            unsafe { gemm.bf16_to_f32(s, self.xn, layer.qkv.0, self.y, (tokens, width, 3 * width)) }?;
            // q to `q`, keys and values to [heads, tokens, head_dim] (the split the prefill uses
            // for its cache, with the tower's tokens as the positions).
            let mut params = params![&self.y, &layer.qkv.1, &self.q, &self.k, &self.v, &t, &w, &hd, &t];
            run("split q, k, v", unsafe { launch_kernel(&kernels.prefill_split_qkv, s, elementwise(tokens * 3 * width), 256, 0, false, &mut params) })?;
            let per_head = (tokens * head_dim) as i64;
            let flash = FlashParams {
                batch: 1,
                heads: self.heads as i64,
                queries: tokens as i64,
                keys: tokens as i64,
                q_stride: [(tokens * width) as i64, head_dim as i64, width as i64, 1],
                k_stride: [self.heads as i64 * per_head, per_head, head_dim as i64, 1],
                v_stride: [self.heads as i64 * per_head, per_head, head_dim as i64, 1],
                scale_log2e: ((self.scale as f64 * std::f64::consts::LOG2_E) as f32).to_bits() as i64,
                scale: self.scale.to_bits() as i64,
                keep_scale: 1f32.to_bits() as i64,
                ..FlashParams::default()
            };
            // The mask's, the seed's and the tile map's places, unread, filled by `q`.
            let mut params = params![&self.q, &self.k, &self.v, &self.q, &self.q, &self.q, &self.attn, &self.lse, &flash];
            let grid = (tokens.div_ceil(FLASH_QUERIES) as u32, self.heads as u32);
            run("flash attention", unsafe { launch_kernel(&self.flash, s, grid, 128, 0, false, &mut params) })?;
            unsafe { gemm.bf16_to_f32(s, self.attn, layer.out_proj.0, self.y, (tokens, width, width)) }?;
            let (g, b, e) = layer.ln_2;
            let mut params = params![&self.h, &null, &null, &self.y, &layer.out_proj.1, &g, &b, &e, &self.xn, &w];
            run("attention residual + layer_norm2", unsafe { launch_kernel(&kernels.prefill_residual_layernorm, s, rows_grid, 256, 0, false, &mut params) })?;
            unsafe { gemm.bf16_to_f32(s, self.xn, layer.fc1.0, self.y, (tokens, width, self.inner)) }?;
            let mut params = params![&self.y, &layer.fc1.1, &self.xn, &t, &inner, &self.activation];
            run("fc1 bias + activation", unsafe { launch_kernel(&kernels.prefill_bias_activation, s, elementwise(tokens * self.inner), 256, 0, false, &mut params) })?;
            unsafe { gemm.bf16_to_f32(s, self.xn, layer.fc2.0, self.y, (tokens, self.inner, width)) }?;
            let (g, b, e) = self.layers.get(i + 1).map_or((0, 0, 0.0), |l| l.ln_1);
            let mut params = params![&self.h, &null, &null, &self.y, &layer.fc2.1, &g, &b, &e, &self.xn, &w];
            run("mlp residual + layer_norm1", unsafe { launch_kernel(&kernels.prefill_residual_layernorm, s, rows_grid, 256, 0, false, &mut params) })?;
        }
        // The selected hidden state's rows (without the class token unless kept) through the
        // projector: GELU (erf) between its linears; the last one's sums go to `features`.
        let first = i32::from(!self.keep_cls);
        let rows = self.image_tokens();
        let rows_i = rows as i32;
        if self.projector.is_empty() {
            let mut params = params![&self.h, &first, &rows_i, &w, &null, &features];
            return run("features", unsafe { launch_kernel(&kernels.vision_take_rows, s, elementwise(rows * width), 256, 0, false, &mut params) });
        }
        let mut params = params![&self.h, &first, &rows_i, &w, &self.xn, &null];
        run("projector input", unsafe { launch_kernel(&kernels.vision_take_rows, s, elementwise(rows * width), 256, 0, false, &mut params) })?;
        let gelu = 1i32;
        for (i, &(weight, bias, d_in, d_out)) in self.projector.iter().enumerate() {
            if i + 1 == self.projector.len() {
                unsafe { gemm.bf16_to_f32(s, self.xn, weight, features, (rows, d_in, d_out)) }?;
            } else {
                unsafe { gemm.bf16_to_f32(s, self.xn, weight, self.y, (rows, d_in, d_out)) }?;
                let d = d_out as i32;
                let mut params = params![&self.y, &bias, &self.xn, &rows_i, &d, &gelu];
                run("projector GELU", unsafe { launch_kernel(&kernels.prefill_bias_activation, s, elementwise(rows * d_out), 256, 0, false, &mut params) })?;
            }
        }
        Ok(())
    }

    /// The bias the features still need (the projector's last linear's), or 0 (none).
    pub(super) fn last_bias(&self) -> u64 {
        self.projector.last().map_or(0, |l| l.1)
    }
}

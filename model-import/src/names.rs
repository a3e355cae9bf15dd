//! The name tables: for each kind of checkpoint, which stored key holds the tensor at a given
//! module path of ours, and which stored keys are known non-weights to pass over.
//!
//! Our module paths mirror Hugging Face's names: `vision_model.encoder.layers.3.mlp.fc1.weight`
//! (CLIP), `transformer.h.0.attn.c_attn.weight` (GPT-2). The only structural difference is the
//! projector, whose linears sit at `linears.{i}` while PyTorch's `nn.Sequential` numbers the
//! GELUs too (`0`, `2`, `4`, ...).

/// How a projector's linears are numbered in a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProjectorLayout {
    /// `mlpNx_gelu`: `nn.Sequential(Linear, GELU, Linear, ...)`, linears at even indices.
    Sequential,
    /// `linear`: a bare `nn.Linear`, no index.
    Single,
}

/// Which kind of checkpoint is being read into which of our modules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// A CLIP checkpoint (`CLIPModel` or `CLIPVisionModel`) into our CLIP vision model.
    Clip,
    /// A GPT-2 checkpoint (`GPT2LMHeadModel`, or `GPT2Model` without the `transformer.`
    /// prefix) into our GPT-2 LM.
    Gpt2,
    /// A projector checkpoint (`mm_projector.bin`) into our projector.
    Projector(ProjectorLayout),
    /// A whole LLaVA-JP checkpoint into our LLaVA model.
    LlavaJp(ProjectorLayout),
    /// One of our own checkpoints: stored names are our module paths.
    Native,
}

/// The prefix under which a LLaVA-JP checkpoint stores the CLIP tower.
pub const LLAVA_VISION_PREFIX: &str = "model.vision_tower.vision_tower.";
/// The prefix under which LLaVA-JP stores the projector (whole model and `mm_projector.bin`).
pub const LLAVA_PROJECTOR_PREFIX: &str = "model.mm_projector.";

impl Layout {
    /// Stored keys that may hold the tensor at `path` (one of our module paths), most likely
    /// first.
    pub fn candidates(&self, path: &str) -> Vec<String> {
        match self {
            Layout::Clip => {
                let mut keys = vec![path.to_string(), format!("{LLAVA_VISION_PREFIX}{path}")];
                keys.extend(without_vision_model(path));
                keys
            }
            Layout::Gpt2 => {
                let mut keys = vec![path.to_string()];
                if let Some(rest) = path.strip_prefix("transformer.") {
                    keys.push(rest.to_string());
                }
                keys
            }
            Layout::Projector(p) => projector_keys(*p, path)
                .into_iter()
                .flat_map(|k| [format!("{LLAVA_PROJECTOR_PREFIX}{k}"), format!("mm_projector.{k}")])
                .collect(),
            Layout::Native => vec![path.to_string()],
            Layout::LlavaJp(p) => {
                if let Some(rest) = path.strip_prefix("vision_tower.") {
                    let mut keys = vec![format!("{LLAVA_VISION_PREFIX}{rest}")];
                    keys.extend(without_vision_model(rest).map(|k| format!("{LLAVA_VISION_PREFIX}{k}")));
                    keys
                } else if let Some(rest) = path.strip_prefix("mm_projector.") {
                    projector_keys(*p, rest)
                        .into_iter()
                        .map(|k| format!("{LLAVA_PROJECTOR_PREFIX}{k}"))
                        .collect()
                } else {
                    vec![path.to_string()]
                }
            }
        }
    }

    /// Whether a stored key that no module path claimed is a known non-weight (a buffer, the
    /// CLIP text tower, a tied `lm_head`) rather than a sign of the wrong model.
    pub fn is_ignorable(&self, key: &str, has_lm_head: bool) -> bool {
        let buffer = key.ends_with(".attn.bias")
            || key.ends_with(".attn.masked_bias")
            || key.ends_with("position_ids");
        let tied_head = key == "lm_head.weight" && !has_lm_head;
        let clip_text = |k: &str| {
            k.starts_with("text_model.")
                || k == "logit_scale"
                || k.starts_with("text_projection.")
                || k.starts_with("visual_projection.")
        };
        match self {
            Layout::Clip => buffer || clip_text(key),
            Layout::Gpt2 => buffer || tied_head,
            // v1.0 checkpoints also carry the unused duplicate GPT-2 that the v1.0 code kept
            // inside `model` (`model.transformer.*`, `model.lm_head.weight`).
            Layout::LlavaJp(_) => {
                buffer || tied_head || key.starts_with("model.transformer.") || key == "model.lm_head.weight"
            }
            Layout::Projector(_) | Layout::Native => false,
        }
    }
}

/// transformers 5 saves a `CLIPVisionModel` without the `vision_model.` level (4.x kept it, and
/// LLaVA-JP's checkpoints have it): both spellings are accepted.
fn without_vision_model(path: &str) -> Option<String> {
    path.strip_prefix("vision_model.").map(str::to_string)
}

/// Our projector paths are `linears.{i}.{weight,bias}`; the stored names drop `linears` and
/// number the linears as `nn.Sequential` does.
fn projector_keys(layout: ProjectorLayout, path: &str) -> Vec<String> {
    let Some(rest) = path.strip_prefix("linears.") else {
        return vec![path.to_string()];
    };
    let Some((index, param)) = rest.split_once('.') else {
        return vec![path.to_string()];
    };
    let Ok(i) = index.parse::<usize>() else {
        return vec![path.to_string()];
    };
    match layout {
        ProjectorLayout::Sequential => vec![format!("{}.{param}", 2 * i)],
        ProjectorLayout::Single => vec![param.to_string()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llava_names_follow_the_reference_layout() {
        let l = Layout::LlavaJp(ProjectorLayout::Sequential);
        assert_eq!(
            l.candidates("vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight"),
            vec![
                "model.vision_tower.vision_tower.vision_model.encoder.layers.3.mlp.fc1.weight",
                "model.vision_tower.vision_tower.encoder.layers.3.mlp.fc1.weight"
            ]
        );
        assert_eq!(l.candidates("mm_projector.linears.1.bias"), vec!["model.mm_projector.2.bias"]);
        assert_eq!(
            Layout::Clip.candidates("vision_model.pre_layrnorm.weight").last().unwrap(),
            "pre_layrnorm.weight",
            "transformers 5 CLIPVisionModel names"
        );
        assert_eq!(l.candidates("transformer.h.0.attn.c_attn.weight"), vec!["transformer.h.0.attn.c_attn.weight"]);
        let single = Layout::Projector(ProjectorLayout::Single);
        assert_eq!(single.candidates("linears.0.weight")[0], "model.mm_projector.weight");
    }

    #[test]
    fn buffers_and_text_tower_are_ignorable_but_weights_are_not() {
        assert!(Layout::Gpt2.is_ignorable("transformer.h.3.attn.masked_bias", true));
        assert!(Layout::Gpt2.is_ignorable("lm_head.weight", false));
        assert!(!Layout::Gpt2.is_ignorable("lm_head.weight", true));
        assert!(Layout::Clip.is_ignorable("text_model.encoder.layers.0.mlp.fc1.weight", false));
        assert!(!Layout::Clip.is_ignorable("vision_model.post_layernorm.weight", false));
    }
}

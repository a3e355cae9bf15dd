//! The multimodal projector (`mm_projector`): `linear`, `identity`, or `mlpNx_gelu`
//! (`Linear, GELU, Linear, ... ` with N linears and exact erf GELU between them).

use burn::prelude::*;

use super::nn::{Activation, Linear};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectorKind {
    Identity,
    Linear,
    /// `mlpNx_gelu` with N linears.
    Mlp(usize),
}

impl ProjectorKind {
    pub fn parse(name: &str) -> Result<Self, String> {
        let expected = || "`linear`, `identity` or `mlpNx_gelu` with N >= 1".to_string();
        match name {
            "identity" => Ok(Self::Identity),
            "linear" => Ok(Self::Linear),
            _ => {
                let n = name
                    .strip_prefix("mlp")
                    .and_then(|r| r.strip_suffix("x_gelu"))
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|n| *n >= 1)
                    .ok_or_else(expected)?;
                Ok(Self::Mlp(n))
            }
        }
    }

    pub fn linears(&self) -> usize {
        match self {
            Self::Identity => 0,
            Self::Linear => 1,
            Self::Mlp(n) => *n,
        }
    }

    /// How a checkpoint numbers this projector's linears.
    pub fn layout(&self) -> llava_jp_import::ProjectorLayout {
        match self {
            Self::Mlp(_) => llava_jp_import::ProjectorLayout::Sequential,
            _ => llava_jp_import::ProjectorLayout::Single,
        }
    }
}

#[derive(Module, Debug)]
pub struct Projector<B: Backend> {
    /// Empty for `identity`.
    pub linears: Vec<Linear<B>>,
}

impl<B: Backend> Projector<B> {
    pub fn new(kind: ProjectorKind, d_vision: usize, d_text: usize, device: &B::Device) -> Self {
        if kind == ProjectorKind::Identity {
            assert_eq!(d_vision, d_text, "an identity projector needs mm_hidden_size == n_embd");
        }
        let linears = (0..kind.linears())
            .map(|i| Linear::new(if i == 0 { d_vision } else { d_text }, d_text, true, device))
            .collect();
        Self { linears }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mut x = x;
        for (i, linear) in self.linears.iter().enumerate() {
            if i > 0 {
                x = Activation::Gelu.forward(x);
            }
            x = linear.forward(x);
        }
        x
    }
}

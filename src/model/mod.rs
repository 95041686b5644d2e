//! The Probabilistic U-Net (Kohl et al. 2018), layer for layer as the seed's PyTorch port
//! (spec/model.md): a U-Net for features, prior and posterior nets that map an image (and
//! a mask) to a diagonal Gaussian over a small latent space, and fcomb, which combines a
//! latent sample with the U-Net features into logits.
//!
//! Each part is a struct built from a `tch::nn::Path` with a plain `forward`. Every
//! libtorch call goes through its fallible `f_` variant, so an allocation that fails (a
//! full GPU, say) comes back as a [`ModelError::Torch`] rather than a panic.
mod fcomb;
mod fcomb_kernel;
mod footprint;
mod gaussian;
mod layers;
pub mod layout;
pub mod parts;
mod probunet;
mod simd;
mod unet;
mod winograd;

pub use unet::CONVS_PER_BLOCK;

pub use fcomb::Fcomb;
pub use gaussian::{AxisAlignedConvGaussian, DiagonalGaussian};
pub use layers::{truncated_normal_, Conv2d, ConvInit};
pub use probunet::{ElboTerms, ProbUNet, Share};
pub use unet::{Encoder, UNet};

use serde::{Deserialize, Serialize};
use std::fmt;
use tch::{nn, TchError};

/// Stops autograd tracking `vs`'s weights, for a model that only infers (what
/// `VarStore::freeze` does, with libtorch's errors returned).
pub fn freeze(vs: &nn::VarStore) -> Result<(), TchError> {
    for weight in vs.trainable_variables() {
        let _ = weight.f_set_requires_grad(false)?;
    }
    Ok(())
}

/// How the reconstruction term reduces the per-pixel BCE, which decides what a given beta
/// means. The seed sums over batch, H and W; Kohl et al.'s TF code sums per image and then
/// averages over the batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reduction {
    /// Sum over batch, H and W (the seed's choice).
    #[default]
    Sum,
    /// Sum over H and W, mean over the batch (the original TF implementation).
    BatchMean,
}

impl fmt::Display for Reduction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reduction::Sum => "sum",
            Reduction::BatchMean => "batch_mean",
        })
    }
}

/// The model's shape and objective. Defaults are the seed's training defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Channels per level of the U-Net and of both encoders.
    pub filters: Vec<i64>,
    pub latent_dim: i64,
    /// 1x1 convolutions in fcomb, the last one included (at least 2).
    pub fcomb_convs: usize,
    /// Weight of the KL term in the ELBO.
    pub beta: f64,
    pub reconstruction: Reduction,
    /// When set, log sigma of prior and posterior is clamped to [-c, c], keeping its gradient
    /// so a head pushed past the bound is pulled back (off in the seed).
    pub log_sigma_clamp: Option<f64>,
    /// Weight of the L2 term (sum of parameter norms of prior, posterior, fcomb hidden layers).
    pub l2_weight: f64,
    pub input_channels: i64,
    pub num_classes: i64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            filters: vec![32, 64, 128, 192],
            latent_dim: 2,
            fcomb_convs: 4,
            beta: 10.0,
            reconstruction: Reduction::Sum,
            log_sigma_clamp: None,
            l2_weight: 1e-5,
            input_channels: 1,
            num_classes: 1,
        }
    }
}

/// Levels of the U-Net at most: 16 already asks for sides divisible by 32,768.
pub const MAX_LEVELS: usize = 16;
/// fcomb's 1x1 convolutions at most; the seed uses 4.
pub const MAX_FCOMB_CONVS: usize = 64;

impl ModelConfig {
    /// Checks what the layers cannot: that the shape is buildable.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |key: &'static str, why: String| Err(ModelError::Config { key, why });
        if self.filters.is_empty() || self.filters.iter().any(|&f| f <= 0) {
            return bad(
                "filters",
                format!("needs one or more positive counts, got {:?}", self.filters),
            );
        }
        if self.filters.len() > MAX_LEVELS {
            return bad(
                "filters",
                format!(
                    "at most {MAX_LEVELS} levels (images would need sides divisible by \
                     2^{}), got {}",
                    MAX_LEVELS - 1,
                    self.filters.len()
                ),
            );
        }
        if self.latent_dim <= 0 {
            return bad(
                "latent_dim",
                format!("must be positive, got {}", self.latent_dim),
            );
        }
        if !(2..=MAX_FCOMB_CONVS).contains(&self.fcomb_convs) {
            return bad(
                "fcomb_convs",
                format!(
                    "must be between 2 and {MAX_FCOMB_CONVS}, got {}",
                    self.fcomb_convs
                ),
            );
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return bad(
                "beta",
                format!("must be finite and non-negative, got {}", self.beta),
            );
        }
        if let Some(c) = self.log_sigma_clamp {
            if !(c.is_finite() && c > 0.0) {
                return bad(
                    "log_sigma_clamp",
                    format!("must be finite and positive, got {c}"),
                );
            }
        }
        if !(self.l2_weight.is_finite() && self.l2_weight >= 0.0) {
            return bad(
                "l2_weight",
                format!("must be finite and non-negative, got {}", self.l2_weight),
            );
        }
        if self.input_channels <= 0 {
            let why = format!("must be positive, got {}", self.input_channels);
            return bad("input_channels", why);
        }
        if self.num_classes <= 0 {
            let why = format!("must be positive, got {}", self.num_classes);
            return bad("num_classes", why);
        }
        Ok(())
    }

    /// H and W must be divisible by this: every level but the first halves them.
    pub fn size_divisor(&self) -> i64 {
        1 << (self.filters.len() - 1)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model.{key}: {why}")]
    Config { key: &'static str, why: String },
    #[error(
        "input of {height}x{width} pixels: height and width must be divisible by {divisor} \
         (2^(levels-1) for {levels} levels)"
    )]
    InputSize {
        height: i64,
        width: i64,
        divisor: i64,
        levels: usize,
    },
    #[error("expected {what} of shape {expected}, got {got:?}")]
    Shape {
        what: &'static str,
        expected: String,
        got: Vec<i64>,
    },
    #[error(transparent)]
    TooLarge(#[from] crate::memory::budget::TooLarge),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

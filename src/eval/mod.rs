//! Sampling the model on a split and scoring the samples against every annotation: the
//! code behind validation during training, `probunet eval` and `probunet bench-eval`.
//!
//! - [`batch`]: the per-batch scoring on the device (pairwise IoU counts, NCC, the mean
//!   prediction) and the per-image sampling noise;
//! - [`command`]: `probunet eval`, a run's checkpoint on a split of its store;
//! - [`report`]: what it writes (JSON, CSV, PNG figures, TensorBoard);
//! - [`bench`]: the eval throughput benchmark.
pub mod batch;
pub mod bench;
pub mod command;
pub mod report;

pub use batch::{batch_noise, item_noise, BatchCounts};
pub use command::{evaluate, CheckpointChoice, EvalOptions, EvalOutcome, DEFAULT_SAMPLES};

use crate::data::loader::in_order;
use crate::data::split::SplitName;
use crate::data::store::Store;
use crate::metrics::{EmptyConvention, ImageMetrics, MetricsError};
use crate::model::{ModelError, ProbUNet};
use crate::tensorboard::{Image, TensorboardError};
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Tensorboard(#[from] TensorboardError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// Run folders, checkpoints and stores are read (and files written) with the training
    /// code, whose errors name the path.
    #[error(transparent)]
    Train(Box<crate::train::TrainError>),
    #[error("{}: {why}", path.display())]
    Io { path: PathBuf, why: String },
    #[error("{}: no checkpoint to evaluate{why}", run.display())]
    NoCheckpoint { run: PathBuf, why: String },
    #[error(
        "checkpoint {} does not fit the model of {} (model.filters = {filters:?}, \
         latent_dim = {latent_dim}, fcomb_convs = {fcomb_convs}): {why}",
        checkpoint.display(), spec.display()
    )]
    CheckpointMismatch {
        checkpoint: PathBuf,
        spec: PathBuf,
        filters: Vec<i64>,
        latent_dim: i64,
        fcomb_convs: usize,
        why: String,
    },
    #[error("{}: the {split} split is empty ({sizes}); evaluate another split with --split", store.display())]
    EmptySplit {
        store: PathBuf,
        split: SplitName,
        sizes: String,
    },
    #[error("{0}")]
    Options(String),
    #[error("{0}")]
    Shapes(String),
}

impl From<crate::train::TrainError> for EvalError {
    fn from(e: crate::train::TrainError) -> Self {
        EvalError::Train(Box::new(e))
    }
}

/// Samples of one batch: `[b, n, H, W]` foreground probabilities on the device.
pub fn sample_probabilities(
    model: &ProbUNet,
    images: &Tensor,
    samples: i64,
) -> Result<Tensor, ModelError> {
    let logits = tch::no_grad(|| model.sample(images, samples))?;
    Ok(logits.select(2, 0).sigmoid())
}

/// Per-image metrics for a batch under one convention. `masks` is u8 `[b, A, H, W]`,
/// `probs` `[b, n, H, W]`; the counts are computed on their device ([`BatchCounts`]). An
/// image whose samples are not finite (a diverged model) scores NaN.
pub fn batch_metrics(
    masks: &Tensor,
    probs: &Tensor,
    convention: EmptyConvention,
) -> Result<Vec<ImageMetrics>, EvalError> {
    let n = probs.size()[1] as usize;
    let mut scores = BatchCounts::compute(masks, probs, &[n])?.scores()?;
    Ok(scores
        .swap_remove(0)
        .iter()
        .map(|s| *s.get(convention))
        .collect())
}

/// What validation reports.
#[derive(Debug, Clone)]
pub struct Validation {
    /// ELBO and KL per image, averaged over the items and every annotation.
    pub elbo: f64,
    pub kl: f64,
    pub per_image: Vec<ImageMetrics>,
    /// Item indices, in the order of `per_image`.
    pub items: Vec<usize>,
}

impl Validation {
    fn mean(&self, f: impl Fn(&ImageMetrics) -> f64) -> f64 {
        let values: Vec<f64> = self
            .per_image
            .iter()
            .map(f)
            .filter(|v| !v.is_nan())
            .collect();
        if values.is_empty() {
            return f64::NAN;
        }
        values.iter().sum::<f64>() / values.len() as f64
    }

    pub fn ged(&self) -> f64 {
        self.mean(|m| m.ged)
    }

    pub fn hm_iou(&self) -> f64 {
        self.mean(|m| m.hm_iou)
    }
}

/// ELBO, KL, and sample metrics on (up to `max_items` of) a split, `batch` images at a time.
#[allow(clippy::too_many_arguments)]
pub fn validate(
    model: &ProbUNet,
    store: &Store,
    part: SplitName,
    batch: usize,
    samples: i64,
    max_items: Option<usize>,
    device: Device,
    convention: EmptyConvention,
) -> Result<Validation, EvalError> {
    let limit = max_items.unwrap_or(usize::MAX);
    let (mut elbo, mut kl, mut terms) = (0.0, 0.0, 0usize);
    let mut per_image = Vec::new();
    let mut items = Vec::new();
    for (idx, images, masks) in in_order(store, part, batch, device) {
        if items.len() >= limit {
            break;
        }
        let keep = (limit - items.len()).min(idx.len());
        let (images, masks) = (
            images.narrow(0, 0, keep as i64),
            masks.narrow(0, 0, keep as i64),
        );
        for a in 0..masks.size()[1] {
            let mask = masks.narrow(1, a, 1).to_kind(Kind::Float);
            let t = tch::no_grad(|| model.elbo(&images, &mask))?;
            // The reconstruction is reduced per the config; report it per image.
            let per_image_scale = match model.config().reconstruction {
                crate::model::Reduction::Sum => keep as f64,
                crate::model::Reduction::BatchMean => 1.0,
            };
            let kl_mean = t.kl.double_value(&[]);
            let rec = t.reconstruction.double_value(&[]) / per_image_scale;
            elbo += -(rec + model.config().beta * kl_mean) * keep as f64;
            kl += kl_mean * keep as f64;
            terms += keep;
        }
        let probs = sample_probabilities(model, &images, samples)?;
        per_image.extend(batch_metrics(&masks, &probs, convention)?);
        items.extend_from_slice(&idx[..keep]);
    }
    let terms = terms.max(1) as f64;
    Ok(Validation {
        elbo: elbo / terms,
        kl: kl / terms,
        per_image,
        items,
    })
}

/// A picture of a few items: per row the input, every annotation, `samples` samples and
/// the mean foreground probability.
pub fn sample_grid(
    model: &ProbUNet,
    images: &Tensor,
    masks: &Tensor,
    samples: i64,
) -> Result<Image, EvalError> {
    let probs = sample_probabilities(model, images, samples)?;
    let rows: Vec<report::FigureRow> = (0..images.size()[0])
        .map(|r| report::FigureRow {
            image: images.get(r),
            masks: masks.get(r),
            probs: probs.get(r),
        })
        .collect();
    report::figure(&rows, samples, false)
}

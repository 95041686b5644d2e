//! Scoring a model's samples against every annotation: the one sampling path that
//! training's validation, `probunet eval` and `bench-eval` share.
//!
//! Every image's samples come from its own seeded noise
//! ([`item_noise`](crate::seed::item_noise)), so a checkpoint, split, seed and sample
//! count give the same scores whatever the batch size, and validation during training
//! scores exactly what `probunet eval --split val` would.
//!
//! - [`batch`]: the per-batch counts on the device (pairwise IoU, NCC, mean prediction);
//! - [`figure`]: pictures of images, annotations and samples.
pub mod batch;
pub mod figure;

pub use batch::{batch_noise, BatchCounts};
pub use figure::{figure, FigureRow, MAX_VARIANCE};

use crate::data::loader::in_order;
use crate::data::split::SplitName;
use crate::data::store::Store;
use crate::metrics::{EmptyConvention, ImageMetrics, MetricsError};
use crate::model::{ModelError, ProbUNet, Reduction};
use crate::tensorboard::{Image, TensorboardError};
use tch::{Device, Kind, TchError, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Tensorboard(#[from] TensorboardError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Figure(#[from] crate::figure::FigureError),
    #[error("{0}")]
    Shapes(String),
}

/// `[b, n, H, W]` foreground probabilities of `images` for the noise `eps`
/// (`[b, n, latent_dim]`, from [`batch_noise`]).
pub fn probabilities(
    model: &ProbUNet,
    images: &Tensor,
    eps: &Tensor,
) -> Result<Tensor, ScoreError> {
    let logits = tch::no_grad(|| model.sample_with_noise(images, eps))?;
    Ok(logits.f_select(2, 0)?.f_sigmoid()?)
}

/// `samples` samples of each store item in `items` (their images on the model's device):
/// `[b, samples, H, W]` probabilities.
pub fn sample_items(
    model: &ProbUNet,
    images: &Tensor,
    items: &[usize],
    samples: usize,
    seed: u64,
) -> Result<Tensor, ScoreError> {
    let eps = batch_noise(seed, items, samples, model.config().latent_dim as usize)?;
    probabilities(model, images, &eps)
}

/// Per-image metrics for a batch under one convention. `masks` is u8 `[b, A, H, W]`,
/// `probs` `[b, n, H, W]`; the counts are computed on their device ([`BatchCounts`]). An
/// image whose samples are not finite (a diverged model) scores NaN.
pub fn batch_metrics(
    masks: &Tensor,
    probs: &Tensor,
    convention: EmptyConvention,
) -> Result<Vec<ImageMetrics>, ScoreError> {
    let n = probs.size()[1] as usize;
    let mut scores = BatchCounts::compute(masks, probs, &[n])?.scores()?;
    Ok(scores
        .swap_remove(0)
        .iter()
        .map(|s| *s.get(convention))
        .collect())
}

/// What validation scores: which items, how many samples of each, from which seed.
#[derive(Debug, Clone, Copy)]
pub struct ValidationPlan {
    pub split: SplitName,
    /// Images per forward pass; the scores do not depend on it.
    pub batch: usize,
    pub samples: usize,
    /// The first `max_items` items of the split, or all.
    pub max_items: Option<usize>,
    /// The seed of the sampling noise.
    pub seed: u64,
    pub convention: EmptyConvention,
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

/// ELBO and KL of one batch summed over its images, once per annotation: the sums and
/// how many (image, annotation) terms they hold.
fn elbo_sums(
    model: &ProbUNet,
    images: &Tensor,
    masks: &Tensor,
) -> Result<(f64, f64, usize), ScoreError> {
    let images_in = images.size()[0] as usize;
    // The reconstruction is reduced per the config; report it per image.
    let per_image_scale = match model.config().reconstruction {
        Reduction::Sum => images_in as f64,
        Reduction::BatchMean => 1.0,
    };
    let (mut elbo, mut kl, mut terms) = (0.0, 0.0, 0);
    for a in 0..masks.size()[1] {
        let mask = masks.f_narrow(1, a, 1)?.f_to_kind(Kind::Float)?;
        let t = tch::no_grad(|| model.elbo(images, &mask))?;
        let kl_mean = t.kl.f_double_value(&[])?;
        let rec = t.reconstruction.f_double_value(&[])? / per_image_scale;
        elbo += -(rec + model.config().beta * kl_mean) * images_in as f64;
        kl += kl_mean * images_in as f64;
        terms += images_in;
    }
    Ok((elbo, kl, terms))
}

/// ELBO, KL, and sample metrics on (up to `plan.max_items` of) a split.
pub fn validate(
    model: &ProbUNet,
    store: &Store,
    plan: &ValidationPlan,
    device: Device,
) -> Result<Validation, ScoreError> {
    let limit = plan.max_items.unwrap_or(usize::MAX);
    let (mut elbo, mut kl, mut terms) = (0.0, 0.0, 0usize);
    let mut per_image = Vec::new();
    let mut items = Vec::new();
    for batch in in_order(store, plan.split, plan.batch, device) {
        let (idx, images, masks) = batch?;
        if items.len() >= limit {
            break;
        }
        let keep = (limit - items.len()).min(idx.len());
        let (images, masks) = (
            images.f_narrow(0, 0, keep as i64)?,
            masks.f_narrow(0, 0, keep as i64)?,
        );
        let (e, k, t) = elbo_sums(model, &images, &masks)?;
        (elbo, kl, terms) = (elbo + e, kl + k, terms + t);
        let probs = sample_items(model, &images, &idx[..keep], plan.samples, plan.seed)?;
        per_image.extend(batch_metrics(&masks, &probs, plan.convention)?);
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

/// A picture of the given store items: per row the input, every annotation, `samples`
/// samples and the mean foreground probability, under the row's caption.
pub fn sample_grid(
    model: &ProbUNet,
    store: &Store,
    items: &[usize],
    captions: &[String],
    samples: usize,
    seed: u64,
    device: Device,
) -> Result<Image, ScoreError> {
    let index = Tensor::f_from_slice(&items.iter().map(|&i| i as i64).collect::<Vec<_>>())?;
    let images = store
        .images
        .f_index_select(0, &index)?
        .f_to_device(device)?;
    let masks = store.masks.f_index_select(0, &index)?.f_to_device(device)?;
    let probs = sample_items(model, &images, items, samples, seed)?;
    let rows = (0..images.size()[0])
        .map(|r| {
            Ok(FigureRow {
                caption: captions.get(r as usize).cloned().unwrap_or_default(),
                image: images.f_get(r)?,
                masks: masks.f_get(r)?,
                probs: probs.f_get(r)?,
            })
        })
        .collect::<Result<Vec<FigureRow>, TchError>>()?;
    figure(&rows, samples as i64, false)
}

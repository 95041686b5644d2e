//! Sampling the model on a split and scoring the samples against every annotation: the
//! code behind validation during training and `probunet eval`.
use crate::data::loader::in_order;
use crate::data::split::SplitName;
use crate::data::store::Store;
use crate::metrics::{BitMask, EmptyConvention, ImageMetrics, MetricsError, PairCounts};
use crate::model::{ModelError, ProbUNet};
use crate::tensorboard::{Image, ImageGrid, TensorboardError};
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

/// Per-image metrics for a batch. `masks` is u8 `[b, A, H, W]`, `probs` `[b, n, H, W]`.
/// The pairwise intersections of annotations and binarised samples are one batched matrix
/// product on the device; only the `(A+n)^2` counts per image and the probabilities (for
/// NCC) come back to the host.
pub fn batch_metrics(
    masks: &Tensor,
    probs: &Tensor,
    convention: EmptyConvention,
) -> Result<Vec<ImageMetrics>, EvalError> {
    let (b, m, n) = (masks.size()[0], masks.size()[1], probs.size()[1]);
    let binary = Tensor::cat(
        &[
            masks.to_kind(Kind::Float),
            probs.gt(0.5).to_kind(Kind::Float),
        ],
        1,
    )
    .flatten(2, -1);
    let gram = binary
        .bmm(&binary.transpose(1, 2))
        .to_device(Device::Cpu)
        .to_kind(Kind::Int64);
    let gram: Vec<i64> = Vec::try_from(gram.reshape([-1]))?;
    let probs_host = probs.to_device(Device::Cpu).to_kind(Kind::Float);
    let masks_host = masks.to_device(Device::Cpu).contiguous();
    let k = (m + n) as usize;
    (0..b)
        .map(|i| {
            let counts: Vec<u64> = gram[i as usize * k * k..(i as usize + 1) * k * k]
                .iter()
                .map(|&c| c as u64)
                .collect();
            let sizes = (0..k).map(|j| counts[j * k + j]).collect();
            let pair_counts = PairCounts::new(m as usize, n as usize, sizes, counts)?;
            let annotations: Vec<BitMask> = (0..m)
                .map(|a| {
                    let mask: Vec<u8> = Vec::try_from(masks_host.get(i).get(a).reshape([-1]))?;
                    Ok(BitMask::from_pixels(&mask))
                })
                .collect::<Result<_, tch::TchError>>()?;
            let sample_probs: Vec<Vec<f32>> = (0..n)
                .map(|s| Vec::try_from(probs_host.get(i).get(s).reshape([-1])))
                .collect::<Result<_, _>>()?;
            Ok(ImageMetrics::from_counts(
                &pair_counts,
                &annotations,
                &sample_probs,
                convention,
            )?)
        })
        .collect()
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
        if bool::try_from(probs.isfinite().all())? {
            per_image.extend(batch_metrics(&masks, &probs, convention)?);
        } else {
            // A diverged model: its samples score nothing, and callers see NaN.
            per_image.extend((0..keep).map(|_| ImageMetrics::not_finite()));
        }
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
    let (rows, m) = (images.size()[0], masks.size()[1]);
    let (h, w) = (images.size()[2] as usize, images.size()[3] as usize);
    let probs = sample_probabilities(model, images, samples)?.to_device(Device::Cpu);
    let mean = probs.mean_dim(1, false, Kind::Float);
    let cols = 1 + m + samples + 1;
    let mut grid = ImageGrid::new(rows as usize, cols as usize, h, w)?;
    let tile = |t: Tensor| {
        Vec::<f32>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).reshape([-1]))
    };
    for r in 0..rows {
        let row = r as usize;
        grid.set_tile_f32(row, 0, &tile(images.get(r).get(0))?)?;
        for a in 0..m {
            grid.set_tile_f32(row, 1 + a as usize, &tile(masks.get(r).get(a))?)?;
        }
        for s in 0..samples {
            grid.set_tile_f32(
                row,
                (1 + m + s) as usize,
                &tile(probs.get(r).get(s).gt(0.5))?,
            )?;
        }
        grid.set_tile_f32(row, cols as usize - 1, &tile(mean.get(r))?)?;
    }
    Ok(grid.into_image())
}

//! What an evaluation writes: one CSV row per image, the aggregate summaries, and figures
//! of images with their annotations and samples.
use super::EvalError;
use crate::metrics::{EmptyConvention, ImageMetrics, ImageScores, Summary};
use crate::tensorboard::{Image, ImageGrid};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

/// Both conventions, the default first: the order of every output.
pub const CONVENTIONS: [EmptyConvention; 2] = [EmptyConvention::PhiSeg, EmptyConvention::KohlNan];

/// One image of a figure, its tensors on any device: `image` `[C, H, W]` (the first channel
/// is shown), `masks` `[m, H, W]`, `probs` the `[n, H, W]` sample probabilities.
#[derive(Debug)]
pub struct FigureRow {
    pub image: Tensor,
    pub masks: Tensor,
    pub probs: Tensor,
}

/// A grid with one row per image: the input, every annotation, the first `shown` samples
/// (binarised at 0.5), the mean foreground probability over all samples and, with
/// `variance`, the per-pixel variance of the probabilities over the samples, times 4 (so
/// that white is the largest variance possible, half the samples at 0 and half at 1).
pub fn figure(rows: &[FigureRow], shown: i64, variance: bool) -> Result<Image, EvalError> {
    let first = rows
        .first()
        .ok_or_else(|| EvalError::Shapes("a figure needs at least one image".into()))?;
    let (m, h, w) = (
        first.masks.size()[0],
        first.image.size()[1] as usize,
        first.image.size()[2] as usize,
    );
    let shown = shown.min(first.probs.size()[0]);
    let cols = 1 + m + shown + 1 + i64::from(variance);
    let mut grid = ImageGrid::new(rows.len(), cols as usize, h, w)?;
    let tile = |t: &Tensor| {
        Vec::<f32>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).reshape([-1]))
    };
    for (r, row) in rows.iter().enumerate() {
        if row.masks.size()[0] != m || row.probs.size()[0] < shown {
            return Err(EvalError::Shapes(format!(
                "figure row {r}: {:?} masks and {:?} samples, the first row has {m} and {shown}",
                row.masks.size(),
                row.probs.size()
            )));
        }
        let probs = row.probs.to_device(Device::Cpu).to_kind(Kind::Float);
        grid.set_tile_f32(r, 0, &tile(&row.image.get(0))?)?;
        for a in 0..m {
            grid.set_tile_f32(r, 1 + a as usize, &tile(&row.masks.get(a))?)?;
        }
        for s in 0..shown {
            grid.set_tile_f32(r, (1 + m + s) as usize, &tile(&probs.get(s).gt(0.5))?)?;
        }
        let col = (1 + m + shown) as usize;
        grid.set_tile_f32(r, col, &tile(&probs.mean_dim(0, false, Kind::Float))?)?;
        if variance {
            let var = probs.var_dim(0, false, false) * 4.0;
            grid.set_tile_f32(r, col + 1, &tile(&var)?)?;
        }
    }
    Ok(grid.into_image())
}

/// One row of `eval/<split>-<n>.csv`.
#[derive(Debug, Clone, Serialize)]
pub struct CsvRow {
    /// Index of the item in the store.
    pub item: usize,
    pub key: String,
    pub patient: String,
    /// Annotations of this image that mark nothing.
    pub empty_annotations: u32,
    pub ged_phiseg: f64,
    pub ged_kohl_nan: f64,
    pub hm_iou_phiseg: f64,
    pub hm_iou_kohl_nan: f64,
    pub diversity_phiseg: f64,
    pub diversity_kohl_nan: f64,
    /// NCC does not depend on the convention.
    pub ncc: f64,
    pub mean_pred_iou_phiseg: f64,
    pub mean_pred_iou_kohl_nan: f64,
}

impl CsvRow {
    pub fn new(
        item: usize,
        key: String,
        patient: String,
        empty_annotations: u32,
        scores: &ImageScores,
    ) -> Self {
        let (p, k) = (&scores.phiseg, &scores.kohl_nan);
        Self {
            item,
            key,
            patient,
            empty_annotations,
            ged_phiseg: p.ged,
            ged_kohl_nan: k.ged,
            hm_iou_phiseg: p.hm_iou,
            hm_iou_kohl_nan: k.hm_iou,
            diversity_phiseg: p.diversity,
            diversity_kohl_nan: k.diversity,
            ncc: p.ncc,
            mean_pred_iou_phiseg: p.mean_pred_iou,
            mean_pred_iou_kohl_nan: k.mean_pred_iou,
        }
    }
}

/// The CSV file's bytes (NaN is written `NaN`).
pub fn csv_bytes(rows: &[CsvRow]) -> Result<Vec<u8>, csv::Error> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    for row in rows {
        writer.serialize(row)?;
    }
    writer.into_inner().map_err(|e| e.into_error().into())
}

/// Every metric's summary over the images, per convention in [`CONVENTIONS`] order.
pub type Summaries = Vec<(EmptyConvention, Vec<(&'static str, Summary)>)>;

/// Mean, std and bootstrap interval of every metric under both conventions. The same
/// bootstrap seed serves every metric, so all intervals come from the same resampled sets
/// of images.
pub fn summarise(scores: &[ImageScores], resamples: usize, seed: u64) -> Summaries {
    CONVENTIONS
        .iter()
        .map(|&convention| {
            let per_metric = ImageMetrics::NAMES
                .iter()
                .enumerate()
                .map(|(i, &name)| {
                    let values: Vec<f64> = scores
                        .iter()
                        .map(|s| s.get(convention).values()[i])
                        .collect();
                    (name, Summary::from_values(&values, resamples, seed))
                })
                .collect();
            (convention, per_metric)
        })
        .collect()
}

/// The best, median and worst of `values` (lower is better, as GED; NaN is left out), as
/// positions into `values`, ties broken by position. `None` when every value is NaN.
pub fn examples(values: &[f64]) -> Option<[(&'static str, usize); 3]> {
    let mut order: Vec<usize> = (0..values.len()).filter(|&i| !values[i].is_nan()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]).then(a.cmp(&b)));
    let (first, last) = (*order.first()?, *order.last()?);
    Some([
        ("best", first),
        ("median", order[(order.len() - 1) / 2]),
        ("worst", last),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_skip_nan_and_break_ties_by_position() {
        let values = [0.5, f64::NAN, 0.1, 0.9, 0.5, 0.3];
        assert_eq!(
            examples(&values),
            Some([("best", 2), ("median", 0), ("worst", 3)])
        );
        assert_eq!(
            examples(&[f64::NAN, 0.2]),
            Some([("best", 1), ("median", 1), ("worst", 1)])
        );
        assert_eq!(examples(&[f64::NAN]), None);
    }

    #[test]
    fn a_figure_row_has_input_annotations_samples_mean_and_variance() {
        let (h, w) = (8, 12);
        let image = Tensor::full([1, h, w], 0.5, (Kind::Float, Device::Cpu));
        let masks = Tensor::ones([4, h, w], (Kind::Uint8, Device::Cpu));
        // Two samples at 0 and two at 1: mean 1/2 and the largest variance, 1/4.
        let probs = Tensor::cat(
            &[
                Tensor::zeros([2, h, w], (Kind::Float, Device::Cpu)),
                Tensor::ones([2, h, w], (Kind::Float, Device::Cpu)),
            ],
            0,
        );
        let row = || FigureRow {
            image: image.shallow_clone(),
            masks: masks.shallow_clone(),
            probs: probs.shallow_clone(),
        };
        let picture = figure(&[row(), row()], 3, true).unwrap();
        let cols = 1 + 4 + 3 + 2;
        let gap = ImageGrid::SEPARATOR;
        assert_eq!(picture.width(), cols * w as usize + (cols - 1) * gap);
        assert_eq!(picture.height(), 2 * h as usize + gap);
        let pixel = |col: usize| picture.pixels()[col * (w as usize + gap)];
        assert_eq!(
            (0..cols).map(pixel).collect::<Vec<_>>(),
            [128, 255, 255, 255, 255, 0, 0, 255, 128, 255]
        );
        let without = figure(&[row()], 10, false).unwrap();
        assert_eq!(
            without.width(),
            10 * w as usize + 9 * gap,
            "4 samples, no variance"
        );
        assert!(figure(&[], 3, true).is_err());
    }

    #[test]
    fn csv_rows_have_both_conventions_and_nan() {
        let scores = ImageScores::not_finite();
        let bytes = csv_bytes(&[CsvRow::new(3, "k".into(), "p".into(), 1, &scores)]).unwrap();
        let text = String::from_utf8(bytes).unwrap();
        let mut lines = text.lines();
        assert_eq!(
            lines.next().unwrap(),
            "item,key,patient,empty_annotations,ged_phiseg,ged_kohl_nan,hm_iou_phiseg,\
             hm_iou_kohl_nan,diversity_phiseg,diversity_kohl_nan,ncc,mean_pred_iou_phiseg,\
             mean_pred_iou_kohl_nan"
        );
        assert_eq!(
            lines.next().unwrap(),
            "3,k,p,1,NaN,NaN,NaN,NaN,NaN,NaN,NaN,NaN,NaN"
        );
    }
}

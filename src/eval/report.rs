//! What an evaluation writes at each sample count: one CSV row per image, the
//! aggregate summaries with their intervals, the JSON report that says what produced
//! them, and the table TensorBoard shows.
use crate::metrics::{EmptyConvention, ImageMetrics, ImageScores, Summary};
use crate::model::ModelConfig;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Both conventions, the default first: the order of every output.
pub const CONVENTIONS: [EmptyConvention; 2] = [EmptyConvention::PhiSeg, EmptyConvention::KohlNan];

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
    /// The fraction of this image's samples that mark nothing.
    pub empty_samples: f64,
    /// The ideal model's GED, diversity and empty-sample fraction on this image (PHiSeg
    /// convention), to set the model's beside per image; empty off synthetic stores.
    pub ideal_ged_phiseg: Option<f64>,
    pub ideal_diversity_phiseg: Option<f64>,
    pub ideal_empty_samples: Option<f64>,
}

/// One image's scores and fraction of empty samples.
#[derive(Debug, Clone, Copy)]
pub struct ImageRow<'a> {
    pub scores: &'a ImageScores,
    pub empty_samples: f64,
}

impl CsvRow {
    pub fn new(
        (item, key, patient): (usize, String, String),
        empty_annotations: u32,
        model: ImageRow,
        ideal: Option<ImageRow>,
    ) -> Self {
        let (p, k) = (&model.scores.phiseg, &model.scores.kohl_nan);
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
            empty_samples: model.empty_samples,
            ideal_ged_phiseg: ideal.map(|i| i.scores.phiseg.ged),
            ideal_diversity_phiseg: ideal.map(|i| i.scores.phiseg.diversity),
            ideal_empty_samples: ideal.map(|i| i.empty_samples),
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

/// The summary of `metric` under `convention`.
pub fn find_summary<'a>(
    summaries: &'a Summaries,
    convention: EmptyConvention,
    metric: &str,
) -> Option<&'a Summary> {
    summaries
        .iter()
        .find(|(c, _)| *c == convention)?
        .1
        .iter()
        .find(|(name, _)| *name == metric)
        .map(|(_, summary)| summary)
}

/// The summaries of one sample count as a markdown table for TensorBoard's Text
/// dashboard: a row per metric, a column per convention, mean and 95% interval, and on a
/// synthetic store the ideal model's (PHiSeg convention) beside them.
pub fn markdown(title: &str, summaries: &Summaries, ideal: Option<&Summaries>) -> String {
    let cell = |s: Option<&Summary>| match s {
        Some(s) if !s.mean.is_nan() => {
            format!("{:.4} [{:.4}, {:.4}]", s.mean, s.ci_low, s.ci_high)
        }
        _ => "-".into(),
    };
    let mut text = format!("**{title}**: mean and 95% bootstrap interval over images\n\n");
    text.push_str("| metric |");
    for convention in CONVENTIONS {
        text.push_str(&format!(" {} |", convention.as_str()));
    }
    let columns = CONVENTIONS.len() + usize::from(ideal.is_some());
    if ideal.is_some() {
        text.push_str(" ideal model (phiseg) |");
    }
    text.push_str("\n|---|");
    text.push_str(&"---|".repeat(columns));
    for metric in ImageMetrics::NAMES {
        text.push_str(&format!("\n| {metric} |"));
        for convention in CONVENTIONS {
            let summary = find_summary(summaries, convention, metric);
            text.push_str(&format!(" {} |", cell(summary)));
        }
        if let Some(ideal) = ideal {
            let summary = find_summary(ideal, EmptyConvention::PhiSeg, metric);
            text.push_str(&format!(" {} |", cell(summary)));
        }
    }
    if ideal.is_some() {
        text.push_str(
            "\n\nThe ideal model's samples are fresh draws of the true readers, scored \
             the same way at the same sample count.",
        );
    }
    text
}

/// The checkpoint an evaluation read.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointRecord {
    /// What was asked: best, last, or a path.
    pub choice: String,
    /// The checkpoint folder, or the model file given.
    pub path: PathBuf,
    pub model: PathBuf,
    pub step: Option<u64>,
}

/// One of the best, median and worst images, pictured in a figure.
#[derive(Debug, Clone, Serialize)]
pub struct Example {
    pub item: usize,
    pub key: String,
    pub ged: f64,
    pub figure: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct StoreRecord {
    pub path: PathBuf,
    pub name: String,
    pub annotators: usize,
    pub height: usize,
    pub width: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdealRecord {
    pub ged: f64,
    pub samples: usize,
    pub convention: Option<String>,
}

/// How often masks are empty, as the mean over images of each image's fraction: a model
/// that collapses to empty masks (or never leaves one empty) shows here first.
#[derive(Debug, Clone, Serialize)]
pub struct EmptyMasks {
    pub samples: Summary,
    pub annotations: Summary,
}

/// The ideal model of a synthetic store (fresh draws of the true readers), scored like
/// the trained model at the same sample count.
#[derive(Debug, Clone)]
pub struct IdealScores {
    pub summaries: Summaries,
    pub empty_samples: Summary,
}

/// [`IdealScores`] as written in the JSON.
#[derive(Debug, Clone, Serialize)]
pub struct IdealMetrics {
    /// Convention, then metric, then its summary.
    pub metrics: BTreeMap<&'static str, BTreeMap<&'static str, Summary>>,
    pub empty_samples: Summary,
}

/// Summaries keyed by convention name, then metric, as the JSON holds them.
fn metric_map(summaries: &Summaries) -> BTreeMap<&'static str, BTreeMap<&'static str, Summary>> {
    summaries
        .iter()
        .map(|(convention, per_metric)| {
            let values = per_metric.iter().map(|(m, s)| (*m, *s)).collect();
            (convention.as_str(), values)
        })
        .collect()
}

/// `eval/<split>-<n>.json`: the aggregates under both conventions and everything that
/// produced them.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub run: PathBuf,
    pub split: String,
    pub samples: usize,
    pub items: usize,
    pub checkpoint: CheckpointRecord,
    pub seed: u64,
    pub noise: &'static str,
    pub conventions: serde_json::Value,
    pub bootstrap: serde_json::Value,
    /// Convention, then metric, then its summary.
    pub metrics: BTreeMap<&'static str, BTreeMap<&'static str, Summary>>,
    pub examples: BTreeMap<&'static str, Example>,
    /// The fraction of empty samples and of empty annotations.
    pub empty_masks: EmptyMasks,
    pub store: StoreRecord,
    pub ideal_reference: Option<IdealRecord>,
    /// The ideal model at this sample count, on a synthetic store.
    pub ideal: Option<IdealMetrics>,
    pub model: ModelConfig,
    pub device: String,
    pub probunet_version: &'static str,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub notes: Vec<String>,
}

/// What [`EvalReport::new`] takes beside the summaries.
pub struct ReportContext<'a> {
    pub run: PathBuf,
    pub split: String,
    pub items: usize,
    pub checkpoint: CheckpointRecord,
    pub seed: u64,
    /// Every sample decoded the prior's mean (`eval --deterministic`).
    pub deterministic: bool,
    pub bootstrap: usize,
    pub store: StoreRecord,
    pub ideal_reference: Option<IdealRecord>,
    pub model: &'a ModelConfig,
    pub device: String,
    pub notes: &'a [String],
}

impl EvalReport {
    pub fn new(
        context: &ReportContext,
        samples: usize,
        summaries: &Summaries,
        examples: BTreeMap<&'static str, Example>,
        empty_masks: EmptyMasks,
        ideal: Option<&IdealScores>,
    ) -> EvalReport {
        EvalReport {
            run: context.run.clone(),
            split: context.split.clone(),
            samples,
            items: context.items,
            checkpoint: context.checkpoint.clone(),
            seed: context.seed,
            noise: if context.deterministic {
                "none: every sample decodes the prior's mean, z = mu (--deterministic)"
            } else {
                "per image: PCG64 seeded from (seed, store item index), Box-Muller; \
                 the first n samples of a larger count are the samples at n"
            },
            conventions: serde_json::json!({
                "default": EmptyConvention::default().as_str(),
                "computed": CONVENTIONS.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
                "phiseg": "IoU of two empty masks is 1 (distance 0)",
                "kohl-nan": "IoU of two empty masks is NaN; means over pairs skip NaN",
            }),
            bootstrap: serde_json::json!({
                "resamples": context.bootstrap,
                "seed": context.seed,
                "interval": 0.95,
                "method": "percentile bootstrap of the mean over images (NaN skipped)",
            }),
            metrics: metric_map(summaries),
            examples,
            empty_masks,
            store: context.store.clone(),
            ideal_reference: context.ideal_reference.clone(),
            ideal: ideal.map(|i| IdealMetrics {
                metrics: metric_map(&i.summaries),
                empty_samples: i.empty_samples,
            }),
            model: context.model.clone(),
            device: context.device.clone(),
            probunet_version: env!("CARGO_PKG_VERSION"),
            created_at: chrono::Utc::now(),
            notes: context.notes.to_vec(),
        }
    }
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
    fn csv_rows_have_both_conventions_and_nan() {
        let scores = ImageScores::not_finite();
        let model = ImageRow {
            scores: &scores,
            empty_samples: 0.25,
        };
        let ideal = ImageRow {
            scores: &scores,
            empty_samples: 0.5,
        };
        let rows = [
            CsvRow::new((3, "k".into(), "p".into()), 1, model, None),
            CsvRow::new((4, "l".into(), "p".into()), 0, model, Some(ideal)),
        ];
        let text = String::from_utf8(csv_bytes(&rows).unwrap()).unwrap();
        let mut lines = text.lines();
        assert_eq!(
            lines.next().unwrap(),
            "item,key,patient,empty_annotations,ged_phiseg,ged_kohl_nan,hm_iou_phiseg,\
             hm_iou_kohl_nan,diversity_phiseg,diversity_kohl_nan,ncc,mean_pred_iou_phiseg,\
             mean_pred_iou_kohl_nan,empty_samples,ideal_ged_phiseg,ideal_diversity_phiseg,\
             ideal_empty_samples"
        );
        assert_eq!(
            lines.next().unwrap(),
            "3,k,p,1,NaN,NaN,NaN,NaN,NaN,NaN,NaN,NaN,NaN,0.25,,,"
        );
        assert_eq!(
            lines.next().unwrap(),
            "4,l,p,0,NaN,NaN,NaN,NaN,NaN,NaN,NaN,NaN,NaN,0.25,NaN,NaN,0.5"
        );
    }
}

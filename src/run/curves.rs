//! `curves.png`: a run's training curves from its metrics.csv, for whoever does not run
//! TensorBoard: train and val ELBO, train and val KL, and val GED beside the ideal
//! model's.
use super::{read_rows_but_torn_tail, write_atomic, MetricsRow, Phase, RunError};
use crate::figure::{curves_figure, Panel, Series, SeriesStyle};
use std::path::Path;

pub const CURVES_FILE: &str = "curves.png";

/// Draws the curves of the run folder `run` into `run/curves.png`, atomically.
pub fn write_curves(run: &Path, ideal_ged: Option<f64>) -> Result<(), RunError> {
    let rows = read_rows_but_torn_tail(&run.join(super::METRICS_FILE))?;
    let path = run.join(CURVES_FILE);
    let png = curves_figure(&panels(&rows, ideal_ged))
        .and_then(|image| Ok(image.to_png()?))
        .map_err(|e| RunError::Corrupt {
            path: path.clone(),
            why: e.to_string(),
        })?;
    write_atomic(&path, &png)
}

fn series(
    rows: &[MetricsRow],
    phase: Phase,
    name: &str,
    value: fn(&MetricsRow) -> Option<f64>,
) -> Series {
    Series {
        name: name.into(),
        points: rows
            .iter()
            .filter(|r| r.phase == phase)
            .filter_map(|r| value(r).map(|v| (r.step as f64, v)))
            .collect(),
        style: SeriesStyle::Line,
    }
}

fn panels(rows: &[MetricsRow], ideal_ged: Option<f64>) -> Vec<Panel> {
    let panel = |title: &str, y: &str, series: Vec<Series>| Panel {
        title: title.into(),
        x_label: "step".into(),
        y_label: y.into(),
        categories: Vec::new(),
        series,
    };
    let mut ged = vec![series(rows, Phase::Val, "val GED", |r| r.ged)];
    if let Some(ideal) = ideal_ged {
        let last = rows.iter().map(|r| r.step).max().unwrap_or(1) as f64;
        ged.push(crate::figure::reference("ideal model", ideal, 0.0, last));
    }
    vec![
        panel(
            "ELBO",
            "ELBO",
            vec![
                series(rows, Phase::Train, "train", |r| r.elbo),
                series(rows, Phase::Val, "val", |r| r.elbo),
            ],
        ),
        panel(
            "KL(posterior || prior)",
            "KL",
            vec![
                series(rows, Phase::Train, "train", |r| r.kl),
                series(rows, Phase::Val, "val", |r| r.kl),
            ],
        ),
        panel("val GED (lower is better)", "GED", ged),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panels_take_train_and_val_rows_and_the_ideal_line() {
        let mut rows = Vec::new();
        for step in [0u64, 10, 20] {
            let mut v = MetricsRow::new(step, 0, Phase::Val);
            (v.elbo, v.kl, v.ged) = (Some(-5.0), Some(1.0), Some(0.5));
            rows.push(v);
            let mut t = MetricsRow::new(step + 5, 0, Phase::Train);
            (t.elbo, t.kl) = (Some(-4.0), Some(2.0));
            rows.push(t);
        }
        let with_ideal = panels(&rows, Some(0.2));
        assert_eq!(with_ideal.len(), 3);
        assert_eq!(
            with_ideal[0].series[0].points,
            [(5.0, -4.0), (15.0, -4.0), (25.0, -4.0)]
        );
        assert_eq!(
            with_ideal[1].series[1].points,
            [(0.0, 1.0), (10.0, 1.0), (20.0, 1.0)]
        );
        assert_eq!(with_ideal[2].series[1].points, [(0.0, 0.2), (25.0, 0.2)]);
        assert!(panels(&rows, None)[2].series.len() == 1);
    }
}

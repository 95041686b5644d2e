//! `metrics.csv`: one row per training log interval and per validation, appended as
//! training goes and cut back to a checkpoint's step on resume.
use super::{write_atomic, RunError};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// The logged terms of a step, or their sums or means over a log interval.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct StepStats {
    pub loss: f64,
    pub elbo: f64,
    pub kl: f64,
    pub reconstruction: f64,
    pub reg: f64,
    pub grad_norm: f64,
}

impl StepStats {
    pub fn is_finite(&self) -> bool {
        [
            self.loss,
            self.elbo,
            self.kl,
            self.reconstruction,
            self.reg,
            self.grad_norm,
        ]
        .iter()
        .all(|v| v.is_finite())
    }

    fn zip(self, other: StepStats, f: impl Fn(f64, f64) -> f64) -> StepStats {
        StepStats {
            loss: f(self.loss, other.loss),
            elbo: f(self.elbo, other.elbo),
            kl: f(self.kl, other.kl),
            reconstruction: f(self.reconstruction, other.reconstruction),
            reg: f(self.reg, other.reg),
            grad_norm: f(self.grad_norm, other.grad_norm),
        }
    }

    /// Each term divided by `n` (a mean of `n` summed steps).
    pub fn divided(self, n: f64) -> StepStats {
        self.zip(self, |a, _| a / n)
    }
}

impl std::ops::Add for StepStats {
    type Output = StepStats;

    fn add(self, other: StepStats) -> StepStats {
        self.zip(other, |a, b| a + b)
    }
}

/// Which kind of row: a training interval or a validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Train,
    Val,
}

/// One row of metrics.csv. Training rows average their interval; validation rows fill
/// elbo, kl, ged and hm_iou.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsRow {
    pub step: u64,
    pub epoch: u64,
    pub time: DateTime<Utc>,
    pub phase: Phase,
    pub loss: Option<f64>,
    pub elbo: Option<f64>,
    pub kl: Option<f64>,
    pub reconstruction: Option<f64>,
    pub reg: Option<f64>,
    pub grad_norm: Option<f64>,
    pub lr: Option<f64>,
    pub beta: Option<f64>,
    pub images_per_s: Option<f64>,
    pub ged: Option<f64>,
    pub hm_iou: Option<f64>,
    /// Batches skipped for a non-finite loss in this interval.
    pub skipped: u64,
}

impl MetricsRow {
    pub fn new(step: u64, epoch: u64, phase: Phase) -> Self {
        Self {
            step,
            epoch,
            time: Utc::now(),
            phase,
            loss: None,
            elbo: None,
            kl: None,
            reconstruction: None,
            reg: None,
            grad_norm: None,
            lr: None,
            beta: None,
            images_per_s: None,
            ged: None,
            hm_iou: None,
            skipped: 0,
        }
    }
}

/// `metrics.csv`, appended row by row.
pub struct MetricsCsv {
    path: PathBuf,
    writer: csv::Writer<File>,
}

impl MetricsCsv {
    pub fn create(path: &Path) -> Result<Self, RunError> {
        let file = File::create(path).map_err(|e| RunError::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            writer: csv::Writer::from_writer(file),
        })
    }

    /// Reopens after a resume from `step`: rows logged after it (by a process that died
    /// before its next checkpoint) are dropped, so no step appears twice.
    pub fn resume(path: &Path, step: u64) -> Result<Self, RunError> {
        let rows = read_rows_but_torn_tail(path)?;
        let mut fresh = csv::Writer::from_writer(Vec::new());
        for row in rows.iter().filter(|r| r.step <= step) {
            fresh.serialize(row).map_err(|e| corrupt(path, e))?;
        }
        let bytes = fresh.into_inner().map_err(|e| corrupt(path, e))?;
        write_atomic(path, &bytes)?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| RunError::io(path, e))?;
        let writer = csv::WriterBuilder::new()
            .has_headers(rows.is_empty())
            .from_writer(file);
        Ok(Self {
            path: path.to_path_buf(),
            writer,
        })
    }

    pub fn write(&mut self, row: &MetricsRow) -> Result<(), RunError> {
        self.writer
            .serialize(row)
            .map_err(|e| corrupt(&self.path, e))
    }

    pub fn flush(&mut self) -> Result<(), RunError> {
        self.writer
            .flush()
            .map_err(|e| RunError::io(&self.path, e))?;
        self.writer
            .get_ref()
            .sync_data()
            .map_err(|e| RunError::io(&self.path, e))
    }
}

/// The rows of a metrics.csv whose writer may have been killed mid-line: a malformed last
/// line is dropped, a malformed line before a good one is an error.
pub fn read_rows_but_torn_tail(path: &Path) -> Result<Vec<MetricsRow>, RunError> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .map_err(|e| corrupt(path, e))?;
    let mut rows = Vec::new();
    let mut torn = None;
    for row in reader.deserialize::<MetricsRow>() {
        match (row, &torn) {
            (Ok(_), Some(e)) => return Err(corrupt(path, e)),
            (Ok(row), None) => rows.push(row),
            (Err(e), _) => torn = Some(e),
        }
    }
    Ok(rows)
}

/// Every row of a metrics.csv.
pub fn read_rows(path: &Path) -> Result<Vec<MetricsRow>, RunError> {
    let mut reader = csv::Reader::from_path(path).map_err(|e| corrupt(path, e))?;
    reader
        .deserialize()
        .collect::<Result<Vec<MetricsRow>, _>>()
        .map_err(|e| corrupt(path, e))
}

fn corrupt(path: &Path, e: impl std::fmt::Display) -> RunError {
    RunError::Corrupt {
        path: path.to_path_buf(),
        why: e.to_string(),
    }
}

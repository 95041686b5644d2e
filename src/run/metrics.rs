//! The run folder, `runs/<name>-<timestamp>/`: the resolved spec, provenance, metrics.csv,
//! TensorBoard events and checkpoints of one training run.
use super::TrainError;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

pub const SPEC_FILE: &str = "spec.toml";
pub const META_FILE: &str = "meta.json";
pub const METRICS_FILE: &str = "metrics.csv";

#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
}

fn io_error(path: &Path, e: std::io::Error) -> TrainError {
    TrainError::Run {
        path: path.to_path_buf(),
        why: e.to_string(),
    }
}

impl RunDir {
    /// A new, empty `runs_dir/<name>-<YYYYmmdd-HHMMSS>` (with a counter if that exists).
    pub fn create(runs_dir: &Path, name: &str) -> Result<RunDir, TrainError> {
        fs::create_dir_all(runs_dir).map_err(|e| io_error(runs_dir, e))?;
        let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
        for attempt in 1.. {
            let folder = if attempt == 1 {
                format!("{name}-{stamp}")
            } else {
                format!("{name}-{stamp}-{attempt}")
            };
            let path = runs_dir.join(folder);
            match fs::create_dir(&path) {
                Ok(()) => return Ok(RunDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_error(&path, e)),
            }
        }
        unreachable!("the loop returns")
    }

    /// An existing run folder, for `--resume`.
    pub fn open(path: &Path) -> Result<RunDir, TrainError> {
        if !path.join(SPEC_FILE).is_file() {
            return Err(TrainError::Run {
                path: path.to_path_buf(),
                why: format!("not a run folder (no {SPEC_FILE})"),
            });
        }
        Ok(RunDir {
            path: path.to_path_buf(),
        })
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.path.join("checkpoints")
    }

    /// Writes `name` atomically (temporary name, then rename).
    pub fn write_atomic(&self, name: &str, contents: &[u8]) -> Result<(), TrainError> {
        write_atomic(&self.file(name), contents)
    }
}

pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), TrainError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    fs::write(&tmp, contents).map_err(|e| io_error(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_error(path, e))
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
    pub fn create(path: &Path) -> Result<Self, TrainError> {
        let file = File::create(path).map_err(|e| io_error(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            writer: csv::Writer::from_writer(file),
        })
    }

    /// Reopens after a resume from `step`: rows logged after it (by a process that died
    /// before its next checkpoint) are dropped, so no step appears twice.
    pub fn resume(path: &Path, step: u64) -> Result<Self, TrainError> {
        let rows = read_rows_but_torn_tail(path)?;
        let mut fresh = csv::Writer::from_writer(Vec::new());
        for row in rows.iter().filter(|r| r.step <= step) {
            fresh.serialize(row).map_err(|e| TrainError::Run {
                path: path.to_path_buf(),
                why: e.to_string(),
            })?;
        }
        let bytes = fresh.into_inner().map_err(|e| TrainError::Run {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        write_atomic(path, &bytes)?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| io_error(path, e))?;
        let writer = csv::WriterBuilder::new()
            .has_headers(rows.is_empty())
            .from_writer(file);
        Ok(Self {
            path: path.to_path_buf(),
            writer,
        })
    }

    pub fn write(&mut self, row: &MetricsRow) -> Result<(), TrainError> {
        self.writer.serialize(row).map_err(|e| TrainError::Run {
            path: self.path.clone(),
            why: e.to_string(),
        })
    }

    pub fn flush(&mut self) -> Result<(), TrainError> {
        self.writer.flush().map_err(|e| io_error(&self.path, e))?;
        self.writer
            .get_ref()
            .sync_data()
            .map_err(|e| io_error(&self.path, e))
    }
}

/// The rows of a metrics.csv whose writer may have been killed mid-line: a malformed last
/// line is dropped, a malformed line before a good one is an error.
pub fn read_rows_but_torn_tail(path: &Path) -> Result<Vec<MetricsRow>, TrainError> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .map_err(|e| TrainError::Run {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
    let mut rows = Vec::new();
    let mut torn = None;
    for row in reader.deserialize::<MetricsRow>() {
        match (row, &torn) {
            (Ok(_), Some(e)) => {
                return Err(TrainError::Run {
                    path: path.to_path_buf(),
                    why: format!("{e}"),
                })
            }
            (Ok(row), None) => rows.push(row),
            (Err(e), _) => torn = Some(e),
        }
    }
    Ok(rows)
}

/// Every row of a metrics.csv.
pub fn read_rows(path: &Path) -> Result<Vec<MetricsRow>, TrainError> {
    let mut reader = csv::Reader::from_path(path).map_err(|e| TrainError::Run {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    reader
        .deserialize()
        .collect::<Result<Vec<MetricsRow>, _>>()
        .map_err(|e| TrainError::Run {
            path: path.to_path_buf(),
            why: e.to_string(),
        })
}

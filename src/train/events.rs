//! What the trainer tells the world, as typed events: the library never prints. Sinks
//! turn them into metrics.csv rows, TensorBoard events, JSON lines for a sweep's parent
//! process, or (in the CLI) a progress bar and plain lines.
pub use crate::run::StepStats;
use crate::tensorboard::Image;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One log interval of training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// The step count at its end.
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u64,
    /// Means over its steps that were not skipped.
    pub means: StepStats,
    pub lr: f64,
    pub beta: f64,
    pub images_per_s: f64,
    /// Batches skipped for a non-finite loss in it.
    pub skipped: u64,
}

/// A validation pass.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Validation {
    pub step: u64,
    pub epoch: u64,
    pub elbo: f64,
    pub kl: f64,
    pub ged: f64,
    pub hm_iou: f64,
    /// The grid of inputs, annotations and samples, when images are logged.
    #[serde(skip)]
    pub grid: Option<Image>,
}

/// How a training run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub run: PathBuf,
    pub steps: u64,
    pub val_ged: Option<f64>,
    pub best_val_ged: Option<f64>,
    pub hm_iou: Option<f64>,
    /// The ideal-model GED of the synthetic store, when known.
    pub ideal_ged: Option<f64>,
    pub skipped: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TrainEvent {
    /// Training starts at `step` (0, or the checkpoint it resumes from).
    Started {
        run: PathBuf,
        step: u64,
        total_steps: u64,
        resumed: bool,
        /// The spec keys this resume changed (recorded in the run's spec.toml).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        changes: Vec<crate::config::Change>,
        /// The store's val split is empty, so the run does not validate.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        empty_val_split: bool,
        /// The ideal-model GED of the validation split, for a synthetic store.
        ideal_ged: Option<f64>,
        /// The lowest val GED before a resume.
        best_val_ged: Option<f64>,
    },
    /// A synthetic store was generated for the run (what prepare reports).
    StorePrepared {
        summary: String,
    },
    /// One optimiser step is done.
    Step {
        step: u64,
        total_steps: u64,
    },
    /// A log interval ended: the means of its steps.
    Interval(Interval),
    /// A batch was skipped for a non-finite value (`train.on_nan = "skip"`).
    Skipped {
        step: u64,
        what: String,
    },
    Validation(Validation),
    /// A checkpoint was written.
    Checkpoint {
        step: u64,
        path: PathBuf,
        best: bool,
    },
    Finished(Outcome),
    /// Training stopped with an error (an interrupt is one too), after `step` steps.
    Failed {
        step: u64,
        error: String,
    },
}

/// Where events go. Sinks that write files buffer; [`EventSink::flush`] makes what they
/// have durable, which the trainer asks for before every checkpoint so that the logs
/// never lag behind the step a resume starts from.
pub trait EventSink {
    fn event(&mut self, event: &TrainEvent) -> Result<(), SinkError>;

    fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// A sink that could not write, naming what it writes.
#[derive(Debug, thiserror::Error)]
#[error("{sink}: {why}")]
pub struct SinkError {
    pub sink: String,
    pub why: String,
}

impl SinkError {
    pub fn new(sink: impl std::fmt::Display, why: impl std::fmt::Display) -> Self {
        SinkError {
            sink: sink.to_string(),
            why: why.to_string(),
        }
    }
}

/// A sink from a closure: how the CLI draws progress.
pub struct FnSink<F>(pub F);

impl<F: FnMut(&TrainEvent)> EventSink for FnSink<F> {
    fn event(&mut self, event: &TrainEvent) -> Result<(), SinkError> {
        (self.0)(event);
        Ok(())
    }
}

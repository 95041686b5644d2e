//! `probunet eval RUN`: a run's checkpoint scored on a split of its store.
//!
//! - [`command`]: what is evaluated (the checkpoint, the store) and the sampling pass;
//! - [`ideal`]: the ideal model of a synthetic store, scored beside the trained one;
//! - [`report`]: what it writes (JSON, CSV, PNG figures, TensorBoard);
//! - [`bench`]: the eval throughput benchmark.
//!
//! The scoring itself is [`crate::score`], shared with training's validation.
pub mod bench;
pub mod command;
pub mod ideal;
pub mod report;

pub use command::{
    evaluate, load_trained, CheckpointChoice, EvalOptions, EvalOutcome, Trained, DEFAULT_SAMPLES,
};

use crate::data::split::SplitName;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Score(#[from] crate::score::ScoreError),
    #[error(transparent)]
    Run(#[from] crate::run::RunError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Tensorboard(#[from] crate::tensorboard::TensorboardError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
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
    #[error("{}: {why}", path.display())]
    Io { path: PathBuf, why: String },
    #[error("{0}")]
    Options(String),
}

//! The flags of the commands that read a trained run (eval, predict): which run, which of
//! its checkpoints, and where the model runs.
use probunet::device::DeviceSpec;
use probunet::eval::CheckpointChoice;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct TrainedArgs {
    /// The run folder, e.g. runs/lidc-20261127-120000.
    pub run: PathBuf,
    /// best, last, step-N (or N), a checkpoint folder or a model.safetensors file.
    #[arg(long, default_value = "best")]
    pub checkpoint: CheckpointChoice,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
}

//! `probunet export`: a run's weights for the PyTorch port, or as probunet names them.
use anyhow::Result;
use probunet::eval::CheckpointChoice;
use probunet::export::{self, ExportFormat};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The run folder, e.g. runs/lidc-20261127-120000.
    run: PathBuf,
    /// seed-port: the variable names of the widely used PyTorch port (its
    /// `ProbabilisticUnet.load_state_dict` takes them); safetensors: probunet's own names.
    #[arg(long, value_enum)]
    to: Format,
    /// best, last, step-N (or N), a checkpoint folder or a model.safetensors file.
    #[arg(long, default_value = "best")]
    checkpoint: CheckpointChoice,
    /// The weights file [default: RUN/export/seed-port.safetensors or probunet.safetensors];
    /// the config JSON goes beside it with a .json extension.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    SeedPort,
    Safetensors,
}

pub fn run(args: ExportArgs) -> Result<()> {
    let format = match args.to {
        Format::SeedPort => ExportFormat::SeedPort,
        Format::Safetensors => ExportFormat::Safetensors,
    };
    let done = export::export(&args.run, &args.checkpoint, format, args.out)?;
    super::line(
        true,
        &format!(
            "wrote {} tensors of {} to {} and the model config to {}",
            done.tensors,
            done.checkpoint.display(),
            done.weights.display(),
            done.config.display()
        ),
    );
    Ok(())
}

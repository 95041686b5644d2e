//! The `probunet` command line: each subcommand is a thin entry into the library.
use anyhow::Result;
use clap::{Parser, Subcommand};
use probunet::doctor;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "probunet",
    version,
    about = "Train and evaluate the Probabilistic U-Net on ambiguous segmentation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Convert an LIDC pickle (or a folder of them) into a fast dataset store.
    Prepare {
        /// The pickle file or a folder of *.pickle files.
        input: PathBuf,
    },
    /// Train a model from an experiment spec (TOML).
    Train {
        /// The experiment spec, e.g. experiments/lidc.toml.
        spec: PathBuf,
    },
    /// Evaluate a trained run: GED, HM-IoU and friends, and sample pictures.
    Eval {
        /// The run folder, e.g. runs/lidc-20261127-120000.
        run: PathBuf,
    },
    /// Run a hyperparameter sweep over beta, latent_dim, ...
    Sweep {
        /// The sweep spec, e.g. experiments/beta.toml.
        spec: PathBuf,
    },
    /// Check the installation: libtorch, CUDA, the model's parameter counts, one training step.
    Doctor(doctor::DoctorArgs),
}

fn not_implemented(what: &str) -> Result<()> {
    anyhow::bail!("`probunet {what}` is not implemented yet")
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Prepare { .. } => not_implemented("prepare"),
        Command::Train { .. } => not_implemented("train"),
        Command::Eval { .. } => not_implemented("eval"),
        Command::Sweep { .. } => not_implemented("sweep"),
        Command::Doctor(args) => doctor::run(&args),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

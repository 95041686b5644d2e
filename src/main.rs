//! The `probunet` command line: each subcommand is a thin entry into the library.
use anyhow::Result;
use clap::{Parser, Subcommand};
use probunet::config::{self, Flag};
use probunet::data::prepare::{self as prep, Outcome, PrepareOptions};
use probunet::data::split::SplitFractions;
use probunet::data::synthetic::SyntheticConfig;
use probunet::doctor;
use probunet::train::{TrainError, TrainOptions};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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
    Prepare(PrepareArgs),
    /// Train a model from an experiment spec (TOML), or resume a run.
    Train(TrainArgs),
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
    /// Benchmark training and sampling against the PyTorch implementation of the same model.
    Bench(probunet::bench::BenchArgs),
}

#[derive(Debug, clap::Args)]
struct PrepareArgs {
    /// The pickle file, or a folder whose *.pickle files are merged.
    #[arg(required_unless_present = "synthetic")]
    input: Option<PathBuf>,
    /// Generate the built-in synthetic ambiguous dataset instead of reading a pickle.
    #[arg(long, conflicts_with = "input")]
    synthetic: bool,
    /// The store folder [default: data/<input stem>, or data/synthetic].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Rebuild even if the store already exists.
    #[arg(long)]
    force: bool,
    /// Masks per item that the pickle must hold.
    #[arg(long, default_value_t = 4)]
    annotators: usize,
    /// Percentages of patients for train, val and test.
    #[arg(long, default_value = "80,10,10")]
    split: SplitFractions,
    /// Seed of the patient-level split.
    #[arg(long, default_value_t = 0)]
    split_seed: u64,
    /// Synthetic: number of items.
    #[arg(long, default_value_t = SyntheticConfig::default().items, requires = "synthetic")]
    items: usize,
    /// Synthetic: image height and width (a multiple of 8).
    #[arg(long, default_value_t = SyntheticConfig::default().size, requires = "synthetic")]
    size: usize,
    /// Synthetic: generator seed.
    #[arg(long, default_value_t = 0, requires = "synthetic")]
    seed: u64,
}

fn prepare(args: PrepareArgs) -> Result<()> {
    let out = match (&args.out, &args.input) {
        (Some(out), _) => out.clone(),
        (None, Some(input)) => {
            let stem = input
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            anyhow::ensure!(
                !stem.is_empty(),
                "cannot name a store after {}: pass --out",
                input.display()
            );
            PathBuf::from("data").join(stem)
        }
        (None, None) => PathBuf::from("data/synthetic"),
    };
    let options = PrepareOptions {
        out,
        force: args.force,
        split: args.split,
        split_seed: args.split_seed,
    };
    let outcome = match &args.input {
        Some(input) => prep::prepare_pickle(input, args.annotators, &options)?,
        None => {
            let config = SyntheticConfig {
                items: args.items,
                size: args.size,
                annotators: args.annotators,
                seed: args.seed,
            };
            prep::prepare_synthetic(config, &options)?
        }
    };
    match outcome {
        Outcome::Prepared(summary) => println!("{summary}"),
        Outcome::AlreadyPrepared(dir) => {
            println!(
                "{} is already prepared from this input; nothing to do (--force rebuilds it)",
                dir.display()
            )
        }
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
struct TrainArgs {
    /// The experiment spec, e.g. experiments/quickstart.toml.
    #[arg(required_unless_present = "resume")]
    spec: Option<PathBuf>,
    /// Continue the run in this folder from its latest checkpoint, with its own spec.
    #[arg(long, conflicts_with = "spec", value_name = "RUN")]
    resume: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N (train.device).
    #[arg(long)]
    device: Option<String>,
    /// fp32 or bf16 (train.precision; bf16 autocast on CUDA).
    #[arg(long)]
    precision: Option<String>,
    /// Override any spec key, e.g. --set train.lr=3e-4 (repeatable; applied last).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Plain progress lines even on a terminal.
    #[arg(long)]
    plain: bool,
}

fn train(args: TrainArgs) -> Result<()> {
    let mut flags = Vec::new();
    for (flag, key, value) in [
        ("--device", "train.device", &args.device),
        ("--precision", "train.precision", &args.precision),
    ] {
        if let Some(value) = value {
            flags.push(Flag {
                flag: flag.into(),
                key: key.into(),
                value: value.clone(),
            });
        }
    }
    let spec = match (&args.spec, &args.resume) {
        (Some(spec), _) => spec.clone(),
        (None, Some(run)) => run.join(probunet::train::run::SPEC_FILE),
        (None, None) => unreachable!("clap requires one"),
    };
    let resolved = config::load(&spec, &flags, &args.sets)?;
    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("second Ctrl-C: stopping without a checkpoint");
            std::process::exit(130);
        }
        eprintln!(
            "Ctrl-C: finishing the step and writing a checkpoint (Ctrl-C again to stop at once)"
        );
    })?;
    let options = TrainOptions {
        interrupt: Some(interrupt),
        plain_progress: args.plain,
    };
    let outcome = match &args.resume {
        Some(run) => probunet::train::resume(run, &resolved, &options)?,
        None => probunet::train::train(&resolved, &options)?,
    };
    println!(
        "trained {} steps in {}",
        outcome.steps,
        outcome.run.display()
    );
    if let Some(ged) = outcome.val_ged {
        let reference = outcome
            .ideal_ged
            .map(|i| format!(" (ideal-model reference {i:.4})"))
            .unwrap_or_default();
        println!(
            "val GED {ged:.4}{reference}, HM-IoU {:.4}",
            outcome.hm_iou.unwrap_or(f64::NAN)
        );
    }
    if outcome.skipped > 0 {
        println!(
            "{} batches were skipped for non-finite values",
            outcome.skipped
        );
    }
    println!(
        "view it with: tensorboard --logdir {}",
        outcome.run.display()
    );
    Ok(())
}

fn not_implemented(what: &str) -> Result<()> {
    anyhow::bail!("`probunet {what}` is not implemented yet")
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Prepare(args) => prepare(args),
        Command::Train(args) => train(args),
        Command::Eval { .. } => not_implemented("eval"),
        Command::Sweep { .. } => not_implemented("sweep"),
        Command::Doctor(args) => doctor::run(&args),
        Command::Bench(args) => probunet::bench::run(&args),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            match err.downcast_ref::<TrainError>() {
                Some(TrainError::Interrupted { .. }) => ExitCode::from(130),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

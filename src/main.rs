//! The `probunet` command line: each subcommand is a thin entry into the library.
use anyhow::Result;
use clap::{Parser, Subcommand};
use probunet::config::{self, Flag};
use probunet::data::prepare::{self as prep, Outcome, PrepareOptions};
use probunet::data::split::SplitFractions;
use probunet::data::split::SplitName;
use probunet::data::synthetic::SyntheticConfig;
use probunet::device::DeviceSpec;
use probunet::doctor;
use probunet::eval::{self as evaluation, CheckpointChoice, EvalOptions};
use probunet::metrics::EmptyConvention;
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
    Eval(EvalArgs),
    /// Benchmark evaluation (images/s at 100 samples) against the PyTorch implementation.
    BenchEval(probunet::eval::bench::BenchEvalArgs),
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

#[derive(Debug, clap::Args)]
struct EvalArgs {
    /// The run folder, e.g. runs/lidc-20261127-120000.
    run: PathBuf,
    /// The split of the run's store to evaluate: train, val or test.
    #[arg(long, default_value = "test")]
    split: SplitName,
    /// Samples per image; one set of results each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "16,100")]
    samples: Vec<usize>,
    /// best, last, a checkpoint folder or a model.safetensors file.
    #[arg(long, default_value = "best")]
    checkpoint: CheckpointChoice,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: DeviceSpec,
    /// Images per forward pass (memory grows with batch x samples).
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Seed of the sampling noise and of the bootstrap.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Evaluate on this store instead of the run's own.
    #[arg(long)]
    store: Option<PathBuf>,
    /// Bootstrap resamples for the 95% intervals.
    #[arg(long, default_value_t = probunet::eval::command::DEFAULT_BOOTSTRAP)]
    bootstrap: usize,
}

fn eval(args: EvalArgs) -> Result<()> {
    let options = EvalOptions {
        run: args.run,
        split: args.split,
        samples: args.samples,
        checkpoint: args.checkpoint,
        device: args.device,
        batch: args.batch,
        seed: args.seed,
        store: args.store,
        bootstrap: args.bootstrap,
        progress: true,
    };
    let outcome = evaluation::evaluate(&options)?;
    for note in &outcome.notes {
        println!("note: {note}");
    }
    let step = outcome
        .step
        .map(|s| format!(" (step {s})"))
        .unwrap_or_default();
    println!(
        "{} images of the {} split, checkpoint {}{step}, on {}, in {:.1} s",
        outcome.items,
        outcome.split,
        outcome.checkpoint.display(),
        outcome.device,
        outcome.seconds
    );
    println!(
        "{:>7}  {:<26} {:<26} {:>8} {:>9} {:>8} {:>10}",
        "samples",
        "GED (phiseg) [95% CI]",
        "GED (kohl-nan) [95% CI]",
        "HM-IoU",
        "diversity",
        "NCC",
        "mean-pred"
    );
    for report in &outcome.reports {
        let cell = |convention, metric| {
            report
                .summary(convention, metric)
                .map(|s| format!("{:.4} [{:.4}, {:.4}]", s.mean, s.ci_low, s.ci_high))
                .unwrap_or_default()
        };
        let mean = |metric| {
            report
                .summary(EmptyConvention::PhiSeg, metric)
                .map_or(f64::NAN, |s| s.mean)
        };
        println!(
            "{:>7}  {:<26} {:<26} {:>8.4} {:>9.4} {:>8.4} {:>10.4}",
            report.samples,
            cell(EmptyConvention::PhiSeg, "ged"),
            cell(EmptyConvention::KohlNan, "ged"),
            mean("hm_iou"),
            mean("diversity"),
            mean("ncc"),
            mean("mean_pred_iou"),
        );
    }
    if let Some((ged, samples)) = outcome.ideal_ged {
        println!("ideal-model GED of this synthetic split: {ged:.4} (at {samples} samples)");
    }
    if let Some(first) = outcome.reports.first() {
        let folder = first.json.parent().unwrap_or(&outcome.run);
        println!(
            "wrote {}/{}-<n>.json, .csv and best/median/worst .png; view them with: tensorboard --logdir {}",
            folder.display(),
            outcome.split,
            folder.display()
        );
    }
    Ok(())
}

fn not_implemented(what: &str) -> Result<()> {
    anyhow::bail!("`probunet {what}` is not implemented yet")
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Prepare(args) => prepare(args),
        Command::Train(args) => train(args),
        Command::Eval(args) => eval(args),
        Command::BenchEval(args) => probunet::eval::bench::run(&args),
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

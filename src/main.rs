//! The `probunet` command line: each subcommand is a thin entry into the library.
mod cli {
    pub mod progress;
    pub mod sweep_progress;
}
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
use probunet::sweep::{self, LocalOptions, SlurmOptions, Stop, SweepError, Target};
use probunet::train::{EventSink, JsonLinesSink, TrainError, TrainOptions};
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
    Sweep(SweepArgs),
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
    #[arg(required_unless_present_any = ["resume", "sweep"])]
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
    /// CPU threads of libtorch [default: libtorch's, after OMP_NUM_THREADS].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// Run one trial of the sweep in this folder (runs/<sweep>), resuming it if it was
    /// interrupted: what each Slurm array task runs.
    #[arg(long, value_name = "SWEEP", conflicts_with_all = ["spec", "resume", "sets"])]
    sweep: Option<PathBuf>,
    /// The trial of --sweep to run [default: $SLURM_ARRAY_TASK_ID, else
    /// $JOB_COMPLETION_INDEX].
    #[arg(long, value_name = "N", requires = "sweep")]
    trial: Option<usize>,
    /// Also write every training event as a JSON line to FILE (`-`: standard output,
    /// where the human lines then go to standard error).
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
}

/// The sinks a command's flags ask for: progress lines or a bar, and JSON lines.
fn sinks(plain: bool, events: Option<&std::path::Path>) -> Result<Vec<Box<dyn EventSink + Send>>> {
    let mut sinks: Vec<Box<dyn EventSink + Send>> =
        vec![Box::new(cli::progress::TrainProgress::new(plain))];
    match events {
        Some(path) if path == std::path::Path::new("-") => {
            sinks.push(Box::new(JsonLinesSink::new(std::io::stdout(), "standard output")))
        }
        Some(path) => {
            let file = std::fs::File::create(path)
                .map_err(|e| anyhow::anyhow!("--events {}: {e}", path.display()))?;
            sinks.push(Box::new(JsonLinesSink::new(
                std::io::BufWriter::new(file),
                path.display().to_string(),
            )))
        }
        None => {}
    }
    Ok(sinks)
}

fn ctrl_c_finishes_the_step() -> Result<Arc<AtomicBool>> {
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
    Ok(interrupt)
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
    if let Some(threads) = args.threads {
        tch::set_num_threads(threads as i32);
    }
    if let Some(folder) = &args.sweep {
        let index = sweep::trial::trial_index(args.trial)?;
        let options = sweep::trial::TrialOptions {
            flags,
            threads: args.threads.map(|t| t as usize),
            train: TrainOptions {
                interrupt: Some(ctrl_c_finishes_the_step()?),
                sinks: sinks(args.plain, args.events.as_deref())?,
                hparams: None,
            },
        };
        return match sweep::trial::run_trial(folder, index, options)? {
            sweep::trial::TrialEnd::Finished(outcome) => {
                eprintln!(
                    "trial {index} finished: {} steps in {}",
                    outcome.steps,
                    outcome.run.display()
                );
                Ok(())
            }
            sweep::trial::TrialEnd::AlreadyFinished { id, steps } => {
                eprintln!(
                    "trial {index} ({id}) already finished ({} steps); nothing to do",
                    steps.unwrap_or(0)
                );
                Ok(())
            }
        };
    }
    let spec = match (&args.spec, &args.resume) {
        (Some(spec), _) => spec.clone(),
        (None, Some(run)) => run.join(probunet::run::SPEC_FILE),
        (None, None) => unreachable!("clap requires one"),
    };
    let resolved = config::load(&spec, &flags, &args.sets)?;
    let options = TrainOptions {
        interrupt: Some(ctrl_c_finishes_the_step()?),
        sinks: sinks(args.plain, args.events.as_deref())?,
        hparams: None,
    };
    let outcome = match &args.resume {
        Some(run) => probunet::train::resume_path(run, &resolved, options)?,
        None => probunet::train::train(&resolved, options)?,
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
    };
    let outcome = evaluation::evaluate(&options, &mut |p| {
        eprintln!(
            "eval {}: {}/{} images ({:.1} images/s at {} samples)",
            p.split,
            p.done,
            p.total,
            p.done as f64 / p.seconds.max(1e-9),
            p.samples
        )
    })?;
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

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Engine {
    /// An sbatch job-array script, one trial per array task.
    Slurm,
}

#[derive(Debug, clap::Args)]
struct SweepArgs {
    /// The sweep spec, e.g. experiments/beta.toml; or its folder, e.g. runs/beta.
    spec: PathBuf,
    /// Print the trial table and each trial's state, without running anything.
    #[arg(long, conflicts_with_all = ["emit", "collect"])]
    plan: bool,
    /// Summarise whatever trials finished into runs/<sweep>/summary.csv; runs nothing.
    #[arg(long, conflicts_with = "emit")]
    collect: bool,
    /// Trials to run at once.
    #[arg(long, short = 'j', default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    jobs: u32,
    /// GPUs to spread trials over, e.g. 0,1 [default: every visible GPU when the trials
    /// train on CUDA].
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    devices: Vec<String>,
    /// CPU threads per trial [default: this machine's cores divided by --jobs].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// Plain progress lines even on a terminal.
    #[arg(long)]
    plain: bool,
    /// Run failed trials again (otherwise they stay failed).
    #[arg(long)]
    retry_failed: bool,
    /// Write a job script for a cluster instead of running the trials here.
    #[arg(long, value_enum, value_name = "ENGINE")]
    emit: Option<Engine>,
    /// Where --emit writes the script [default: runs/<sweep>/sweep.sbatch].
    #[arg(long, requires = "emit", value_name = "FILE")]
    out: Option<PathBuf>,
    /// --emit slurm: the partition (sweep.slurm.partition).
    #[arg(long, requires = "emit")]
    partition: Option<String>,
    /// --emit slurm: the account to charge (sweep.slurm.account).
    #[arg(long, requires = "emit")]
    account: Option<String>,
    /// --emit slurm: GPUs per trial; 0 trains on CPUs (sweep.slurm.gpus) [default: 0].
    #[arg(long, requires = "emit")]
    gpus: Option<u32>,
    /// --emit slurm: CPU cores per trial (sweep.slurm.cpus) [default: 2].
    #[arg(long, requires = "emit")]
    cpus: Option<u32>,
    /// --emit slurm: memory per trial, e.g. 16G (sweep.slurm.mem).
    #[arg(long, requires = "emit")]
    mem: Option<String>,
    /// --emit slurm: time limit per trial, e.g. 02:00:00 (sweep.slurm.time).
    #[arg(long, requires = "emit")]
    time: Option<String>,
    /// --emit slurm: most trials running at once, the array's %K (sweep.slurm.concurrency)
    /// [default: 4].
    #[arg(long, requires = "emit")]
    concurrency: Option<u32>,
}

fn sweep_command(args: SweepArgs) -> Result<()> {
    let target = Target::open(&args.spec)?;
    if args.plan {
        print!("{}", sweep::plan_text(&target)?);
        return Ok(());
    }
    if args.collect {
        println!("{}", sweep::collect(&target)?.0);
        return Ok(());
    }
    if let Some(Engine::Slurm) = args.emit {
        let flags = SlurmOptions {
            partition: args.partition,
            account: args.account,
            gpus: args.gpus,
            cpus: args.cpus,
            mem: args.mem,
            time: args.time,
            concurrency: args.concurrency,
            extra: Vec::new(),
        };
        match sweep::emit_slurm(&target, &flags, args.retry_failed, args.out.as_deref())? {
            sweep::Emitted::NothingLeft { sweep } => println!(
                "sweep {sweep}: no trial is left to run (finished, running or failed; \
                 --retry-failed includes the failed ones)"
            ),
            sweep::Emitted::Script {
                path,
                trials,
                total,
                concurrency,
                folder,
            } => println!(
                "wrote {}: {trials} of {total} trials as a job array, at most {concurrency} at once\n\
                 submit it with:  sbatch {}\n\
                 then collect:    probunet sweep {} --collect",
                path.display(),
                path.display(),
                folder.display()
            ),
        }
        return Ok(());
    }
    let jobs = args.jobs as usize;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let devices = if args.devices.is_empty() {
        sweep::default_devices(&target.existing()?.0)
    } else {
        sweep::parse_devices(&args.devices)?
    };
    let options = LocalOptions {
        jobs,
        devices,
        threads: args.threads.map_or((cores / jobs).max(1), |t| t as usize),
        retry_failed: args.retry_failed,
    };
    let stop = Arc::new(Stop::default());
    let handler = stop.clone();
    ctrlc::set_handler(move || {
        if handler.request() == 1 {
            eprintln!(
                "Ctrl-C: every running trial finishes its step, checkpoints and stops; no new \
                 trial starts (Ctrl-C again stops them at once)"
            );
        } else {
            eprintln!("second Ctrl-C: stopping the trials at once, without a checkpoint");
        }
    })?;
    let progress = cli::sweep_progress::SweepProgress::new(args.plain);
    let done = sweep::run_local(&target, &options, &stop, &|event| progress.observe(event))?;
    progress.finish();
    println!("{}", done.summary);
    let report = &done.report;
    if report.ran > 0 {
        println!(
            "throughput: {} trial-steps in {:.1} s = {:.2} trial-steps/s ({} trials, {} at once, \
             {} thread(s) each)",
            report.trial_steps,
            report.wall_s,
            report.throughput(),
            report.ran,
            options.jobs,
            options.threads
        );
    }
    Ok(done.end?)
}

fn run(cli: Cli) -> Result<()> {
    probunet::memory::install(probunet::memory::from_env().map_err(anyhow::Error::msg)?);
    match cli.command {
        Command::Prepare(args) => prepare(args),
        Command::Train(args) => train(args),
        Command::Eval(args) => eval(args),
        Command::BenchEval(args) => probunet::eval::bench::run(&args),
        Command::Sweep(args) => sweep_command(args),
        Command::Doctor(args) => doctor::run(&args),
        Command::Bench(args) => probunet::bench::run(&args),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            let interrupted = matches!(
                err.downcast_ref::<TrainError>(),
                Some(TrainError::Interrupted { .. })
            ) || matches!(
                err.downcast_ref::<SweepError>(),
                Some(SweepError::Interrupted { .. })
                    | Some(SweepError::Incomplete {
                        interrupted: true,
                        ..
                    })
            );
            if interrupted {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

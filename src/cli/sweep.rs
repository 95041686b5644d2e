//! `probunet sweep`: plan, run here, emit for a cluster, or collect a sweep; and one trial
//! of it, the entry point of every trial's process.
use super::ctrl_c_stops_the_trials;
use super::sweep_progress::SweepProgress;
use super::train::{say, RunFlags};
use anyhow::Result;
use probunet::sweep::{self, LocalOptions, SlurmOptions, Target};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Engine {
    /// An sbatch job-array script, one trial per array task.
    Slurm,
}

/// `sweep SPEC [flags]`, or `sweep trial ...`: a spec's flags cannot follow `trial`, and
/// `trial` needs no spec.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct SweepArgs {
    #[command(subcommand)]
    command: Option<SweepCommand>,
    /// The sweep spec, e.g. experiments/beta.toml; or its folder, e.g. runs/beta.
    #[arg(required = true)]
    spec: Option<PathBuf>,
    /// Print the trial table and each trial's state, without running anything.
    #[arg(long, conflicts_with_all = ["emit", "collect"])]
    plan: bool,
    /// Summarise whatever trials finished into runs/<sweep>/summary.csv; runs nothing.
    #[arg(long, conflicts_with = "emit")]
    collect: bool,
    /// Trials to run at once.
    #[arg(long, short = 'j', default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    jobs: u32,
    /// GPUs to spread trials over, e.g. 0,1 [default: every visible GPU when the trials
    /// train on CUDA].
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    devices: Vec<String>,
    /// CPU threads per trial [default: this machine's cores divided by --jobs].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    threads: Option<u32>,
    /// Plain progress lines even on a terminal.
    #[arg(long)]
    plain: bool,
    /// Run failed trials again (otherwise they stay failed).
    #[arg(long)]
    retry_failed: bool,
    /// Fix KEY to VALUE in every trial, as the spec's [sweep.set] does (repeatable; short
    /// names such as train.steps=50 or lr=3e-4 work). A sweep folder made without it
    /// refuses it: start a new sweep.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
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
    /// --emit slurm: GPUs per trial, 0 (train on CPUs) or 1 (sweep.slurm.gpus) [default: 0].
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

#[derive(Debug, clap::Subcommand)]
enum SweepCommand {
    /// Run one trial of a sweep folder, resuming it if it was interrupted.
    ///
    /// What each trial's process runs, locally or as a cluster task; `probunet train
    /// --sweep SWEEP --trial N` is the same.
    Trial(TrialArgs),
}

#[derive(Debug, clap::Args)]
struct TrialArgs {
    /// The sweep folder, e.g. runs/beta, as a local sweep or `sweep --emit` made it.
    #[arg(value_name = "SWEEP")]
    sweep: PathBuf,
    /// The trial to run [default: $SLURM_ARRAY_TASK_ID, else $JOB_COMPLETION_INDEX].
    #[arg(value_name = "N")]
    trial: Option<usize>,
    #[command(flatten)]
    run: RunFlags,
}

pub fn run(args: SweepArgs) -> Result<()> {
    if let Some(SweepCommand::Trial(trial_args)) = &args.command {
        return trial(&trial_args.sweep, trial_args.trial, &trial_args.run);
    }
    let spec = (args.spec.as_deref())
        .ok_or_else(|| anyhow::anyhow!("probunet sweep: give a sweep spec (or a subcommand)"))?;
    let target = Target::open(spec, &args.sets)?;
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
        let emitted = sweep::emit_slurm(&target, &flags, args.retry_failed, args.out.as_deref())?;
        print_emitted(&emitted);
        return Ok(());
    }
    run_local(&target, &args)
}

/// Runs the trials on this machine, `--jobs` at once, spread over the devices.
fn run_local(target: &Target, args: &SweepArgs) -> Result<()> {
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
    let stop = ctrl_c_stops_the_trials()?;
    let progress = SweepProgress::new(args.plain);
    let done = sweep::run_local(target, &options, &stop, &|event| progress.observe(event))?;
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

fn print_emitted(emitted: &sweep::Emitted) {
    match emitted {
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
            "wrote {}: {trials} of {total} trials as a job array, at most {concurrency} at \
             once\nsubmit it with:  sbatch {}\nthen collect:    probunet sweep {} --collect",
            path.display(),
            path.display(),
            folder.display()
        ),
    }
}

/// Runs trial `index` of the sweep in `folder` (by default the one the Slurm array task
/// or Kubernetes Indexed Job is), resuming it if it was interrupted.
pub fn trial(folder: &Path, index: Option<usize>, run: &RunFlags) -> Result<()> {
    let flags = run.apply();
    let index = sweep::trial::trial_index(index)?;
    let train = run.train_options()?;
    if let Some(stop) = &train.interrupt {
        sweep::local::stop_when_parent_dies(stop.clone());
    }
    let options = sweep::trial::TrialOptions {
        flags,
        threads: run.threads(),
        train,
    };
    let stdout_taken = run.events_on_stdout();
    match sweep::trial::run_trial(folder, index, options)? {
        sweep::trial::TrialEnd::Finished(outcome) => say(
            stdout_taken,
            &format!(
                "trial {index} finished: {} steps in {}",
                outcome.steps,
                outcome.run.display()
            ),
        ),
        sweep::trial::TrialEnd::AlreadyFinished { id, steps } => say(
            stdout_taken,
            &format!(
                "trial {index} ({id}) already finished ({} steps); nothing to do",
                steps.unwrap_or(0)
            ),
        ),
    }
    Ok(())
}

//! `probunet train`: one run from a spec, a resumed run, or (`--sweep`) one sweep trial.
use super::ctrl_c_finishes_the_step;
use super::progress::TrainProgress;
use anyhow::{Context, Result};
use probunet::config::{self, Flag};
use probunet::train::{EventSink, JsonLinesSink, Outcome, TrainOptions};
use std::path::{Path, PathBuf};

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// The experiment spec, e.g. experiments/quickstart.toml.
    #[arg(required_unless_present_any = ["resume", "sweep"])]
    spec: Option<PathBuf>,
    /// Continue the run in this folder from its latest checkpoint, with its own spec.
    #[arg(long, conflicts_with = "spec", value_name = "RUN")]
    resume: Option<PathBuf>,
    /// Override any spec key, e.g. --set train.lr=3e-4 (repeatable; applied last).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    #[command(flatten)]
    run: RunFlags,
    /// Run one trial of the sweep in this folder (runs/<sweep>), resuming it if it was
    /// interrupted; the same as `probunet sweep trial`, kept for the emitted Slurm scripts
    /// that call it.
    #[arg(long, value_name = "SWEEP", conflicts_with_all = ["spec", "resume", "sets"])]
    sweep: Option<PathBuf>,
    /// The trial of --sweep to run [default: $SLURM_ARRAY_TASK_ID, else
    /// $JOB_COMPLETION_INDEX].
    #[arg(long, value_name = "N", requires = "sweep")]
    trial: Option<usize>,
}

/// How a training process runs, whether it trains a spec or a sweep trial.
#[derive(Debug, clap::Args)]
pub struct RunFlags {
    /// auto, cpu, cuda or cuda:N (train.device).
    #[arg(long)]
    device: Option<String>,
    /// fp32 or bf16 (train.precision; bf16 autocast on CUDA).
    #[arg(long)]
    precision: Option<String>,
    /// Plain progress lines even on a terminal.
    #[arg(long)]
    plain: bool,
    /// CPU threads of libtorch [default: libtorch's, after OMP_NUM_THREADS].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    threads: Option<u32>,
    /// Also write every training event as one JSON object per line to FILE; `-` is
    /// standard output, and what would be printed there goes to standard error instead.
    /// How a sweep's trials report to it, and a stable record for scripts.
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
}

impl RunFlags {
    /// Sets libtorch's thread count, and returns `--device` and `--precision` as the
    /// spec keys they override.
    pub fn apply(&self) -> Vec<Flag> {
        if let Some(threads) = self.threads {
            tch::set_num_threads(threads as i32);
        }
        let mut flags = Vec::new();
        for (flag, key, value) in [
            ("--device", "train.device", &self.device),
            ("--precision", "train.precision", &self.precision),
        ] {
            if let Some(value) = value {
                flags.push(Flag {
                    flag: flag.into(),
                    key: key.into(),
                    value: value.clone(),
                });
            }
        }
        flags
    }

    pub fn threads(&self) -> Option<usize> {
        self.threads.map(|t| t as usize)
    }

    /// Whether `--events -` takes standard output for JSON lines.
    pub fn events_on_stdout(&self) -> bool {
        self.events.as_deref() == Some(Path::new("-"))
    }

    /// Training's options: Ctrl-C finishes the step and checkpoints; events go to the
    /// progress display and, with `--events`, to JSON lines.
    pub fn train_options(&self) -> Result<TrainOptions> {
        let stdout_taken = self.events_on_stdout();
        let mut sinks: Vec<Box<dyn EventSink + Send>> =
            vec![Box::new(TrainProgress::new(self.plain, stdout_taken))];
        match self.events.as_deref() {
            None => {}
            Some(_) if stdout_taken => sinks.push(Box::new(JsonLinesSink::new(
                std::io::stdout(),
                "standard output",
            ))),
            Some(path) => {
                // Appended to, never truncated: the file may be the user's, or the log of
                // the run this one resumes.
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("--events {}", path.display()))?;
                sinks.push(Box::new(JsonLinesSink::new(
                    std::io::BufWriter::new(file),
                    path.display().to_string(),
                )))
            }
        }
        Ok(TrainOptions {
            interrupt: Some(ctrl_c_finishes_the_step()?),
            sinks,
            hparams: None,
        })
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    if let Some(folder) = &args.sweep {
        return super::sweep::trial(folder, args.trial, &args.run);
    }
    let flags = args.run.apply();
    let spec = match (&args.spec, &args.resume) {
        (Some(spec), _) => spec.clone(),
        (None, Some(run)) => {
            probunet::run::RunDir::open(run)?;
            run.join(probunet::run::SPEC_FILE)
        }
        (None, None) => unreachable!("clap requires one"),
    };
    let resolved = config::load(&spec, &flags, &args.sets)?;
    let options = args.run.train_options()?;
    let outcome = match &args.resume {
        Some(run) => probunet::train::resume_path(run, &resolved, options)?,
        None => probunet::train::train(&resolved, options)?,
    };
    print_outcome(&outcome, args.run.events_on_stdout());
    Ok(())
}

/// A line of the command's own output: on standard output, unless `--events -` took it.
pub fn say(stdout_taken: bool, line: &str) {
    super::line(!stdout_taken, line);
}

fn print_outcome(outcome: &Outcome, stdout_taken: bool) {
    let say = |line: String| say(stdout_taken, &line);
    say(format!(
        "trained {} steps in {}",
        outcome.steps,
        outcome.run.display()
    ));
    if let Some(ged) = outcome.val_ged {
        let reference = outcome
            .ideal_ged
            .map(|i| format!(" (ideal-model reference {i:.4})"))
            .unwrap_or_default();
        say(format!(
            "val GED {ged:.4}{reference}, HM-IoU {:.4}",
            outcome.hm_iou.unwrap_or(f64::NAN)
        ));
    }
    if outcome.skipped > 0 {
        say(format!(
            "{} batches were skipped for non-finite values",
            outcome.skipped
        ));
    }
    say(format!(
        "view it with: tensorboard --logdir {}",
        outcome.run.display()
    ));
}

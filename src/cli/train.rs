//! `probunet train`: one run from a spec, a resumed run, or (`--sweep`) one sweep trial.
use super::ctrl_c_finishes_the_step;
use anyhow::Result;
use probunet::config::{self, Flag};
use probunet::train::{Outcome, TrainOptions};
use std::path::PathBuf;

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
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
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

    /// Training's options: Ctrl-C finishes the step and checkpoints.
    pub fn train_options(&self) -> Result<TrainOptions> {
        Ok(TrainOptions {
            interrupt: Some(ctrl_c_finishes_the_step()?),
            plain_progress: self.plain,
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
        (None, Some(run)) => run.join(probunet::train::run::SPEC_FILE),
        (None, None) => unreachable!("clap requires one"),
    };
    let resolved = config::load(&spec, &flags, &args.sets)?;
    let options = args.run.train_options()?;
    let outcome = match &args.resume {
        Some(run) => probunet::train::resume(run, &resolved, &options)?,
        None => probunet::train::train(&resolved, &options)?,
    };
    print_outcome(&outcome);
    Ok(())
}

fn print_outcome(outcome: &Outcome) {
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
}

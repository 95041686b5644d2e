//! The command line: one module per subcommand, each holding its flags and deciding how
//! its results look (progress bars, tables, plain lines); the library itself never prints.
mod bench;
mod bench_eval;
mod doctor;
mod eval;
mod export;
mod predict;
mod prepare;
mod progress;
mod runs;
mod sweep;
mod sweep_progress;
mod train;
mod trained;

use anyhow::Result;
use clap::{Parser, Subcommand};
use probunet::sweep::{Stop, SweepError};
use probunet::train::TrainError;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Debug, Parser)]
#[command(
    name = "probunet",
    version,
    about = "Train and evaluate the Probabilistic U-Net on ambiguous segmentation"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Convert an LIDC pickle (or a folder of them) into a fast dataset store.
    #[command(override_usage = "probunet prepare <INPUT> [OPTIONS]\n       \
                                probunet prepare --synthetic [OPTIONS]")]
    Prepare(prepare::PrepareArgs),
    /// Train a model from an experiment spec (TOML), or resume a run.
    Train(train::TrainArgs),
    /// Evaluate a trained run: GED, HM-IoU and friends, and sample pictures.
    Eval(eval::EvalArgs),
    /// Samples of a trained run for new images: masks, mean and uncertainty maps, .npy arrays.
    Predict(predict::PredictArgs),
    /// Export a run's weights for the PyTorch port (its variable names) or as safetensors.
    Export(export::ExportArgs),
    /// Benchmark evaluation (images/s at 100 samples) against the PyTorch implementation.
    BenchEval(bench_eval::BenchEvalArgs),
    /// Run a hyperparameter sweep over beta, latent_dim, ...
    Sweep(sweep::SweepArgs),
    /// List the runs and sweep trials in a folder: status, steps, best and final val GED.
    Runs(runs::RunsArgs),
    /// Check the installation: libtorch, CUDA, the model's parameter counts, one training step.
    Doctor(doctor::DoctorArgs),
    /// Benchmark training and sampling against the PyTorch implementation of the same model.
    Bench(bench::BenchArgs),
}

/// Runs the subcommand, after installing the CPU allocator, layout and training part size that the environment
/// asks for (before libtorch allocates anything).
pub fn run(cli: Cli) -> Result<()> {
    probunet::memory::install(probunet::memory::from_env().map_err(anyhow::Error::msg)?);
    probunet::model::layout::install(
        probunet::model::layout::from_env().map_err(anyhow::Error::msg)?,
    );
    probunet::model::parts::install(
        probunet::model::parts::from_env().map_err(anyhow::Error::msg)?,
    );
    match cli.command {
        Command::Prepare(args) => prepare::run(args),
        Command::Train(args) => train::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Predict(args) => predict::run(args),
        Command::Export(args) => export::run(args),
        Command::BenchEval(args) => bench_eval::run(&args),
        Command::Sweep(args) => sweep::run(args),
        Command::Runs(args) => runs::run(args),
        Command::Doctor(args) => doctor::run(&args),
        Command::Bench(args) => bench::run(&args),
    }
}

/// A line to standard error, or to standard output with `to_stdout`, that never panics as
/// `eprintln!` does when the reader went away: a sweep trial whose parent died (its pipes
/// break) must still finish its step and checkpoint.
pub fn line(to_stdout: bool, text: &str) {
    use std::io::Write;
    let _ = match to_stdout {
        true => writeln!(std::io::stdout(), "{text}"),
        false => writeln!(std::io::stderr(), "{text}"),
    };
}

/// The error and its causes on one line, each cause said once: a message that already
/// quotes its cause (`"{path}: {source}"`) is not followed by the cause again.
pub fn describe(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

/// 130 for a run or sweep stopped by Ctrl-C (as a shell reports SIGINT), so scripts and
/// schedulers can tell an interruption from a failure; 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> ExitCode {
    if is_interruption(err) {
        ExitCode::from(130)
    } else {
        ExitCode::FAILURE
    }
}

/// A stop asked for with Ctrl-C or SIGTERM: a normal end, not an error.
pub fn is_interruption(err: &anyhow::Error) -> bool {
    matches!(
        err.downcast_ref::<TrainError>(),
        Some(TrainError::Interrupted { .. })
    ) || matches!(
        err.downcast_ref::<SweepError>(),
        Some(SweepError::Interrupted { .. })
            | Some(SweepError::Incomplete {
                interrupted: true,
                ..
            })
    )
}

/// The first Ctrl-C (or SIGTERM) asks training to finish its step and checkpoint (the
/// returned flag); a second one stops the process at once.
fn ctrl_c_finishes_the_step() -> Result<Arc<AtomicBool>> {
    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            line(
                false,
                "second stop request: stopping at once; the run resumes from its last checkpoint",
            );
            die_by_sigint();
        }
        line(
            false,
            "stop requested (Ctrl-C or SIGTERM): finishing the step and writing a checkpoint \
             (Ctrl-C again to stop at once)",
        );
    })?;
    Ok(interrupt)
}

/// Ends the process the way an unhandled Ctrl-C does: the kernel stops every thread where
/// it stands. `exit` from this handler thread would run the process's teardown while the
/// main thread is inside a libtorch kernel, which crashed (SIGSEGV) in 3 of 8 tries; the
/// run folder needs no teardown, as everything in it is written atomically or appended.
fn die_by_sigint() -> ! {
    // SAFETY: resetting SIGINT to its default action and sending it to this process
    // touch no memory; the default action ends the process.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        libc::kill(libc::getpid(), libc::SIGINT);
    }
    // Should the signal be held back, end without teardown all the same.
    // SAFETY: _exit ends the process at once, running nothing.
    unsafe { libc::_exit(130) }
}

/// Ctrl-C (or SIGTERM) stops a local sweep's trials: gently the first time, at once the
/// second.
fn ctrl_c_stops_the_trials() -> Result<Arc<Stop>> {
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
    Ok(stop)
}

#[cfg(test)]
mod tests {
    use super::describe;
    use anyhow::Context;

    #[derive(Debug, thiserror::Error)]
    #[error("{path}: {source}")]
    struct Quoting {
        path: String,
        source: std::io::Error,
    }

    #[test]
    fn each_cause_is_said_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::StorageFull, "No space left on device");
        let quoting = anyhow::Error::new(Quoting {
            path: "runs/a/metrics.csv".into(),
            source: io(),
        });
        assert_eq!(
            describe(&quoting.context("writing the log")),
            "writing the log: runs/a/metrics.csv: No space left on device"
        );
        let plain: anyhow::Result<()> = Err(io()).context("saving runs/a");
        assert_eq!(
            describe(&plain.unwrap_err()),
            "saving runs/a: No space left on device"
        );
    }
}

//! One trial of a sweep, as `probunet train --sweep runs/<sweep> --trial N` runs it: the
//! same entry point for local sweeps (a child process per trial), Slurm array tasks and
//! Kubernetes Indexed Jobs. A trial's folder is an ordinary run folder plus
//! `status.json` (what happened to it) and `.lock` (held while a process runs it).
use super::plan::Plan;
use super::SweepError;
use crate::config::{Flag, Resolved};
use crate::run::{write_json, RunDir, RunError, RunLock};
use crate::train::{self, HParamsSession, TrainError, TrainOptions};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

pub const STATUS_FILE: &str = "status.json";
pub use crate::run::LOCK_FILE;
/// The output of the trial's process when a local sweep runs it.
pub const LOG_FILE: &str = "train.log";
/// Files of a trial folder that a fresh start keeps.
const KEEP: [&str; 3] = [STATUS_FILE, LOCK_FILE, LOG_FILE];

/// Environment variables that name the trial when `--trial` is not given, in order.
pub const INDEX_VARIABLES: [&str; 2] = ["SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX"];

/// What happened to a trial, as its `status.json` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Running,
    Finished,
    Failed,
    Interrupted,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Finished => "finished",
            State::Failed => "failed",
            State::Interrupted => "interrupted",
        }
    }
}

/// A trial's `status.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub state: State,
    /// Why it failed, or where it was interrupted.
    pub error: Option<String>,
    /// Steps completed when it last stopped (or so far).
    pub steps: Option<u64>,
    pub total_steps: Option<u64>,
    /// Processes that have run it (1 unless it was resumed or retried).
    pub attempts: u32,
    /// Seconds of training over all attempts that ended.
    pub wall_s: f64,
    /// When its first attempt started.
    pub started_at: DateTime<Utc>,
    /// When its latest attempt started.
    pub attempt_started_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub host: String,
    pub pid: u32,
    pub device: Option<String>,
    pub threads: Option<usize>,
}

impl Status {
    pub fn read(dir: &Path) -> Option<Status> {
        let text = std::fs::read_to_string(dir.join(STATUS_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn write(&self, dir: &Path) -> Result<(), RunError> {
        write_json(&dir.join(STATUS_FILE), self)
    }
}

/// The step of the trial's latest checkpoint, if it has one.
pub fn checkpoint_step(dir: &Path) -> Option<u64> {
    RunDir {
        path: dir.to_path_buf(),
    }
    .checkpoint_step()
}

/// The step of the trial's latest checkpoint, after putting back one a killed save was
/// swapping: deciding between resuming and starting afresh (which clears the folder) must
/// not take an unreadable folder for an empty one.
fn latest_step(dir: &Path) -> Result<Option<u64>, SweepError> {
    let checkpoints = RunDir {
        path: dir.to_path_buf(),
    }
    .checkpoints(1);
    checkpoints.repair()?;
    Ok(checkpoints.steps()?.last().map(|(step, _)| *step))
}

/// Which trial: `--trial`, else the first of [`INDEX_VARIABLES`] that is set.
pub fn trial_index(given: Option<usize>) -> Result<usize, SweepError> {
    if let Some(index) = given {
        return Ok(index);
    }
    for var in INDEX_VARIABLES {
        if let Ok(text) = std::env::var(var) {
            return text.trim().parse().map_err(|_| {
                SweepError::Other(format!(
                    "{var}={text:?} is not a trial number (a non-negative integer)"
                ))
            });
        }
    }
    Err(SweepError::Other(format!(
        "which trial? Give its number N (`probunet sweep trial FOLDER N`, or `probunet train \
         --sweep FOLDER --trial N`), or run as a Slurm array task ({}) or a Kubernetes \
         Indexed Job ({})",
        INDEX_VARIABLES[0], INDEX_VARIABLES[1]
    )))
}

/// Options of one trial's process.
#[derive(Default)]
pub struct TrialOptions {
    /// `--device` and `--precision` flags, layered between the base and the trial's values.
    pub flags: Vec<Flag>,
    pub threads: Option<usize>,
    /// Ctrl-C and where events go; the trial adds its HParams session.
    pub train: TrainOptions,
}

/// How a trial's process ended.
#[derive(Debug)]
pub enum TrialEnd {
    Finished(train::Outcome),
    AlreadyFinished { id: String, steps: Option<u64> },
}

/// A trial that this process holds.
struct Held {
    index: usize,
    id: String,
    dir: PathBuf,
    lock: RunLock,
}

/// Trial `index` of the plan in `folder`, with its lock. Where there is no `/proc/locks`,
/// looking whether a trial runs (`--collect`, a starting sweep) holds its lock for an
/// instant, so a held lock is waited on (up to 3 s) before concluding that another
/// process runs the trial.
fn hold(folder: &Path, plan: &Plan, index: usize) -> Result<Held, SweepError> {
    let count = plan.trials.len();
    if index >= count {
        return Err(SweepError::Other(format!(
            "trial {index} is out of range: {} has {count} trials (0 to {})",
            folder.display(),
            count.saturating_sub(1)
        )));
    }
    let trial = &plan.trials[index];
    let dir = plan.trial_dir(folder, index);
    std::fs::create_dir_all(&dir).map_err(|e| RunError::io(&dir, e))?;
    for _ in 0..30 {
        if let Some(lock) = RunLock::try_acquire(&dir)? {
            let id = trial.id.clone();
            return Ok(Held {
                index,
                id,
                dir,
                lock,
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Err(SweepError::Other(format!(
        "trial {index} ({}) is being run by another process (it holds {})",
        trial.id,
        dir.join(LOCK_FILE).display()
    )))
}

/// The status of the attempt that starts now, after `previous`; a fresh start (no
/// checkpoint to resume) clears what an attempt that never checkpointed left behind.
fn begin_attempt(
    held: &Held,
    previous: Option<&Status>,
    resume_from: Option<u64>,
    options: &TrialOptions,
) -> Result<Status, SweepError> {
    let now = Utc::now();
    let status = Status {
        state: State::Running,
        error: None,
        steps: resume_from,
        total_steps: previous.and_then(|s| s.total_steps),
        attempts: previous.map_or(0, |s| s.attempts) + 1,
        wall_s: match resume_from {
            Some(_) => previous.map_or(0.0, |s| s.wall_s),
            None => 0.0,
        },
        started_at: previous
            .filter(|_| resume_from.is_some())
            .map_or(now, |s| s.started_at),
        attempt_started_at: now,
        ended_at: None,
        host: crate::sys::hostname(),
        pid: std::process::id(),
        device: options
            .flags
            .iter()
            .find(|f| f.key == "train.device")
            .map(|f| f.value.clone()),
        threads: options.threads,
    };
    if resume_from.is_none() {
        clear_for_fresh_start(&held.dir)?;
    }
    status.write(&held.dir)?;
    Ok(status)
}

fn clear_for_fresh_start(dir: &Path) -> Result<(), SweepError> {
    for entry in std::fs::read_dir(dir)
        .map_err(|e| RunError::io(dir, e))?
        .flatten()
    {
        let name = entry.file_name();
        if KEEP.iter().any(|k| name == *k) {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| SweepError::Folder {
            path: path.clone(),
            why: format!("cannot clear it for a fresh start: {e}"),
        })?;
    }
    Ok(())
}

/// Trains the trial: resumes it from its checkpoint, or starts it with its HParams
/// session, in the one TensorBoard file of its run folder.
fn train_trial(
    held: Held,
    plan: &Plan,
    resolved: &Resolved,
    resume_from: Option<u64>,
    started: SystemTime,
    options: TrialOptions,
) -> Result<train::Outcome, TrainError> {
    let trial = &plan.trials[held.index];
    let mut train_options = options.train;
    train_options.hparams = Some(HParamsSession {
        hparams: plan.hparams(trial),
        group: trial.group.clone(),
        started,
    });
    let run = RunDir {
        path: held.dir.clone(),
    };
    match resume_from {
        Some(_) => train::resume(run, held.lock, resolved, train_options),
        None => {
            let run = RunDir::create_in(&run.path)?;
            train::train_in(run, held.lock, resolved, train_options)
        }
    }
}

/// The sweep error of a training error, naming the trial.
fn trial_error(folder: &Path, index: usize, e: TrainError) -> SweepError {
    match e {
        TrainError::Interrupted { step, run } => SweepError::Interrupted {
            index,
            step,
            folder: folder.to_path_buf(),
            run,
        },
        TrainError::NonFinite {
            step,
            what,
            run,
            last_checkpoint,
        } => SweepError::TrialNonFinite {
            index,
            step,
            what,
            folder: folder.to_path_buf(),
            has_checkpoint: last_checkpoint.is_some(),
            run,
        },
        e => SweepError::from(e),
    }
}

/// Runs trial `index` of the sweep in `folder`: resumes it from its checkpoint if it has
/// one, starts it afresh otherwise, and does nothing if it finished. Its `status.json`
/// says how it ended; an error is returned as well (Interrupted for Ctrl-C).
pub fn run_trial(
    folder: &Path,
    index: usize,
    options: TrialOptions,
) -> Result<TrialEnd, SweepError> {
    let plan = Plan::load(folder)?;
    let held = hold(folder, &plan, index)?;
    let dir = held.dir.clone();
    let previous = Status::read(&dir);
    if let Some(status) = previous.as_ref().filter(|s| s.state == State::Finished) {
        return Ok(TrialEnd::AlreadyFinished {
            id: held.id,
            steps: status.steps,
        });
    }
    let started = Instant::now();
    let resume_from = latest_step(&dir)?;
    let mut status = begin_attempt(&held, previous.as_ref(), resume_from, &options)?;
    let start_time = SystemTime::from(status.started_at);
    let mut finish = |state: State, error: Option<String>, steps: Option<u64>| {
        status.state = state;
        status.error = error;
        status.steps = steps.or(status.steps);
        status.ended_at = Some(Utc::now());
        status.wall_s += started.elapsed().as_secs_f64();
        if state == State::Finished {
            status.total_steps = steps;
        }
        status.write(&dir)
    };
    let resolved = match plan.resolve(folder, index, &options.flags) {
        Ok(resolved) => resolved,
        Err(e) => {
            finish(State::Failed, Some(e.to_string()), None)?;
            return Err(SweepError::Config(e));
        }
    };
    if let Some(threads) = options.threads {
        tch::set_num_threads(threads as i32);
    }
    match train_trial(held, &plan, &resolved, resume_from, start_time, options) {
        Ok(outcome) => {
            finish(State::Finished, None, Some(outcome.steps))?;
            Ok(TrialEnd::Finished(outcome))
        }
        Err(e) => {
            let e = trial_error(folder, index, e);
            match &e {
                SweepError::Interrupted { step, .. } => finish(
                    State::Interrupted,
                    Some(format!("interrupted at step {step}")),
                    Some(*step),
                )?,
                SweepError::TrialNonFinite { step, .. } => {
                    finish(State::Failed, Some(e.to_string()), Some(*step))?
                }
                _ => finish(State::Failed, Some(e.to_string()), None)?,
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a number or an array variable, the message names both ways to give one.
    #[test]
    fn a_missing_trial_number_names_both_commands() {
        if INDEX_VARIABLES
            .iter()
            .any(|v| std::env::var_os(v).is_some())
        {
            return; // running inside an array task: the variable answers
        }
        assert_eq!(trial_index(Some(3)).unwrap(), 3);
        let err = trial_index(None).unwrap_err().to_string();
        assert!(err.contains("`probunet sweep trial FOLDER N`"), "{err}");
        assert!(
            err.contains("`probunet train --sweep FOLDER --trial N`"),
            "{err}"
        );
    }

    /// A trial killed while its only checkpoint (keep_last = 1) was being swapped for a
    /// save at the same step left it as `.step-N.old`: that is a checkpoint to resume
    /// from, not an empty folder to clear.
    #[test]
    fn a_checkpoint_a_killed_save_was_swapping_is_resumed_not_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("checkpoints/.step-00000010.old");
        std::fs::create_dir_all(&old).unwrap();
        std::fs::write(old.join("model.safetensors"), "weights").unwrap();
        assert_eq!(latest_step(dir.path()).unwrap(), Some(10));
        let back = dir
            .path()
            .join("checkpoints/step-00000010/model.safetensors");
        assert_eq!(std::fs::read_to_string(back).unwrap(), "weights");
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(latest_step(empty.path()).unwrap(), None);
    }
}

//! One trial of a sweep, as `probunet train --sweep runs/<sweep> --trial N` runs it: the
//! same entry point for local sweeps (a child process per trial), Slurm array tasks and
//! Kubernetes Indexed Jobs. A trial's folder is an ordinary run folder plus
//! `status.json` (what happened to it) and `.lock` (held while a process runs it).
use super::plan::Plan;
use super::SweepError;
use crate::config::Flag;
use crate::tensorboard::{EventWriter, SessionStatus};
use crate::train::run::write_atomic;
use crate::train::{self, Checkpoints, TrainError, TrainOptions};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::path::Path;
use std::time::{Instant, SystemTime};

pub const STATUS_FILE: &str = "status.json";
pub const LOCK_FILE: &str = ".lock";
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

    pub fn write(&self, dir: &Path) -> Result<(), TrainError> {
        let json = serde_json::to_vec_pretty(self).expect("the status serialises");
        write_atomic(&dir.join(STATUS_FILE), &json)
    }
}

/// The host name, for status files (which host runs a trial).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

/// An exclusive `flock` on a trial's `.lock`, held while a process runs the trial, so
/// that two processes never run one trial and a dead one is told from a running one.
#[derive(Debug)]
pub struct TrialLock {
    _file: File,
}

impl TrialLock {
    /// The lock, or `None` when another process holds it.
    pub fn try_acquire(dir: &Path) -> std::io::Result<Option<TrialLock>> {
        use std::os::fd::AsRawFd;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(Some(TrialLock { _file: file }));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(err)
        }
    }

    /// Whether a process holds the lock of the trial in `dir` now.
    pub fn is_held(dir: &Path) -> bool {
        dir.join(LOCK_FILE).exists() && matches!(Self::try_acquire(dir), Ok(None))
    }
}

/// The step of the trial's latest checkpoint, if it has one.
pub fn checkpoint_step(dir: &Path) -> Option<u64> {
    Checkpoints::new(dir.join("checkpoints"), 1)
        .steps()
        .ok()?
        .last()
        .map(|(step, _)| *step)
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
        "which trial? Pass --trial N, or run as a Slurm array task ({}) or a Kubernetes \
         Indexed Job ({})",
        INDEX_VARIABLES[0], INDEX_VARIABLES[1]
    )))
}

/// Options of one trial's process.
#[derive(Debug, Clone, Default)]
pub struct TrialOptions {
    /// `--device` and `--precision` flags, layered between the base and the trial's values.
    pub flags: Vec<Flag>,
    pub threads: Option<usize>,
    pub train: TrainOptions,
}

/// How a trial's process ended.
#[derive(Debug)]
pub enum TrialEnd {
    Finished(train::Outcome),
    AlreadyFinished { steps: Option<u64> },
}

/// Runs trial `index` of the sweep in `folder`: resumes it from its checkpoint if it has
/// one, starts it afresh otherwise, and does nothing if it finished. Its `status.json`
/// says how it ended; an error is returned as well (Interrupted for Ctrl-C).
pub fn run(folder: &Path, index: usize, options: &TrialOptions) -> Result<TrialEnd, SweepError> {
    let plan = Plan::load(folder)?;
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
    let io = |e: std::io::Error| SweepError::Folder {
        path: dir.clone(),
        why: e.to_string(),
    };
    std::fs::create_dir_all(&dir).map_err(io)?;
    // `--collect` and a starting sweep hold the lock for an instant to see whether the
    // trial runs: wait that out before concluding that another process runs it.
    let mut lock = None;
    for _ in 0..30 {
        lock = TrialLock::try_acquire(&dir).map_err(io)?;
        if lock.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _lock = lock.ok_or_else(|| {
        SweepError::Other(format!(
            "trial {index} ({}) is being run by another process (it holds {})",
            trial.id,
            dir.join(LOCK_FILE).display()
        ))
    })?;
    let previous = Status::read(&dir);
    if let Some(status) = previous.as_ref().filter(|s| s.state == State::Finished) {
        println!(
            "trial {index} ({}) already finished ({} steps); nothing to do",
            trial.id,
            status.steps.unwrap_or(0)
        );
        return Ok(TrialEnd::AlreadyFinished {
            steps: status.steps,
        });
    }
    let now = Utc::now();
    let started = Instant::now();
    let resume_from = checkpoint_step(&dir);
    let mut status = Status {
        state: State::Running,
        error: None,
        steps: resume_from,
        total_steps: previous.as_ref().and_then(|s| s.total_steps),
        attempts: previous.as_ref().map_or(0, |s| s.attempts) + 1,
        wall_s: previous.as_ref().map_or(0.0, |s| s.wall_s),
        started_at: previous
            .as_ref()
            .filter(|_| resume_from.is_some())
            .map_or(now, |s| s.started_at),
        attempt_started_at: now,
        ended_at: None,
        host: hostname(),
        pid: std::process::id(),
        device: options
            .flags
            .iter()
            .find(|f| f.key == "train.device")
            .map(|f| f.value.clone()),
        threads: options.threads,
    };
    if resume_from.is_none() {
        // A fresh start: clear what an attempt that never checkpointed left behind.
        status.wall_s = 0.0;
        for entry in std::fs::read_dir(&dir).map_err(io)?.flatten() {
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
    }
    status.write(&dir)?;

    let finish = |status: &mut Status, state: State, error: Option<String>| {
        status.state = state;
        status.error = error;
        status.ended_at = Some(Utc::now());
        status.wall_s += started.elapsed().as_secs_f64();
        status.write(&dir)
    };
    let resolved = match plan.resolve(folder, index, &options.flags) {
        Ok(resolved) => resolved,
        Err(e) => {
            finish(&mut status, State::Failed, Some(e.to_string()))?;
            return Err(SweepError::Config(e));
        }
    };
    if let Some(threads) = options.threads {
        tch::set_num_threads(threads as i32);
    }
    let mut hparams = None;
    let result = (|| match resume_from {
        Some(_) => train::resume(&dir, &resolved, &options.train),
        None => {
            let mut writer = EventWriter::create(&dir)?;
            writer.add_hparams_session_start(
                &plan.hparams(trial),
                &trial.group,
                SystemTime::from(now),
            )?;
            writer.flush()?;
            hparams = Some(writer);
            train::train_in(&dir, &resolved, &options.train)
        }
    })();
    let end_session = |hparams: Option<EventWriter>, session: SessionStatus| {
        let mut writer = match hparams {
            Some(writer) => writer,
            None => EventWriter::create(&dir)?,
        };
        writer.add_hparams_session_end(session, SystemTime::now())?;
        writer.close()
    };
    match result {
        Ok(outcome) => {
            status.steps = Some(outcome.steps);
            status.total_steps = Some(outcome.steps);
            end_session(hparams, SessionStatus::Success)?;
            finish(&mut status, State::Finished, None)?;
            Ok(TrialEnd::Finished(outcome))
        }
        Err(TrainError::Interrupted { step, run }) => {
            status.steps = Some(step);
            finish(
                &mut status,
                State::Interrupted,
                Some(format!("interrupted at step {step}")),
            )?;
            Err(SweepError::Interrupted {
                index,
                step,
                folder: folder.to_path_buf(),
                run,
            })
        }
        Err(TrainError::NonFinite { step, what, run }) => {
            status.steps = Some(step);
            let e = SweepError::TrialNonFinite {
                index,
                step,
                what,
                folder: folder.to_path_buf(),
                run,
            };
            end_session(hparams, SessionStatus::Failure)?;
            finish(&mut status, State::Failed, Some(e.to_string()))?;
            Err(e)
        }
        Err(e) => {
            end_session(hparams, SessionStatus::Failure)?;
            finish(&mut status, State::Failed, Some(e.to_string()))?;
            Err(SweepError::from(e))
        }
    }
}

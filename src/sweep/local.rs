//! Local sweeps: `--jobs N` trials at once on this machine, each a child process
//! `probunet sweep trial <folder> N --events -` with its share of the CPU cores
//! (libtorch's generator and thread count are process-wide, so trials cannot share a
//! process without losing their determinism) and, on GPUs, its device. A child reports
//! its training to the sweep as JSON lines ([`TrainEvent`]s) on its stdout; its stderr,
//! the human lines, goes to the trial's `train.log`. The sweep tells the caller what
//! happens as [`SweepEvent`]s.
use super::plan::Plan;
use super::summary::{trial_state, TrialState};
use super::trial::{checkpoint_step, State, Status, LOG_FILE};
use super::SweepError;
use crate::run::RunLock;
use crate::train::{self, TrainEvent};
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// How to run a sweep locally.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Trials at once.
    pub jobs: usize,
    /// Devices that the running trials take in turn (`cuda:0`, `cuda:1`, `cpu`); empty
    /// leaves each trial's `train.device` as its spec says.
    pub devices: Vec<String>,
    /// Threads of each trial (its share of the cores).
    pub threads: usize,
    /// Run failed trials again (by default they stay failed).
    pub retry_failed: bool,
}

/// Ctrl-C for a running sweep: the first request sends every running trial one SIGINT,
/// so each finishes its step, checkpoints and exits; a second sends another, which
/// stops them at once. Trials not started yet are not started.
#[derive(Debug, Default)]
pub struct Stop {
    inner: Mutex<StopInner>,
}

#[derive(Debug, Default)]
struct StopInner {
    requests: u32,
    /// Running trials' process ids by trial index.
    children: BTreeMap<usize, u32>,
}

/// Blocks until our child `pid` has exited, without reaping it: as a zombie it keeps its
/// pid, so signalling that pid still reaches nobody else. Returns at once on an error
/// (the reaping `wait` then reports it).
fn wait_exited(pid: u32) {
    loop {
        // SAFETY: an all-zero siginfo_t is a valid out-value for waitid to fill.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid with WNOWAIT only observes the state of our own child, writing
        // into `info`, which lives for the call.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        let interrupted =
            rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR);
        if !interrupted {
            return;
        }
    }
}

fn interrupt(pid: u32) {
    // SAFETY: kill(2) with a pid this process spawned and has not reaped yet.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGINT);
    }
}

impl Stop {
    /// Asks every running trial to stop; returns how many times stopping was asked.
    pub fn request(&self) -> u32 {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.requests += 1;
        for &pid in inner.children.values() {
            interrupt(pid);
        }
        inner.requests
    }

    pub fn requested(&self) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .requests
            > 0
    }

    /// Records a running trial; one started after a request is asked to stop at once,
    /// under the same lock, so it gets exactly one SIGINT per request.
    fn register(&self, index: usize, pid: u32) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.children.insert(index, pid);
        for _ in 0..inner.requests {
            interrupt(pid);
        }
    }

    fn unregister(&self, index: usize) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.children.remove(&index);
    }
}

/// What a local run did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Trials this run started.
    pub ran: usize,
    pub finished: usize,
    pub failed: usize,
    pub interrupted: usize,
    /// Optimiser steps taken by all its trials together.
    pub trial_steps: u64,
    pub wall_s: f64,
}

impl Report {
    pub fn throughput(&self) -> f64 {
        self.trial_steps as f64 / self.wall_s.max(1e-9)
    }
}

/// The trials a local run will run, and what the others are doing.
#[derive(Debug, Clone)]
pub struct Queue {
    pub name: String,
    pub folder: PathBuf,
    pub trials: usize,
    pub finished: usize,
    /// Failed, and not retried.
    pub failed: usize,
    /// Run by another process now.
    pub busy: usize,
    /// The trials to run, in order.
    pub to_run: Vec<usize>,
    pub jobs: usize,
    pub threads: usize,
    pub devices: Vec<String>,
    /// Steps each trial to run has left, where known.
    pub steps_left: HashMap<usize, u64>,
}

/// What a local sweep tells as it goes.
#[derive(Debug)]
pub enum SweepEvent<'a> {
    /// Which trials run, before any starts.
    Queued(&'a Queue),
    /// The trial's process holds the trial and starts training.
    TrialStarted {
        index: usize,
        id: &'a str,
        device: Option<&'a str>,
        threads: usize,
        /// The checkpoint step it resumes from, 0 for a fresh start.
        resume_from: u64,
    },
    /// A line the trial's process wrote (its stderr, also kept in its train.log).
    TrialLine {
        index: usize,
        id: &'a str,
        line: &'a str,
    },
    /// An event of the trial's training.
    Training {
        index: usize,
        id: &'a str,
        event: &'a TrainEvent,
    },
    TrialEnded {
        index: usize,
        id: &'a str,
        state: State,
        /// Its step count at the end, when known.
        steps: Option<u64>,
        error: Option<&'a str>,
    },
}

/// Where the sweep's events go; called from the worker threads.
pub type Observer<'a> = &'a (dyn Fn(SweepEvent) + Sync);

struct Ctx<'a> {
    folder: &'a Path,
    plan: &'a Plan,
    options: &'a LocalOptions,
    stop: &'a Stop,
    exe: PathBuf,
    observe: Observer<'a>,
    counts: Mutex<Report>,
}

/// Which trials to run: those not finished, nor failed (unless retried), nor run by
/// another process.
fn queue(folder: &Path, plan: &Plan, options: &LocalOptions) -> Queue {
    let mut queue = Queue {
        name: plan.name.clone(),
        folder: folder.to_path_buf(),
        trials: plan.trials.len(),
        finished: 0,
        failed: 0,
        busy: 0,
        to_run: Vec::new(),
        jobs: options.jobs,
        threads: options.threads,
        devices: options.devices.clone(),
        steps_left: HashMap::new(),
    };
    for trial in &plan.trials {
        match trial_state(folder, plan, trial.index) {
            TrialState::Finished => queue.finished += 1,
            TrialState::Failed if !options.retry_failed => queue.failed += 1,
            TrialState::Running => queue.busy += 1,
            _ => queue.to_run.push(trial.index),
        }
    }
    queue
}

/// The very executable running now, even if its file is replaced during the sweep (an
/// upgrade, a rebuild): every trial runs the same probunet.
fn this_executable() -> Result<PathBuf, SweepError> {
    let this = Path::new("/proc/self/exe");
    if this.exists() {
        return Ok(this.to_path_buf());
    }
    std::env::current_exe().map_err(|e| {
        SweepError::Other(format!(
            "cannot find the probunet executable to run trials: {e}"
        ))
    })
}

/// Runs every trial of `plan` in `folder` that has not finished (nor failed, unless
/// retried) with `options.jobs` at once.
pub fn run_pending(
    folder: &Path,
    plan: &Plan,
    options: &LocalOptions,
    stop: &Stop,
    observe: Observer,
) -> Result<Report, SweepError> {
    let mut queue = queue(folder, plan, options);
    if !queue.to_run.is_empty() {
        queue.steps_left = prepare(folder, plan, &queue.to_run);
    }
    observe(SweepEvent::Queued(&queue));
    if queue.to_run.is_empty() {
        return Ok(Report::default());
    }
    let ctx = Ctx {
        folder,
        plan,
        options,
        stop,
        exe: this_executable()?,
        observe,
        counts: Mutex::new(Report::default()),
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(options.jobs)
        .thread_name(|i| format!("sweep-worker-{i}"))
        .build()
        .map_err(|e| SweepError::Other(format!("cannot start {} workers: {e}", options.jobs)))?;
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    pool.scope(|scope| {
        for slot in 0..options.jobs.min(queue.to_run.len()) {
            let (ctx, next, to_run) = (&ctx, &next, &queue.to_run);
            scope.spawn(move |_| loop {
                if ctx.stop.requested() {
                    break;
                }
                let k = next.fetch_add(1, Ordering::SeqCst);
                let Some(&index) = to_run.get(k) else {
                    break;
                };
                run_one(ctx, slot, index);
            });
        }
    });
    let mut report = ctx.counts.into_inner().unwrap_or_else(|e| e.into_inner());
    report.wall_s = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Resolves the trials `indices` once, before any runs: to prepare each synthetic
/// dataset they use (so that trials starting together do not race to make it) and to
/// size progress bars. Returns the steps each has left. A trial that does not resolve is
/// left to fail in its own process, with its own error.
pub fn prepare(folder: &Path, plan: &Plan, indices: &[usize]) -> HashMap<usize, u64> {
    let mut totals = HashMap::new();
    let mut items_by_data: HashMap<String, Option<usize>> = HashMap::new();
    for &index in indices {
        let Ok(resolved) = plan.resolve(folder, index, &[]) else {
            continue;
        };
        let data = serde_json::to_string(&resolved.experiment.data).unwrap_or_default();
        let items = *items_by_data.entry(data).or_insert_with(|| {
            crate::run::data_source(&resolved.experiment)
                .ok()
                .and_then(|source| source.open().ok())
                .map(|(store, _)| store.split(crate::data::split::SplitName::Train).len())
        });
        if let Some(total) =
            items.and_then(|items| train::planned_steps(&resolved.experiment, items))
        {
            let done = checkpoint_step(&plan.trial_dir(folder, index)).unwrap_or(0);
            totals.insert(index, total.saturating_sub(done));
        }
    }
    totals
}

fn describe_exit(exit: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (exit.code(), exit.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => "ended".into(),
    }
}

/// How a trial's process ended, as it told.
struct Followed {
    exit: ExitStatus,
    /// The last step it reported.
    last_step: Option<u64>,
    /// The error of its `Failed` event.
    error: Option<String>,
}

/// A status for a trial whose process could not say how it ended.
fn fallback_status(
    state: State,
    launched: DateTime<Utc>,
    device: Option<&str>,
    threads: usize,
) -> Status {
    Status {
        state,
        error: None,
        steps: None,
        total_steps: None,
        attempts: 1,
        wall_s: 0.0,
        started_at: launched,
        attempt_started_at: launched,
        ended_at: None,
        host: crate::sys::hostname(),
        pid: 0,
        device: device.map(Into::into),
        threads: Some(threads),
    }
}

/// How the trial ended: what its own status.json says of this attempt, else (a process
/// killed or crashed before it could say) recorded here from its exit.
fn settle(
    ctx: &Ctx,
    dir: &Path,
    followed: Followed,
    launched: DateTime<Utc>,
    device: Option<&str>,
) -> (State, Option<String>, Option<u64>) {
    let current = Status::read(dir);
    match current.as_ref() {
        // Finished by this attempt, or by another process before this one looked.
        Some(s) if s.state == State::Finished => return (s.state, None, s.steps),
        Some(s) if s.attempt_started_at >= launched && s.state != State::Running => {
            return (s.state, s.error.clone(), s.steps)
        }
        _ if RunLock::is_held(dir) => {
            // Another process runs it (its own child failed to take the lock).
            return (
                State::Running,
                Some("being run by another process".into()),
                None,
            );
        }
        _ => {}
    }
    let interrupted = ctx.stop.requested()
        || std::os::unix::process::ExitStatusExt::signal(&followed.exit) == Some(libc::SIGINT);
    let state = match interrupted {
        true => State::Interrupted,
        false => State::Failed,
    };
    let mut why = format!("the trial's process {}", describe_exit(&followed.exit));
    if let Some(error) = followed.error {
        why.push_str(&format!(": {error}"));
    }
    let mut status =
        current.unwrap_or_else(|| fallback_status(state, launched, device, ctx.options.threads));
    if status.attempt_started_at < launched {
        status.attempts += 1;
        status.attempt_started_at = launched;
    }
    status.state = state;
    status.error = Some(why.clone());
    status.ended_at = Some(Utc::now());
    status.steps = checkpoint_step(dir).or(followed.last_step);
    let _ = status.write(dir);
    (state, Some(why), followed.last_step)
}

/// What another process did with the trial since the queue was made, if anything: a
/// second sweep on the same folder takes trials as they come, and this one skips them
/// instead of waiting on their lock ([`RunLock::is_held`] looks without taking it).
fn taken_elsewhere(dir: &Path) -> Option<(State, Option<String>, Option<u64>)> {
    if let Some(status) = Status::read(dir).filter(|s| s.state == State::Finished) {
        return Some((State::Finished, None, status.steps));
    }
    let why = "being run by another process".to_string();
    RunLock::is_held(dir).then_some((State::Running, Some(why), None))
}

fn run_one(ctx: &Ctx, slot: usize, index: usize) {
    let trial = &ctx.plan.trials[index];
    let dir = ctx.plan.trial_dir(ctx.folder, index);
    if let Some((state, error, steps)) = taken_elsewhere(&dir) {
        if state == State::Finished {
            ctx.counts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .finished += 1;
        }
        (ctx.observe)(SweepEvent::TrialEnded {
            index,
            id: &trial.id,
            state,
            steps,
            error: error.as_deref(),
        });
        return;
    }
    let devices = &ctx.options.devices;
    let device = (!devices.is_empty()).then(|| devices[slot % devices.len()].as_str());
    let start_step = checkpoint_step(&dir).unwrap_or(0);
    let launched = Utc::now();
    ctx.counts.lock().unwrap_or_else(|e| e.into_inner()).ran += 1;
    let (state, error, end_step) = match spawn_and_follow(ctx, index, &dir, device) {
        Ok(followed) => settle(ctx, &dir, followed, launched, device),
        Err(why) => {
            let _ = std::fs::create_dir_all(&dir);
            // What an earlier attempt recorded (its steps, start, attempts) stays true:
            // this one never ran.
            let mut status = Status::read(&dir).unwrap_or_else(|| {
                fallback_status(State::Failed, launched, device, ctx.options.threads)
            });
            status.state = State::Failed;
            status.error = Some(why.clone());
            status.ended_at = Some(Utc::now());
            let _ = status.write(&dir);
            (State::Failed, Some(why), status.steps)
        }
    };
    let steps = end_step.unwrap_or(start_step).saturating_sub(start_step);
    {
        let mut c = ctx.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.trial_steps += steps;
        match state {
            State::Finished => c.finished += 1,
            State::Interrupted => c.interrupted += 1,
            State::Failed => c.failed += 1,
            State::Running => c.ran -= 1,
        }
    }
    (ctx.observe)(SweepEvent::TrialEnded {
        index,
        id: &trial.id,
        state,
        steps: end_step,
        error: error.as_deref(),
    });
}

/// The trial's process: its own process group (so a terminal's Ctrl-C reaches only the
/// sweep, which forwards exactly one SIGINT per Ctrl-C), a stop when the sweep dies,
/// JSON events on its stdout and human lines on its stderr.
fn trial_command(ctx: &Ctx, index: usize, device: Option<&str>) -> (Command, Vec<String>) {
    let threads = ctx.options.threads.to_string();
    let mut args: Vec<String> = vec![
        "sweep".into(),
        "trial".into(),
        ctx.folder.display().to_string(),
        index.to_string(),
        "--plain".into(),
        "--threads".into(),
        threads.clone(),
        "--events".into(),
        "-".into(),
    ];
    if let Some(device) = device {
        args.extend(["--device".into(), device.into()]);
    }
    let mut command = Command::new(&ctx.exe);
    command
        .args(&args)
        .env("OMP_NUM_THREADS", &threads)
        .env("MKL_NUM_THREADS", &threads)
        .env(
            "OMP_WAIT_POLICY",
            // Idle OpenMP threads sleep instead of spinning: trials share this machine
            // with each other and whatever else runs, where spinning threads make
            // everything crawl (see README, Throughput).
            std::env::var_os("OMP_WAIT_POLICY").unwrap_or_else(|| "PASSIVE".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    use std::os::unix::process::CommandExt;
    command.process_group(0);
    // Named as the sweep itself was, rather than /proc/self/exe, in ps and top.
    command.arg0(
        std::env::args_os()
            .next()
            .unwrap_or_else(|| "probunet".into()),
    );
    // If the sweep dies, its trials finish their step, checkpoint and stop.
    command.env(PARENT_ENV, std::process::id().to_string());
    (command, args)
}

/// The pid of the sweep that started a trial, so that the trial notices its death.
pub const PARENT_ENV: &str = "PROBUNET_SWEEP_PARENT";

/// In a trial started by a local sweep ([`PARENT_ENV`] set), sets `stop` once the sweep
/// process is gone (the trial is reparented), checking every 100 ms. A parent-death
/// signal would do it sooner but arrives once per thread of the dying sweep, and a
/// second Ctrl-C means "stop at once, without a checkpoint".
pub fn stop_when_parent_dies(stop: Arc<AtomicBool>) {
    let Some(parent) = std::env::var(PARENT_ENV)
        .ok()
        .and_then(|pid| pid.parse::<libc::pid_t>().ok())
    else {
        return;
    };
    std::thread::spawn(move || loop {
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } != parent {
            stop.store(true, Ordering::SeqCst);
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    });
}

/// The trial's train.log, opened for appending with a header line for this attempt.
fn open_log(dir: &Path, args: &[String]) -> Result<File, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = dir.join(LOG_FILE);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let _ = writeln!(
        log,
        "=== {} probunet {}",
        Utc::now().format("%Y-%m-%d %H:%M:%S UTC"),
        args.join(" ")
    );
    Ok(log)
}

/// Runs the trial's process and follows it to its end.
fn spawn_and_follow(
    ctx: &Ctx,
    index: usize,
    dir: &Path,
    device: Option<&str>,
) -> Result<Followed, String> {
    let (mut command, args) = trial_command(ctx, index, device);
    let mut log = open_log(dir, &args)?;
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", ctx.exe.display()))?;
    ctx.stop.register(index, child.id());
    let (last_step, error) = follow(ctx, index, device, &mut child, &mut log);
    // Forgotten by Stop before it is reaped: once reaped, its pid may name another
    // process, which a Ctrl-C in between would have interrupted.
    wait_exited(child.id());
    ctx.stop.unregister(index);
    let exit = child.wait();
    let exit = exit.map_err(|e| format!("waiting for the trial's process: {e}"))?;
    let _ = writeln!(log, "=== {}", describe_exit(&exit));
    Ok(Followed {
        exit,
        last_step,
        error,
    })
}

/// Reads the child's JSON events (a thread) and its stderr lines (here, into the log)
/// until both close: the last step it reported and the error it failed with.
fn follow(
    ctx: &Ctx,
    index: usize,
    device: Option<&str>,
    child: &mut Child,
    log: &mut File,
) -> (Option<u64>, Option<String>) {
    let id = &ctx.plan.trials[index].id;
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    std::thread::scope(|scope| {
        let events = scope.spawn(|| {
            let (mut last_step, mut error) = (None, None);
            for line in stdout.into_iter().flat_map(|s| BufReader::new(s).lines()) {
                let Ok(line) = line else { break };
                let Ok(event) = serde_json::from_str::<TrainEvent>(&line) else {
                    continue;
                };
                match &event {
                    // Only now is it known that this process holds the trial.
                    TrainEvent::Started { step, .. } => (ctx.observe)(SweepEvent::TrialStarted {
                        index,
                        id,
                        device,
                        threads: ctx.options.threads,
                        resume_from: *step,
                    }),
                    TrainEvent::Step { step, .. } => last_step = Some(*step),
                    TrainEvent::Failed { error: e, .. } => error = Some(e.clone()),
                    _ => {}
                }
                (ctx.observe)(SweepEvent::Training {
                    index,
                    id,
                    event: &event,
                });
            }
            (last_step, error)
        });
        let mut error_line = None;
        for line in stderr.into_iter().flat_map(|s| BufReader::new(s).lines()) {
            let Ok(line) = line else { break };
            let _ = writeln!(log, "{line}");
            if let Some(error) = line.strip_prefix("error: ") {
                error_line = Some(error.to_string());
            }
            (ctx.observe)(SweepEvent::TrialLine {
                index,
                id,
                line: &line,
            });
        }
        let (last_step, error) = events.join().unwrap_or((None, None));
        // A process that failed before training started said why only on stderr.
        (last_step, error.or(error_line))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exited_trial_is_observed_without_being_reaped() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "exit 3"])
            .spawn()
            .unwrap();
        wait_exited(child.id());
        // Still a zombie: its pid is not free for another process yet.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
        let state = stat.rsplit_once(") ").unwrap().1.chars().next();
        assert_eq!(state, Some('Z'), "{stat}");
        assert_eq!(child.wait().unwrap().code(), Some(3));
    }
}

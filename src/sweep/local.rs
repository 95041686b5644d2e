//! Local sweeps: `--jobs N` trials at once on this machine, each a child process
//! `probunet train --sweep <folder> --trial N --plain` with its share of the CPU cores
//! (libtorch's generator and thread count are process-wide, so trials cannot share a
//! process without losing their determinism) and, on GPUs, its device. The children's
//! progress lines drive one bar per running trial under an overall bar.
use super::plan::Plan;
use super::summary::{trial_state, TrialState};
use super::trial::{checkpoint_step, hostname, State, Status, TrialLock, LOG_FILE};
use super::SweepError;
use crate::train;
use chrono::Utc;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
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
    /// Plain lines instead of progress bars even on a terminal.
    pub plain: bool,
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

struct Ctx<'a> {
    folder: &'a Path,
    plan: &'a Plan,
    options: &'a LocalOptions,
    stop: &'a Stop,
    exe: PathBuf,
    bars: Option<MultiProgress>,
    overall: ProgressBar,
    totals: HashMap<usize, u64>,
    counts: Mutex<Report>,
    queued: usize,
}

impl Ctx<'_> {
    /// A line that stays: above the bars, or on stderr.
    fn say(&self, line: &str) {
        match &self.bars {
            Some(bars) => {
                let _ = bars.println(line);
            }
            None => eprintln!("{line}"),
        }
    }

    fn update_overall(&self) {
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let running = c.ran - c.finished - c.failed - c.interrupted;
        self.overall.set_message(format!(
            "{}/{} trials done, {running} running, {} failed",
            c.finished, self.queued, c.failed
        ));
    }
}

/// Runs every trial of `plan` in `folder` that has not finished (nor failed, unless
/// retried) with `options.jobs` at once.
pub fn run(
    folder: &Path,
    plan: &Plan,
    options: &LocalOptions,
    stop: &Stop,
) -> Result<Report, SweepError> {
    let mut queue = Vec::new();
    let (mut finished, mut failed, mut busy) = (0, 0, 0);
    for trial in &plan.trials {
        match trial_state(folder, plan, trial.index) {
            TrialState::Finished => finished += 1,
            TrialState::Failed if !options.retry_failed => failed += 1,
            TrialState::Running => busy += 1,
            _ => queue.push(trial.index),
        }
    }
    let mut line = format!(
        "sweep {}: {} trials in {}: {finished} finished",
        plan.name,
        plan.trials.len(),
        folder.display()
    );
    if failed > 0 {
        line.push_str(&format!(
            ", {failed} failed (--retry-failed runs them again)"
        ));
    }
    if busy > 0 {
        line.push_str(&format!(", {busy} being run by another process"));
    }
    if queue.is_empty() {
        println!("{line}; nothing to run");
        return Ok(Report::default());
    }
    let devices = if options.devices.is_empty() {
        "as each trial's spec says".to_string()
    } else {
        options.devices.join(", ")
    };
    println!(
        "{line}, {} to run: {} at once, {} thread(s) each, devices: {devices}",
        queue.len(),
        options.jobs,
        options.threads
    );

    let totals = prepare(folder, plan, &queue);

    let plain = options.plain || !std::io::stderr().is_terminal();
    let bars = (!plain).then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
    let overall = ProgressBar::new(totals.values().sum());
    overall.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} trial-steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .expect("a valid template"),
    );
    let overall = match &bars {
        Some(bars) => bars.add(overall),
        None => {
            overall.set_draw_target(ProgressDrawTarget::hidden());
            overall
        }
    };
    // The very executable running now, even if its file is replaced during the sweep
    // (an upgrade, a rebuild): every trial runs the same probunet.
    let this = Path::new("/proc/self/exe");
    let exe = if this.exists() {
        this.to_path_buf()
    } else {
        std::env::current_exe().map_err(|e| {
            SweepError::Other(format!(
                "cannot find the probunet executable to run trials: {e}"
            ))
        })?
    };
    let ctx = Ctx {
        folder,
        plan,
        options,
        stop,
        exe,
        bars,
        overall,
        totals,
        counts: Mutex::new(Report::default()),
        queued: queue.len(),
    };
    ctx.update_overall();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(options.jobs)
        .thread_name(|i| format!("sweep-worker-{i}"))
        .build()
        .map_err(|e| SweepError::Other(format!("cannot start {} workers: {e}", options.jobs)))?;
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    pool.scope(|scope| {
        for slot in 0..options.jobs.min(queue.len()) {
            let (ctx, next, queue) = (&ctx, &next, &queue);
            scope.spawn(move |_| loop {
                if ctx.stop.requested() {
                    break;
                }
                let k = next.fetch_add(1, Ordering::SeqCst);
                let Some(&index) = queue.get(k) else {
                    break;
                };
                run_one(ctx, slot, index);
            });
        }
    });
    let mut report = ctx.counts.into_inner().unwrap_or_else(|e| e.into_inner());
    report.wall_s = started.elapsed().as_secs_f64();
    ctx.overall.finish_and_clear();
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
            train::open_store(&resolved.experiment)
                .ok()
                .map(|store| store.split(crate::data::split::SplitName::Train).len())
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

/// `S` and `T` of a child's `step S/T  ...` progress line.
fn parse_step(line: &str) -> Option<(u64, u64)> {
    let (step, total) = line
        .strip_prefix("step ")?
        .split_whitespace()
        .next()?
        .split_once('/')?;
    Some((step.parse().ok()?, total.parse().ok()?))
}

fn describe_exit(exit: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (exit.code(), exit.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => "ended".into(),
    }
}

fn run_one(ctx: &Ctx, slot: usize, index: usize) {
    let trial = &ctx.plan.trials[index];
    let dir = ctx.plan.trial_dir(ctx.folder, index);
    let device = (!ctx.options.devices.is_empty())
        .then(|| ctx.options.devices[slot % ctx.options.devices.len()].clone());
    let start_step = checkpoint_step(&dir).unwrap_or(0);
    let launched = Utc::now();
    {
        let mut c = ctx.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.ran += 1;
    }
    ctx.update_overall();
    let outcome = spawn_and_follow(ctx, index, &dir, device.as_deref(), start_step);
    let (state, error, end_step) = match outcome {
        Ok((exit, last_step, last_error)) => {
            let current = Status::read(&dir);
            let this_attempt = current.clone().filter(|s| s.attempt_started_at >= launched);
            match this_attempt {
                Some(s) if s.state != State::Running => (s.state, s.error, s.steps),
                _ if TrialLock::is_held(&dir) => {
                    // Another process runs it (its own child failed to take the lock).
                    (
                        State::Running,
                        Some("being run by another process".into()),
                        None,
                    )
                }
                _ => {
                    // The trial's process ended without saying how (killed, crashed):
                    // record it here.
                    let interrupted = ctx.stop.requested()
                        || std::os::unix::process::ExitStatusExt::signal(&exit)
                            == Some(libc::SIGINT);
                    let state = if interrupted {
                        State::Interrupted
                    } else {
                        State::Failed
                    };
                    let mut why = format!("the trial's process {}", describe_exit(&exit));
                    if let Some(line) = last_error {
                        why.push_str(&format!(": {line}"));
                    }
                    let now = Utc::now();
                    let mut status = current.unwrap_or(Status {
                        state,
                        error: None,
                        steps: None,
                        total_steps: None,
                        attempts: 1,
                        wall_s: 0.0,
                        started_at: launched,
                        attempt_started_at: launched,
                        ended_at: None,
                        host: hostname(),
                        pid: 0,
                        device: device.clone(),
                        threads: Some(ctx.options.threads),
                    });
                    if status.attempt_started_at < launched {
                        status.attempts += 1;
                        status.attempt_started_at = launched;
                    }
                    status.state = state;
                    status.error = Some(why.clone());
                    status.ended_at = Some(now);
                    status.steps = checkpoint_step(&dir).or(last_step);
                    let _ = status.write(&dir);
                    (state, Some(why), last_step)
                }
            }
        }
        Err(why) => {
            let _ = std::fs::create_dir_all(&dir);
            let now = Utc::now();
            let status = Status {
                state: State::Failed,
                error: Some(why.clone()),
                steps: None,
                total_steps: None,
                attempts: 1,
                wall_s: 0.0,
                started_at: now,
                attempt_started_at: now,
                ended_at: Some(now),
                host: hostname(),
                pid: 0,
                device: device.clone(),
                threads: Some(ctx.options.threads),
            };
            let _ = status.write(&dir);
            (State::Failed, Some(why), None)
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
    ctx.update_overall();
    let what = match (state, &error) {
        (State::Finished, _) => format!("finished ({} steps)", end_step.unwrap_or(0)),
        (state, Some(error)) => format!("{}: {error}", state.as_str()),
        (state, None) => state.as_str().to_string(),
    };
    ctx.say(&format!("trial {} {what}", trial.id));
}

/// Runs the trial's process and follows its progress; returns how it exited, the last
/// step it reported and its last error line.
fn spawn_and_follow(
    ctx: &Ctx,
    index: usize,
    dir: &Path,
    device: Option<&str>,
    start_step: u64,
) -> Result<(ExitStatus, Option<u64>, Option<String>), String> {
    let trial = &ctx.plan.trials[index];
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let log_path = dir.join(LOG_FILE);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let threads = ctx.options.threads.to_string();
    let mut args: Vec<String> = vec![
        "train".into(),
        "--sweep".into(),
        ctx.folder.display().to_string(),
        "--trial".into(),
        index.to_string(),
        "--plain".into(),
        "--threads".into(),
        threads.clone(),
    ];
    if let Some(device) = device {
        args.extend(["--device".into(), device.into()]);
    }
    let _ = writeln!(
        log,
        "=== {} probunet {}",
        Utc::now().format("%Y-%m-%d %H:%M:%S UTC"),
        args.join(" ")
    );
    let stdout = log
        .try_clone()
        .map_err(|e| format!("cannot share {}: {e}", log_path.display()))?;
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
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::piped());
    {
        use std::os::unix::process::CommandExt;
        // Its own process group, so a terminal's Ctrl-C reaches only the sweep, which
        // forwards exactly one SIGINT per Ctrl-C.
        command.process_group(0);
        // Named as the sweep itself was, rather than /proc/self/exe, in ps and top.
        command.arg0(
            std::env::args_os()
                .next()
                .unwrap_or_else(|| "probunet".into()),
        );
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe; it runs in the child between fork and exec.
        unsafe {
            // If the sweep dies, its trials get a Ctrl-C and checkpoint.
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT);
                Ok(())
            });
        }
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", ctx.exe.display()))?;
    ctx.stop.register(index, child.id());
    let bar = ctx.bars.as_ref().map(|bars| {
        let bar = ProgressBar::new(ctx.totals.get(&index).map_or(0, |t| t + start_step))
            .with_position(start_step);
        bar.set_style(
            ProgressStyle::with_template("  {prefix} {bar:20} {pos}/{len}  {wide_msg}")
                .expect("a valid template"),
        );
        bar.set_prefix(trial.id.clone());
        bars.insert_before(&ctx.overall, bar)
    });
    let where_ = device.unwrap_or("its spec's device");
    ctx.say(&format!(
        "trial {} started on {where_} with {} thread(s){}",
        trial.id,
        ctx.options.threads,
        if start_step > 0 {
            format!(", resuming from step {start_step}")
        } else {
            String::new()
        }
    ));
    let (mut last_step, mut last_error) = (None, None);
    let mut reported = start_step;
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(log, "{line}");
            if let Some((step, total)) = parse_step(&line) {
                last_step = Some(step);
                ctx.overall.inc(step.saturating_sub(reported));
                reported = reported.max(step);
                if let Some(bar) = &bar {
                    bar.set_length(total);
                    bar.set_position(step);
                    let rest = line.split_once("  ").map_or("", |(_, rest)| rest.trim());
                    bar.set_message(rest.to_string());
                }
            } else if let Some(error) = line.strip_prefix("error: ") {
                last_error = Some(error.to_string());
            }
            if ctx.bars.is_none() {
                eprintln!("[{}] {line}", trial.id);
            }
        }
    }
    let exit = child.wait();
    ctx.stop.unregister(index);
    if let Some(bar) = bar {
        bar.finish_and_clear();
        if let Some(bars) = &ctx.bars {
            bars.remove(&bar);
        }
    }
    let exit = exit.map_err(|e| format!("waiting for the trial's process: {e}"))?;
    let _ = writeln!(log, "=== {}", describe_exit(&exit));
    Ok((exit, last_step, last_error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_parse() {
        assert_eq!(
            parse_step("step 20/60  epoch 1  loss 3.2  val GED 0.4"),
            Some((20, 60))
        );
        assert_eq!(parse_step("step 5/5"), Some((5, 5)));
        assert_eq!(parse_step("steps 5/5"), None);
        assert_eq!(parse_step("step x/5"), None);
        assert_eq!(parse_step("run folder: runs/x"), None);
    }
}

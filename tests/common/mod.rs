//! Helpers shared by the integration tests: one way to run the binary and see why it
//! failed, waiting on what a running process writes instead of sleeping, and readers for
//! what a run leaves behind (TensorBoard events, metrics.csv, a sweep's summary.csv).
#![allow(dead_code)]
use probunet::run::{read_rows, MetricsRow, Phase, METRICS_FILE};
use serde_json::Value;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long any wait on a process may take: generous, since the suite shares a few cores
/// among test binaries that each train models.
pub const TIMEOUT: Duration = Duration::from_secs(300);

/// How often a wait looks again at something no one notifies it of (a file, a folder).
pub const POLL: Duration = Duration::from_millis(25);

// ---------------------------------------------------------------------------------------
// Paths and scripts

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A file under `tests/fixtures/pickle` (the folder itself for `""`).
pub fn pickle_fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/pickle").join(name)
}

/// The Python that has torch, numpy and tensorboard: `$PROBUNET_PYTHON`, else the
/// project's `.venv`. Missing is a failure, not a skip: the README's test command sets it up.
pub fn python() -> PathBuf {
    let path = std::env::var_os("PROBUNET_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"));
    assert!(
        path.exists(),
        "no Python environment at {}: run scripts/setup.sh (or set PROBUNET_PYTHON)",
        path.display()
    );
    path
}

/// Runs a script from `scripts/` with the project's Python and returns its stdout;
/// a non-zero exit fails the test with the script's stderr.
pub fn run_script(script: &str, args: &[&OsStr]) -> String {
    run_script_with_input(script, args, &[])
}

/// [`run_script`] with `input` written to the script's stdin.
pub fn run_script_with_input(script: &str, args: &[&OsStr], input: &[u8]) -> String {
    let mut child = Command::new(python())
        .arg(repo().join("scripts").join(script))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running scripts/{script}: {e}"));
    // Written from a thread of its own, so a script that prints before it has read all of
    // its input cannot fill the stdout pipe and stall both sides.
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().unwrap();
    let written = writer.join().expect("the stdin writer does not panic");
    assert!(
        output.status.success(),
        "scripts/{script} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    written.unwrap_or_else(|e| panic!("writing to scripts/{script}: {e}"));
    String::from_utf8(output.stdout).expect("utf-8 output")
}

// ---------------------------------------------------------------------------------------
// Running the binary

/// `probunet ARGS` in `dir`, with one libtorch thread (tests run in parallel, and more
/// would only fight over the cores) and without the task index of any Slurm or Kubernetes
/// job the suite itself runs in, which `train --sweep` would otherwise pick up.
pub fn probunet<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_probunet"));
    cmd.current_dir(dir)
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("JOB_COMPLETION_INDEX");
    cmd
}

/// Runs `cmd` to the end, capturing its output.
pub fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `cmd` and fails the test, showing its stdout and stderr, unless it succeeds.
pub fn expect_success(cmd: &mut Command) -> Output {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        shown(&out)
    );
    out
}

/// Runs `cmd` and fails the test, showing its stdout and stderr, unless it exits with an
/// error code: a success is wrong, and so is a crash by a signal.
pub fn expect_failure(cmd: &mut Command) -> Output {
    let out = output(cmd);
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "{cmd:?} was expected to exit with an error, but {}:\n{}",
        out.status,
        shown(&out)
    );
    out
}

/// `probunet ARGS` in `dir`, which must succeed.
pub fn run_ok<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> Output {
    expect_success(&mut probunet(dir, args))
}

/// `probunet ARGS` in `dir`, which must exit with an error.
pub fn run_err<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> Output {
    expect_failure(&mut probunet(dir, args))
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Stdout then stderr, for assertions that do not care which one a message went to.
pub fn text(out: &Output) -> String {
    format!("{}{}", stdout(out), stderr(out))
}

/// Both streams, labelled, for failure messages.
fn shown(out: &Output) -> String {
    labelled(&out.stdout, &out.stderr)
}

fn labelled(stdout: &[u8], stderr: &[u8]) -> String {
    format!(
        "--- stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(stdout),
        String::from_utf8_lossy(stderr)
    )
}

/// What a [`Running`] process has written so far.
#[derive(Default)]
struct Captured {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// Streams that reached their end (0, 1 or 2).
    closed: usize,
}

/// The capture and the condition its readers signal after every line.
#[derive(Default)]
struct Shared {
    captured: Mutex<Captured>,
    changed: Condvar,
}

/// A process started with its stdout and stderr read line by line as they come, so a test
/// can wait for a line (the readiness signal) without the pipes ever filling up, and still
/// have all of the output at the end. Dropped while running, it is killed: a failing test
/// leaves no process behind.
pub struct Running {
    child: Child,
    shared: Arc<Shared>,
    readers: Vec<JoinHandle<()>>,
    reaped: bool,
}

impl Running {
    pub fn spawn(cmd: &mut Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let shared = Arc::new(Shared::default());
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let readers = vec![
            read_into(stdout, shared.clone(), |c| &mut c.stdout),
            read_into(stderr, shared.clone(), |c| &mut c.stderr),
        ];
        Running {
            child,
            shared,
            readers,
            reaped: false,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a line of stderr (where progress goes) that `found` accepts, and returns
    /// it. Fails the test with all of the output if the process closes stderr first, or
    /// after [`TIMEOUT`].
    pub fn wait_for_stderr(&self, what: &str, mut found: impl FnMut(&str) -> bool) -> String {
        let start = Instant::now();
        let mut checked = 0;
        let mut captured = self.shared.captured.lock().unwrap();
        loop {
            // Whole lines only, until the stream ends and its last line is whole too.
            let complete = if captured.closed == 2 {
                captured.stderr.len()
            } else {
                captured.stderr[checked..]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(checked, |i| checked + i + 1)
            };
            for line in String::from_utf8_lossy(&captured.stderr[checked..complete]).lines() {
                if found(line) {
                    return line.to_owned();
                }
            }
            checked = complete;
            let failure = if captured.closed == 2 {
                Some(format!("the process ended its output before {what}"))
            } else if start.elapsed() >= TIMEOUT {
                Some(format!("no {what} after {} s", TIMEOUT.as_secs()))
            } else {
                None
            };
            if let Some(failure) = failure {
                let shown = labelled(&captured.stdout, &captured.stderr);
                // Unlocked first, so the readers go on without a poisoned lock.
                drop(captured);
                panic!("{failure}:\n{shown}");
            }
            let left = TIMEOUT.saturating_sub(start.elapsed());
            captured = self.shared.changed.wait_timeout(captured, left).unwrap().0;
        }
    }

    /// Sends SIGINT, as a terminal's Ctrl-C would.
    #[cfg(unix)]
    pub fn interrupt(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid fits pid_t");
        // SAFETY: kill(2) on the pid of our own child, which is not reaped yet.
        let sent = unsafe { libc::kill(pid, libc::SIGINT) };
        assert_eq!(
            sent,
            0,
            "SIGINT to {pid}: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Kills the process (SIGKILL) and returns its status and what it wrote.
    pub fn kill(mut self) -> Output {
        self.child.kill().expect("the child can be killed");
        self.finish()
    }

    /// Waits for the process to end and returns its status and all of its output.
    pub fn wait(mut self) -> Output {
        self.finish()
    }

    fn finish(&mut self) -> Output {
        let status = self.child.wait().expect("waiting for the child");
        self.reaped = true;
        for reader in self.readers.drain(..) {
            reader.join().expect("an output reader does not panic");
        }
        let mut captured = self.shared.captured.lock().unwrap();
        Output {
            status,
            stdout: std::mem::take(&mut captured.stdout),
            stderr: std::mem::take(&mut captured.stderr),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A thread that appends each line of `stream` to the buffer `field` picks, waking waiters.
fn read_into(
    stream: impl Read + Send + 'static,
    shared: Arc<Shared>,
    field: fn(&mut Captured) -> &mut Vec<u8>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut stream = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = stream.read_until(b'\n', &mut line).unwrap_or(0);
            let mut captured = shared.captured.lock().unwrap();
            if n == 0 {
                captured.closed += 1;
            } else {
                field(&mut captured).extend_from_slice(&line);
            }
            drop(captured);
            shared.changed.notify_all();
            if n == 0 {
                return;
            }
        }
    })
}

/// The step of a plain progress line, `step S/T  ...`.
pub fn progress_step(line: &str) -> Option<u64> {
    line.strip_prefix("step ")?.split('/').next()?.parse().ok()
}

// ---------------------------------------------------------------------------------------
// Waiting on files

/// Polls `ready` every [`POLL`] until it gives a value, at most [`TIMEOUT`]; for signals no
/// one notifies (a file appearing, a log growing).
pub fn wait_for<T>(what: &str, ready: impl FnMut() -> Option<T>) -> T {
    poll(POLL, ready)
        .unwrap_or_else(|| panic!("timed out after {} s waiting for {what}", TIMEOUT.as_secs()))
}

/// Calls `ready` every `interval` until it gives a value, or `None` after [`TIMEOUT`]: for
/// waits that explain a timeout themselves, or whose check costs more than a look at a file.
pub fn poll<T>(interval: Duration, mut ready: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(value) = ready() {
            return Some(value);
        }
        if start.elapsed() >= TIMEOUT {
            return None;
        }
        std::thread::sleep(interval);
    }
}

/// [`wait_for`] a condition.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    wait_for(what, || done().then_some(()))
}

/// Waits until `path` exists; files and folders the binary writes whole (checkpoints,
/// stores) are renamed into place, so once there they are complete.
pub fn wait_for_path(path: &Path) {
    wait_until(&path.display().to_string(), || path.exists())
}

// ---------------------------------------------------------------------------------------
// Reading what runs wrote

/// What TensorBoard's own `EventAccumulator` reads from each of `paths` (a run folder or
/// one event file), through `scripts/read_events.py`, keyed by the path as given.
pub fn read_events(paths: &[&Path]) -> Value {
    let args: Vec<&OsStr> = paths.iter().map(|p| p.as_os_str()).collect();
    serde_json::from_str(&run_script("read_events.py", &args)).expect("read_events.py prints JSON")
}

/// The entry of `path` in [`read_events`]'s answer.
pub fn events_at<'a>(events: &'a Value, path: &Path) -> &'a Value {
    let entry = &events[path.to_str().expect("a UTF-8 path")];
    assert!(entry.is_object(), "no events read for {}", path.display());
    entry
}

/// `(step, value)` of a scalar tag in one path's events.
pub fn scalars(run: &Value, tag: &str) -> Vec<(u64, f64)> {
    run["scalars"][tag]
        .as_array()
        .unwrap_or_else(|| panic!("no scalar {tag} in {run}"))
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
        .collect()
}

/// The rows of a run's metrics.csv in one phase.
pub fn metrics(run: &Path, phase: Phase) -> Vec<MetricsRow> {
    read_rows(&run.join(METRICS_FILE))
        .unwrap_or_else(|e| panic!("{}: {e}", run.display()))
        .into_iter()
        .filter(|r| r.phase == phase)
        .collect()
}

/// The loss terms and validation scores of a run, without the wall-clock fields.
pub fn curves(run: &Path) -> Vec<(u64, Phase, [Option<f64>; 8])> {
    let values = |r: &MetricsRow| {
        [
            r.loss,
            r.elbo,
            r.kl,
            r.reconstruction,
            r.reg,
            r.grad_norm,
            r.ged,
            r.hm_iou,
        ]
    };
    let mut rows: Vec<_> = metrics(run, Phase::Train)
        .iter()
        .chain(&metrics(run, Phase::Val))
        .map(|r| (r.step, r.phase, values(r)))
        .collect();
    rows.sort_by_key(|r| (r.0, r.1 == Phase::Val));
    rows
}

/// The steps of a run's metrics.csv rows in one phase.
pub fn metric_steps(run: &Path, phase: Phase) -> Vec<u64> {
    metrics(run, phase).iter().map(|r| r.step).collect()
}

/// The single run folder under `dir/runs`.
pub fn only_run(dir: &Path) -> PathBuf {
    let mut runs: Vec<PathBuf> = std::fs::read_dir(dir.join("runs"))
        .unwrap_or_else(|e| panic!("{}/runs: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    runs.pop().unwrap()
}

/// A sweep's summary.csv as one map per row, by column name, in trial order.
pub fn sweep_summary(folder: &Path) -> Vec<BTreeMap<String, String>> {
    let path = folder.join("summary.csv");
    let reader =
        csv::Reader::from_path(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    csv_maps(reader)
}

/// Every row of a CSV with a header line, as a map by column name.
pub fn csv_maps<R: Read>(mut reader: csv::Reader<R>) -> Vec<BTreeMap<String, String>> {
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    reader
        .records()
        .map(|r| {
            header
                .iter()
                .cloned()
                .zip(r.unwrap().iter().map(String::from))
                .collect()
        })
        .collect()
}

/// The names in `dir`, hidden ones included, sorted; none where it does not exist.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir).map_or_else(
        |_| Vec::new(),
        |it| {
            it.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        },
    );
    names.sort();
    names
}

pub fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------
// Experiments

/// The text of a small, fast experiment: 32x32 synthetic images, a two-level model,
/// `steps` CPU steps validated every `val_every`; `log` adds keys to its `[log]` table.
pub fn tiny_spec(steps: u32, val_every: u32, log: &str) -> String {
    format!(
        r#"name = "tiny"
[data.synthetic]
items = 120
size = 32
seed = 1

[model]
filters = [8, 16]
beta = 1.0
reconstruction = "batch_mean"

[train]
batch = 8
steps = {steps}
lr = 1e-3
val_every = {val_every}
val_samples = 4
checkpoint_every = 10
keep_last = 2
device = "cpu"

[log]
every = 5
runs_dir = "runs"
{log}"#
    )
}

/// `--set` flags that make a run train until it is stopped: no end in sight, and no
/// checkpoint or validation on the way, for tests that interrupt it.
pub const UNTIL_STOPPED: [&str; 6] = [
    "--set",
    "train.steps=100000",
    "--set",
    "train.checkpoint_every=0",
    "--set",
    "train.val_every=0",
];

/// Trains [`write_spec`]'s experiment for 10 steps in `dir` and returns its run folder.
pub fn trained_run(dir: &Path) -> PathBuf {
    let spec = write_spec(dir, "");
    run_ok(
        dir,
        &["train", spec.to_str().unwrap(), "--set", "train.steps=10"],
    );
    only_run(dir)
}

/// Writes [`tiny_spec`] (60 steps) as `tiny.toml` in `dir`; `extra` goes into `[log]`.
pub fn write_spec(dir: &Path, extra: &str) -> PathBuf {
    let spec = tiny_spec(60, 20, extra);
    let path = dir.join("tiny.toml");
    std::fs::write(&path, spec).unwrap();
    path
}

// ---------------------------------------------------------------------------------------
// Tools from Debian's packages

pub fn on_path(binary: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| dir.join(binary).is_file())
}

/// A line straight to the process's stderr, past the test harness's capture, so that it
/// shows in every log, passing or not: how long packages took, or why a test skipped.
pub fn loud(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Installs `packages` with apt-get when one of `binaries` is missing from PATH (CI runs
/// the suite as root on a fresh Debian machine); `Err` says why that cannot be done.
pub fn ensure_packages(packages: &[&str], binaries: &[&str]) -> Result<(), String> {
    if binaries.iter().all(|b| on_path(b)) {
        return Ok(());
    }
    if !on_path("apt-get") {
        return Err(format!(
            "{binaries:?} are missing and there is no apt-get here"
        ));
    }
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "-q"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
    };
    let start = Instant::now();
    let mut out = install().map_err(|e| format!("apt-get did not run: {e}"))?;
    if !out.status.success() {
        let update = Command::new("apt-get")
            .args(["update", "-q"])
            .output()
            .map_err(|e| format!("apt-get update did not run: {e}"))?;
        if !update.status.success() {
            return Err(format!("apt-get update failed:\n{}", text(&update)));
        }
        out = install().map_err(|e| format!("apt-get did not run: {e}"))?;
    }
    if !out.status.success() {
        let all = text(&out);
        let tail: Vec<&str> = all.lines().rev().take(15).collect();
        return Err(format!(
            "apt-get install failed:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    loud(&format!(
        "installed {} with apt-get in {:.1} s",
        packages.join(", "),
        start.elapsed().as_secs_f64()
    ));
    match binaries.iter().find(|b| !on_path(b)) {
        Some(missing) => Err(format!("{missing} is still missing after installing")),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------
// Inputs a test writes, and comparisons with references

/// Writes a PNG (its folder made first) of `width x height` pixels of `color` at `depth`.
pub fn write_png(
    path: &Path,
    width: u32,
    height: u32,
    color: png::ColorType,
    depth: png::BitDepth,
    data: &[u8],
) {
    std::fs::create_dir_all(path.parent().expect("a file in a folder")).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    encoder.set_color(color);
    encoder.set_depth(depth);
    let mut writer = encoder.write_header().unwrap();
    writer.write_image_data(data).unwrap();
    writer.finish().unwrap();
}

/// Largest absolute difference, relative to the reference's largest magnitude.
pub fn relative_error(ours: &tch::Tensor, reference: &tch::Tensor) -> f64 {
    let ours = ours.to_kind(tch::Kind::Double).reshape([-1]);
    let reference = reference.reshape([-1]);
    let scale = reference.abs().max().double_value(&[]).max(1e-12);
    (ours - &reference).abs().max().double_value(&[]) / scale
}

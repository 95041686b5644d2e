//! The layer around the model as a user meets it: one sampling path for validation and
//! eval, training events as JSON lines, run folders that work from any working folder,
//! one process per run, and runs killed inside a checkpoint that resume to the curves of
//! an uninterrupted run (metrics.csv and TensorBoard read with its own reader).
mod common;

use common::{
    events_at, metrics, only_run, probunet, read_events, read_json, run_err, run_ok, scalars,
    stderr, stdout, Running,
};
use probunet::run::Phase;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The events of a `--events FILE`, one JSON object per line.
fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")))
        .collect()
}

#[test]
fn validation_and_eval_draw_the_same_samples_and_score_the_same_ged() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(dir.path(), "");
    let events = dir.path().join("events.jsonl");
    let spec_arg = spec.to_str().unwrap();
    let events_arg = events.to_str().unwrap();
    run_ok(
        dir.path(),
        &[
            "train",
            spec_arg,
            "--set",
            "train.steps=20",
            "--set",
            "train.seed=7",
            "--events",
            events_arg,
        ],
    );
    let events = json_lines(&events);
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    // A store generated for the run is told first; then training starts.
    let started = kinds.iter().position(|k| *k == "started").unwrap();
    assert!(
        kinds[..started].iter().all(|k| *k == "store_prepared"),
        "{kinds:?}"
    );
    assert_eq!(kinds.last(), Some(&"finished"), "{kinds:?}");
    let steps: Vec<u64> = events
        .iter()
        .filter(|e| e["event"] == "step")
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        steps,
        (1..=20).collect::<Vec<_>>(),
        "one event per step, in order"
    );
    let validations: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "validation")
        .collect();
    let steps: Vec<&Value> = validations.iter().map(|v| &v["step"]).collect();
    assert_eq!(steps, [0, 20], "the untrained model, then the last step");
    let validation = validations[1];
    let val_ged = validation["ged"].as_f64().unwrap();
    assert!(val_ged.is_finite(), "{validation}");

    // The same checkpoint, split, seed and sample count, another batch size.
    let run = only_run(dir.path());
    let csv_ged = metrics(&run, Phase::Val)[1].ged.unwrap();
    assert_eq!(csv_ged, val_ged);
    run_ok(
        dir.path(),
        &[
            "eval",
            run.to_str().unwrap(),
            "--split",
            "val",
            "--samples",
            "4",
            "--seed",
            "7",
            "--checkpoint",
            "last",
            "--batch",
            "3",
            "--device",
            "cpu",
            "--bootstrap",
            "40",
        ],
    );
    let report = read_json(&run.join("eval/val-4.json"));
    let eval_ged = report["metrics"]["phiseg"]["ged"]["mean"].as_f64().unwrap();
    assert!(
        (eval_ged - val_ged).abs() < 1e-9,
        "validation GED {val_ged}, eval GED {eval_ged}"
    );
}

#[test]
fn a_run_is_evaluated_and_resumed_from_another_working_folder() {
    let here = tempfile::tempdir().unwrap();
    let run = common::trained_run(here.path());
    let elsewhere = tempfile::tempdir().unwrap();
    let run_arg = run.to_str().unwrap();
    run_ok(
        elsewhere.path(),
        &[
            "eval",
            run_arg,
            "--samples",
            "2",
            "--device",
            "cpu",
            "--bootstrap",
            "40",
        ],
    );
    let out = run_ok(elsewhere.path(), &["train", "--resume", run_arg]);
    assert!(stdout(&out).contains("resuming"), "{}", stdout(&out));
    // The store the run recorded was read; nothing was built in the other folder.
    assert!(!elsewhere.path().join("data").exists());
    let report = read_json(&run.join("eval/test-2.json"));
    let store = PathBuf::from(report["store"]["path"].as_str().unwrap());
    assert!(
        store.is_absolute() && store.starts_with(here.path().canonicalize().unwrap()),
        "{store:?}"
    );
}

/// A resume may train longer or otherwise, and the run's spec.toml then says so (which
/// `runs` and the next resume read); what would make the checkpoint mean something else is
/// refused, and the spec stays as it was.
#[test]
fn a_resume_records_what_it_changes_and_refuses_what_it_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let run = common::trained_run(dir.path());
    let run_arg = run.to_str().unwrap();
    let spec_path = run.join("spec.toml");
    let before = std::fs::read_to_string(&spec_path).unwrap();

    let err = stderr(&run_err(
        dir.path(),
        &["train", "--resume", run_arg, "--set", "model.latent_dim=3"],
    ));
    assert!(
        err.contains("model.latent_dim: cannot change when a run resumes")
            && err.contains("the run has 2, --set model.latent_dim=3 asks for 3"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&spec_path).unwrap(), before);

    // A write killed before its rename left its temporary; the resume removes it.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let leftover = run.join(format!("meta.tmp-{}", child.id()));
    child.wait().unwrap();
    std::fs::write(&leftover, "{").unwrap();
    let out = stdout(&run_ok(
        dir.path(),
        &["train", "--resume", run_arg, "--set", "train.steps=15"],
    ));
    assert!(!leftover.exists());
    assert!(
        out.contains("train.steps = 15 (was 10; --set train.steps=15)"),
        "{out}"
    );
    assert!(out.contains("trained 15 steps"), "{out}");
    let after = std::fs::read_to_string(&spec_path).unwrap();
    assert!(
        after.contains("steps = 15  # --set train.steps=15 (from the resume at step 10)"),
        "{after}"
    );
    // What the resume left alone keeps the origin the first run recorded.
    let line = |text: &str, key: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .map(String::from)
    };
    assert_eq!(line(&after, "lr"), line(&before, "lr"));
    let csv = stdout(&run_ok(dir.path(), &["runs", "--csv"]));
    let rows = common::csv_maps(csv::Reader::from_reader(csv.as_bytes()));
    let steps = |row: &std::collections::BTreeMap<String, String>| {
        (row["steps"].clone(), row["total_steps"].clone())
    };
    assert_eq!(steps(&rows[0]), ("15".into(), "15".into()), "{csv}");
}

#[cfg(unix)]
#[test]
fn two_processes_never_train_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let run = common::trained_run(dir.path());
    let mut args = vec!["train", "--resume", run.to_str().unwrap()];
    args.extend(common::UNTIL_STOPPED);
    let first = Running::spawn(&mut probunet(dir.path(), &args));
    first.wait_for_stderr("progress after the resume", |line| {
        common::progress_step(line).is_some_and(|step| step > 10)
    });
    let second = run_err(dir.path(), &args);
    assert!(
        stderr(&second).contains("is in use by another probunet process"),
        "{}",
        stderr(&second)
    );
    first.interrupt();
    let first = first.wait();
    assert_eq!(first.status.code(), Some(130), "{}", common::text(&first));
}

#[test]
fn prepare_never_replaces_a_folder_or_file_it_did_not_make() {
    let dir = tempfile::tempdir().unwrap();
    let project = dir.path().join("project");
    std::fs::create_dir(&project).unwrap();
    std::fs::write(project.join("notes.txt"), "mine").unwrap();
    let file = dir.path().join("data.bin");
    std::fs::write(&file, "mine too").unwrap();
    let refusals = [
        (&project, "is not a probunet store (it holds notes.txt)"),
        (&file, "is not a folder"),
    ];
    for (out, why) in refusals {
        let args = [
            "prepare",
            "--synthetic",
            "--items",
            "20",
            "--size",
            "16",
            "--force",
            "--out",
            out.to_str().unwrap(),
        ];
        let err = run_err(dir.path(), &args);
        assert!(stderr(&err).contains(why), "{}", stderr(&err));
    }
    assert_eq!(
        std::fs::read_to_string(project.join("notes.txt")).unwrap(),
        "mine"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine too");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "{leftovers:?}");
}

/// The TensorBoard curves of a run as TensorBoard's own reader sees them.
fn tensorboard_curves(run: &Path) -> Vec<Vec<(u64, f64)>> {
    let all = read_events(&[run]);
    let events = events_at(&all, run);
    ["train/loss", "train/kl", "val/ged", "val/elbo"]
        .iter()
        .map(|tag| scalars(events, tag))
        .collect()
}

/// `probunet ARGS` in `dir` under strace, tracing the calls `trace` names (`rename`,
/// `rename,fsync`) into `dir/renames.txt`, file descriptors with their paths, and, with
/// `inject`, acting on one of them.
#[cfg(target_os = "linux")]
fn under_strace(
    strace: &Path,
    dir: &Path,
    trace: &str,
    inject: Option<String>,
    args: &[&str],
) -> std::process::Output {
    let mut cmd = std::process::Command::new(strace);
    cmd.current_dir(dir).env("OMP_NUM_THREADS", "1").args([
        "-f",
        "-qq",
        "-y",
        "-o",
        "renames.txt",
        "-e",
        &format!("trace={trace}"),
    ]);
    if let Some(inject) = inject {
        cmd.args(["-e", &inject]);
    }
    cmd.arg(env!("CARGO_BIN_EXE_probunet")).args(args);
    common::output(&mut cmd)
}

/// SIGKILL inside a checkpoint's rename: the logs were flushed past the last whole
/// checkpoint, checkpoints fall inside log intervals (every 7 steps, logs every 5), and
/// the resumed run must still log exactly what an uninterrupted one does.
#[cfg(target_os = "linux")]
#[test]
fn a_run_killed_inside_any_checkpoint_resumes_to_the_uninterrupted_curves() {
    if let Err(why) = common::ensure_packages(&["strace"], &["strace"]) {
        common::loud(&format!(
            "SKIPPED: no strace to kill the run inside a rename: {why}"
        ));
        return;
    }
    let strace = Path::new("strace");
    let reference = tempfile::tempdir().unwrap();
    let spec = common::write_spec(reference.path(), "");
    let args = [
        "train",
        spec.to_str().unwrap(),
        "--set",
        "train.checkpoint_every=7",
    ];
    let done = under_strace(strace, reference.path(), "rename", None, &args);
    assert!(done.status.success(), "{}", common::text(&done));
    let expected = only_run(reference.path());
    // Which rename, counting from the process's first (the store's, the spec's...),
    // puts each checkpoint into place; a fresh folder renames the same files.
    let renames = std::fs::read_to_string(reference.path().join("renames.txt")).unwrap();
    let renames: Vec<&str> = renames.lines().filter(|l| l.contains("rename(")).collect();
    let nth = |target: &str| {
        let found = renames
            .iter()
            .position(|l| l.contains(&format!("{target}\")")));
        1 + found.unwrap_or_else(|| panic!("no rename to {target}: {renames:#?}"))
    };
    // Each step checkpoint's rename into place: the kill leaves its hidden partial. (The
    // tiny run's val GED never improves, so `best` is written once and never swapped;
    // run::checkpoint's unit tests kill that swap at each of its steps.)
    for step in [14, 21, 35] {
        let place = format!("step {step}");
        let nth = nth(&format!("step-{step:08}"));
        let left = format!(".step-{step:08}.partial");
        let dir = tempfile::tempdir().unwrap();
        let spec = common::write_spec(dir.path(), "");
        let args = [
            "train",
            spec.to_str().unwrap(),
            "--set",
            "train.checkpoint_every=7",
        ];
        let inject = format!("inject=rename:signal=SIGKILL:when={nth}");
        let killed = under_strace(strace, dir.path(), "rename", Some(inject), &args);
        assert!(
            !killed.status.success(),
            "{place}: {}",
            common::text(&killed)
        );
        let run = only_run(dir.path());
        let checkpoints = run.join("checkpoints");
        assert!(checkpoints.join(&left).exists(), "not killed at {place}");
        run_ok(dir.path(), &["train", "--resume", run.to_str().unwrap()]);
        assert_eq!(
            common::curves(&run),
            common::curves(&expected),
            "killed at {place}"
        );
        assert_eq!(
            tensorboard_curves(&run),
            tensorboard_curves(&expected),
            "killed at {place}"
        );
        let mut hidden = common::entries(&checkpoints);
        hidden.retain(|n| n.starts_with('.'));
        assert!(hidden.is_empty(), "{place}: left {hidden:?}");
        assert!(checkpoints.join("best").is_dir(), "{place}: no best");
    }
}

/// Every rename of a run (and of the store it prepares) is durable: the file or folder
/// renamed was synced before, and the folder it lands in after, so a power cut cannot
/// bring back an empty spec.toml or manifest.json behind a complete checkpoint.
#[cfg(target_os = "linux")]
#[test]
fn every_rename_is_synced_before_and_its_folder_after() {
    if let Err(why) = common::ensure_packages(&["strace"], &["strace"]) {
        common::loud(&format!("SKIPPED: no strace to watch the renames: {why}"));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(dir.path(), "");
    let args = ["train", spec.to_str().unwrap()];
    let done = under_strace(Path::new("strace"), dir.path(), "rename,fsync", None, &args);
    assert!(done.status.success(), "{}", common::text(&done));
    let trace = std::fs::read_to_string(dir.path().join("renames.txt")).unwrap();
    let lines: Vec<&str> = trace.lines().collect();
    // `fsync(5</abs/path>) = 0`: the path an fsync synced.
    let synced = |line: &str| {
        let (_, rest) = line.split_once("fsync(")?;
        let (_, rest) = rest.split_once('<')?;
        rest.split_once(">)").map(|(path, _)| PathBuf::from(path))
    };
    let absolute = |path: &str| dir.path().join(path);
    let mut renames = 0;
    for (i, line) in lines.iter().enumerate() {
        let Some((_, args)) = line.split_once("rename(\"") else {
            continue;
        };
        let mut quoted = args.split('"');
        let (from, to) = (quoted.next().unwrap(), quoted.nth(1).unwrap());
        if from.contains(".old") || to.contains(".old") {
            continue; // moving an old copy aside needs no sync of its own
        }
        let (from, to) = (absolute(from), absolute(to));
        let before = lines[..i].iter().filter_map(|l| synced(l));
        let synced_before = before
            .into_iter()
            .any(|p| p == from || p.parent() == Some(&from));
        assert!(
            synced_before,
            "{} renamed unsynced:\n{trace}",
            from.display()
        );
        let folder = to.parent().unwrap();
        let after = lines[i..].iter().filter_map(|l| synced(l));
        assert!(
            after.into_iter().any(|p| p == folder),
            "{} not synced after the rename to {}:\n{trace}",
            folder.display(),
            to.display()
        );
        renames += 1;
    }
    assert!(renames >= 5, "only {renames} renames traced:\n{trace}");
}

/// Sends `signal` to a running process.
#[cfg(unix)]
fn send(child: &Running, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on the pid of our own child, which is not reaped yet.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

/// SIGTERM, how Slurm and Kubernetes stop a job, is a Ctrl-C: the step finishes and a
/// checkpoint is written. Two stop requests in a row end the process at once, as an
/// unhandled Ctrl-C would, and never crash it (exiting from the signal thread while a
/// oneDNN convolution ran gave SIGSEGV in 3 of 8 tries).
#[cfg(unix)]
#[test]
fn sigterm_checkpoints_like_ctrl_c_and_a_second_stop_never_crashes() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(dir.path(), "");
    let mut args = vec!["train", spec.to_str().unwrap()];
    args.extend(common::UNTIL_STOPPED);
    let started = |child: &Running| {
        child.wait_for_stderr("training under way", |line| {
            common::progress_step(line).is_some()
        });
    };
    let child = Running::spawn(&mut probunet(dir.path(), &args));
    started(&child);
    send(&child, libc::SIGTERM);
    let out = child.wait();
    assert_eq!(out.status.code(), Some(130), "{}", common::text(&out));
    assert!(
        stderr(&out).contains("probunet train --resume"),
        "{}",
        stderr(&out)
    );
    let run = only_run(dir.path());
    assert!(run.join("checkpoints").read_dir().unwrap().count() > 0);
    std::fs::remove_dir_all(dir.path().join("runs")).unwrap();
    for attempt in 0..5 {
        let child = Running::spawn(&mut probunet(dir.path(), &args));
        started(&child);
        send(&child, libc::SIGINT);
        send(&child, libc::SIGINT);
        let out = child.wait();
        let how = (out.status.code(), out.status.signal());
        assert!(
            matches!(how, (Some(130), None) | (None, Some(libc::SIGINT))),
            "attempt {attempt}: {:?}\n{}",
            out.status,
            common::text(&out)
        );
    }
}

/// Runs `script` with `sh` as root of new user and mount namespaces, where it may mount a
/// small tmpfs without privileges; `None` (after a banner) where the machine forbids it.
#[cfg(target_os = "linux")]
fn with_own_mounts(dir: &Path, script: &str) -> Option<std::process::Output> {
    let allowed = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !allowed {
        common::loud("SKIPPED: unshare cannot make a mount namespace here, so no small tmpfs");
        return None;
    }
    let out = common::output(
        std::process::Command::new("unshare")
            .args(["--user", "--map-root-user", "--mount", "sh", "-c", script])
            .current_dir(dir)
            .env("PROBUNET", env!("CARGO_BIN_EXE_probunet"))
            .env("OMP_NUM_THREADS", "1"),
    );
    assert!(out.status.success(), "{}", common::text(&out));
    Some(out)
}

/// What one command of [`with_own_mounts`]'s script printed, and its exit status.
fn logged(dir: &Path, name: &str) -> (String, i32) {
    let text = std::fs::read_to_string(dir.join(format!("{name}.txt"))).unwrap();
    let rc = std::fs::read_to_string(dir.join(format!("{name}.rc"))).unwrap();
    (text, rc.trim().parse().unwrap())
}

/// A disk that fills up stops training with the I/O error said once and plainly; once
/// there is room again, `--resume` ends with exactly the curves of a run that never
/// stopped. eval on a full disk fails the same way and leaves no empty or partial file.
/// The sizes make the disk fill inside the `best` checkpoint at step 20 and inside
/// `step-30`.
#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_stops_cleanly_and_the_run_resumes_to_the_uninterrupted_curves() {
    let reference = tempfile::tempdir().unwrap();
    let spec = common::write_spec(reference.path(), "");
    run_ok(reference.path(), &["train", spec.to_str().unwrap()]);
    let expected = only_run(reference.path());
    for size in ["460k", "980k"] {
        let dir = tempfile::tempdir().unwrap();
        common::write_spec(dir.path(), "");
        std::fs::create_dir(dir.path().join("full")).unwrap();
        std::fs::create_dir(dir.path().join("saved")).unwrap();
        let script = format!(
            r#"set -u
mount -t tmpfs -o size={size} tmpfs full || exit 90
"$PROBUNET" train tiny.toml --set log.runs_dir=full > train.txt 2>&1; echo $? > train.rc
mount -o remount,size=64m full || exit 91
"$PROBUNET" train --resume full/tiny-* > resume.txt 2>&1; echo $? > resume.rc
dd if=/dev/zero of=full/filler bs=4k 2>/dev/null
"$PROBUNET" eval full/tiny-* --samples 4 --bootstrap 40 > eval.txt 2>&1; echo $? > eval.rc
rm full/filler
cp -a full/. saved/"#
        );
        let Some(_) = with_own_mounts(dir.path(), &script) else {
            return;
        };
        let (train, rc) = logged(dir.path(), "train");
        assert_eq!(rc, 1, "{size}: {train}");
        let error = train.lines().last().unwrap();
        assert!(error.starts_with("error: checkpoint "), "{size}: {train}");
        assert!(
            error.ends_with(": No space left on device (os error 28)"),
            "{size}: {train}"
        );
        assert_eq!(error.matches("No space").count(), 1, "{error}");
        let (resume, rc) = logged(dir.path(), "resume");
        assert_eq!(rc, 0, "{size}: {resume}");
        let saved: Vec<PathBuf> = std::fs::read_dir(dir.path().join("saved"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        let [run] = &saved[..] else {
            panic!("not one run on the disk: {saved:?}")
        };
        assert_eq!(
            common::curves(run),
            common::curves(&expected),
            "disk of {size}"
        );
        assert_eq!(
            tensorboard_curves(run),
            tensorboard_curves(&expected),
            "disk of {size}"
        );
        let (eval, rc) = logged(dir.path(), "eval");
        assert_eq!(rc, 1, "{eval}");
        assert!(
            eval.contains("No space left on device (os error 28)"),
            "{eval}"
        );
        assert!(!eval.contains("panicked"), "{eval}");
        assert!(run.join("eval").is_dir());
        let left = common::entries(&run.join("eval"));
        assert!(left.is_empty(), "eval on a full disk left {left:?}");
    }
}

/// A run whose prepared store was moved says so and how to go on: `--store` names the copy.
#[test]
fn eval_of_a_run_whose_store_moved_points_at_store() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(dir.path(), "");
    run_ok(
        dir.path(),
        &[
            "prepare",
            "--synthetic",
            "--items",
            "60",
            "--size",
            "32",
            "--out",
            "st",
        ],
    );
    run_ok(
        dir.path(),
        &[
            "train",
            spec.to_str().unwrap(),
            "--set",
            "data.store=\"st\"",
            "--set",
            "train.steps=10",
        ],
    );
    let run = only_run(dir.path());
    std::fs::rename(dir.path().join("st"), dir.path().join("moved")).unwrap();
    let run_arg = run.to_str().unwrap();
    let err = stderr(&run_err(dir.path(), &["eval", run_arg]));
    assert!(err.contains("the run's store "), "{err}");
    assert!(err.contains("no prepared store here"), "{err}");
    assert!(
        err.ends_with("or evaluate on a copy of it with --store DIR\n"),
        "{err}"
    );
    run_ok(
        dir.path(),
        &["eval", run_arg, "--store", "moved", "--samples", "2"],
    );
}

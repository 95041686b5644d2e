//! `probunet train` as a user runs it: specs, run folders, TensorBoard, checkpoints,
//! resume after SIGKILL, Ctrl-C, non-finite losses and determinism.
mod common;

use common::{metrics, only_run, probunet, run_err, run_ok, scalars, stderr, stdout, Running};
use probunet::run::Phase;

/// A store prepared without a val split says so, and a run on it trains without
/// validating instead of logging NaN GEDs.
#[test]
fn an_empty_val_split_is_said_and_training_goes_on_without_validation() {
    let dir = tempfile::tempdir().unwrap();
    let prepared = stdout(&run_ok(
        dir.path(),
        &[
            "prepare",
            "--synthetic",
            "--items",
            "24",
            "--size",
            "32",
            "--out",
            "data/noval",
            "--split",
            "90,0,10",
        ],
    ));
    assert!(
        prepared.contains("note: the val split is empty: training on this store cannot validate"),
        "{prepared}"
    );
    assert!(!prepared.contains("the test split is empty"), "{prepared}");
    let spec = common::tiny_spec(4, 2, "").replace(
        "[data.synthetic]\nitems = 120\nsize = 32\nseed = 1\n",
        "[data]\nstore = \"data/noval\"\n",
    );
    assert!(spec.contains("data/noval"), "{spec}");
    std::fs::write(dir.path().join("noval.toml"), spec).unwrap();
    let out = stdout(&run_ok(dir.path(), &["train", "noval.toml"]));
    assert!(
        out.contains("note: the store's val split is empty, so this run does not validate"),
        "{out}"
    );
    assert!(!out.lines().any(|l| l.starts_with("val GED")), "{out}");
    let run = only_run(dir.path());
    assert!(metrics(&run, Phase::Val).is_empty());
    assert_eq!(metrics(&run, Phase::Train).last().unwrap().step, 4);
}

#[test]
fn a_run_logs_every_tag_and_checkpoints_as_configured() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(dir.path(), "");
    let out = run_ok(dir.path(), &["train", spec.to_str().unwrap()]);
    let stdout = stdout(&out);
    let run = only_run(dir.path());
    assert!(
        stdout.contains(&format!(
            "tensorboard --logdir {}",
            run.strip_prefix(dir.path()).unwrap().display()
        )),
        "{stdout}"
    );
    assert!(stdout.contains("ideal-model reference"), "{stdout}");
    // Plain progress lines, since stderr is not a terminal here.
    assert!(stderr(&out).contains("step 60/60"), "{}", stderr(&out));

    let spec_toml = std::fs::read_to_string(run.join("spec.toml")).unwrap();
    assert!(
        spec_toml.contains("batch = 8") && spec_toml.contains("tiny.toml"),
        "{spec_toml}"
    );
    let meta = common::read_json(&run.join("meta.json"));
    assert_eq!(meta["probunet_version"], env!("CARGO_PKG_VERSION"));

    let train_steps = common::metric_steps(&run, Phase::Train);
    assert_eq!(train_steps, (1..=12).map(|i| i * 5).collect::<Vec<_>>());
    let val_steps = common::metric_steps(&run, Phase::Val);
    assert_eq!(
        val_steps,
        [0, 20, 40, 60],
        "the untrained model is scored too"
    );

    let all = common::read_events(&[&run]);
    let events = common::events_at(&all, &run);
    for tag in [
        "train/loss",
        "train/elbo",
        "train/kl",
        "train/reconstruction",
        "train/reg",
        "train/grad_norm",
        "perf/images_per_sec",
    ] {
        let steps: Vec<u64> = scalars(events, tag).iter().map(|p| p.0).collect();
        assert_eq!(steps, train_steps, "{tag}");
    }
    for tag in [
        "val/elbo",
        "val/kl",
        "val/ged",
        "val/hm_iou",
        "val/ged_ideal",
    ] {
        let steps: Vec<u64> = scalars(events, tag).iter().map(|p| p.0).collect();
        assert_eq!(steps, val_steps, "{tag}");
    }
    // Constants are in the spec text and HParams, not charts of their own.
    for tag in ["train/learning_rate", "beta", "learning_rate", "train/beta"] {
        assert!(events["scalars"][tag].is_null(), "{tag} charted");
    }
    let ideal = scalars(events, "val/ged_ideal");
    assert!(ideal.windows(2).all(|w| w[0].1 == w[1].1), "{ideal:?}");
    // The CSV and TensorBoard hold the same numbers.
    let csv_loss: Vec<f64> = metrics(&run, Phase::Train)
        .iter()
        .map(|r| r.loss.unwrap())
        .collect();
    let tb_loss: Vec<f64> = scalars(events, "train/loss").iter().map(|p| p.1).collect();
    for (a, b) in csv_loss.iter().zip(&tb_loss) {
        assert!((a - b).abs() <= 1e-3 * a.abs().max(1.0), "{a} vs {b}");
    }
    // Best and final val GED for HParams: the best skips step 0 and never rises.
    let vals = metrics(&run, Phase::Val);
    let final_ged = scalars(events, "hparams/final_val_ged");
    assert_eq!(final_ged.last().unwrap().0, 60);
    assert!((final_ged.last().unwrap().1 - vals.last().unwrap().ged.unwrap()).abs() < 1e-5);
    let best = scalars(events, "hparams/best_val_ged");
    assert_eq!(best[0].0, 20, "{best:?}");
    assert!(best.windows(2).all(|w| w[1].1 < w[0].1), "{best:?}");
    let lowest = vals[1..]
        .iter()
        .map(|r| r.ged.unwrap())
        .fold(f64::INFINITY, f64::min);
    assert!(
        (best.last().unwrap().1 - lowest).abs() < 1e-5,
        "{best:?} vs {lowest}"
    );
    // Every run is an HParams session, with the standard hyperparameters.
    let start = &events["hparams"]["_hparams_/session_start_info"]["hparams"];
    assert_eq!(start["model.beta"].as_f64(), Some(1.0), "{start}");
    assert_eq!(start["train.batch"].as_f64(), Some(8.0), "{start}");
    let name = run.file_name().unwrap().to_str().unwrap();
    assert_eq!(
        start["run"].as_str(),
        Some(name),
        "the full run name: {start}"
    );
    assert_eq!(
        events["hparams"]["_hparams_/session_end_info"]["status"],
        "STATUS_SUCCESS"
    );
    // The spec as text, and val GED beside the ideal in the custom-scalars layout.
    let spec = events["text"]["run/spec"][0][1].as_str().unwrap();
    assert!(
        spec.starts_with("```toml") && spec.contains("batch = 8"),
        "{spec}"
    );
    let charts = &events["layout"]["category"][0]["chart"][0];
    assert_eq!(
        charts["multiline"]["tag"],
        serde_json::json!(["^val/ged$", "^val/ged_ideal$"])
    );

    let grid = &events["images"]["val/samples"][0];
    // 4 rows of 32 px crops drawn at 128 px under a caption line, below the headers.
    assert_eq!(
        grid["height"].as_u64().unwrap(),
        12 + 22 + 4 * (22 + 128) + 3 * 4 + 12
    );
    // Input, 4 annotations, 6 samples and the mean, with gaps, and a colour bar.
    assert!(grid["width"].as_u64().unwrap() > 12 * 128 + 3 * 20 + 8 * 4);
    assert!(
        run.join("curves.png").is_file(),
        "the training-curve picture"
    );

    let ckpts: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut ckpts = ckpts;
    ckpts.sort();
    assert_eq!(
        ckpts,
        ["best", "step-00000050", "step-00000060"],
        "keep_last = 2 plus best"
    );
}

/// `--events FILE` appends: what the file held stays, and a resumed run's events follow
/// the first run's.
#[test]
fn events_are_appended_to_the_file_never_replacing_it() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(dir.path(), "");
    let events = dir.path().join("events.jsonl");
    std::fs::write(&events, "my notes\n").unwrap();
    let args = [
        "train",
        spec.to_str().unwrap(),
        "--set",
        "train.steps=2",
        "--events",
        events.to_str().unwrap(),
    ];
    run_ok(dir.path(), &args);
    let text = std::fs::read_to_string(&events).unwrap();
    assert!(text.starts_with("my notes\n{"), "{text}");
    let finished = text.lines().filter(|l| l.contains(r#""event":"finished""#));
    assert_eq!(finished.count(), 1, "{text}");
}

#[test]
fn the_same_spec_and_seed_give_the_same_loss_curve() {
    let curves: Vec<Vec<f64>> = (0..2)
        .map(|_| {
            let dir = tempfile::tempdir().unwrap();
            let spec = common::write_spec(dir.path(), "");
            run_ok(
                dir.path(),
                &["train", spec.to_str().unwrap(), "--set", "train.steps=30"],
            );
            metrics(&only_run(dir.path()), Phase::Train)
                .iter()
                .map(|r| r.loss.unwrap())
                .collect()
        })
        .collect();
    assert_eq!(curves[0].len(), 6);
    assert_eq!(curves[0], curves[1]);
}

#[test]
fn sigkill_then_resume_loses_and_repeats_no_step() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(dir.path(), "");
    // The reference: the same run, uninterrupted.
    let reference = tempfile::tempdir().unwrap();
    let ref_spec = common::write_spec(reference.path(), "");
    run_ok(reference.path(), &["train", ref_spec.to_str().unwrap()]);
    let expected = metrics(&only_run(reference.path()), Phase::Train);

    let child = Running::spawn(&mut probunet(
        dir.path(),
        &["train", spec.to_str().unwrap()],
    ));
    let runs = dir.path().join("runs");
    let run = common::wait_for("the run folder", || {
        Some(std::fs::read_dir(&runs).ok()?.next()?.ok()?.path())
    });
    // Checkpoints are renamed into place whole: once the folder is there, it is complete.
    common::wait_for_path(&run.join("checkpoints/step-00000030"));
    let killed = child.kill();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&killed.status),
        Some(libc::SIGKILL),
        "the run ended before it was killed:\n{}",
        common::text(&killed)
    );
    // A kill after the logs were flushed past the last whole checkpoint (inside the next
    // one's renames) is tests/run_layer.rs's strace test.

    let out = run_ok(dir.path(), &["train", "--resume", run.to_str().unwrap()]);
    assert!(stdout(&out).contains("resuming"), "{}", stdout(&out));
    let got = metrics(&run, Phase::Train);
    let steps: Vec<u64> = got.iter().map(|r| r.step).collect();
    assert_eq!(
        steps,
        (1..=12).map(|i| i * 5).collect::<Vec<_>>(),
        "every logged step once"
    );
    for (a, b) in got.iter().zip(&expected) {
        assert_eq!(
            a.loss, b.loss,
            "step {}: resumed run differs from the uninterrupted one",
            a.step
        );
    }
    let val = common::metric_steps(&run, Phase::Val);
    assert_eq!(val, [0, 20, 40, 60]);
    let all = common::read_events(&[&run]);
    let events = common::events_at(&all, &run);
    for tag in ["train/loss", "val/ged"] {
        let steps: Vec<u64> = scalars(events, tag).iter().map(|p| p.0).collect();
        let mut unique = steps.clone();
        unique.dedup();
        assert_eq!(steps, unique, "{tag} has a step twice in TensorBoard");
    }
    assert_eq!(scalars(events, "train/loss").len(), 12);
}

#[cfg(unix)]
#[test]
fn ctrl_c_checkpoints_and_says_how_to_resume() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(dir.path(), "");
    let mut args = vec!["train", spec.to_str().unwrap()];
    args.extend(common::UNTIL_STOPPED);
    let child = Running::spawn(&mut probunet(dir.path(), &args));
    // A progress line at step 10 says training is under way, with Ctrl-C's handler in place.
    let line = child.wait_for_stderr("progress at step 10", |line| {
        common::progress_step(line).is_some_and(|step| step >= 10)
    });
    let seen = common::progress_step(&line).unwrap();
    child.interrupt();
    let out = child.wait();
    let stderr = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("probunet train --resume"), "{stderr}");
    // A stop asked for is not an error.
    assert!(!stderr.contains("error:"), "{stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("interrupted at step ")),
        "{stderr}"
    );
    let run = only_run(dir.path());
    let ckpts: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(ckpts.len(), 1, "one checkpoint, at the interrupted step");
    let step: u64 = ckpts[0]
        .strip_prefix("step-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{ckpts:?}"));
    assert!(
        step >= seen,
        "checkpoint {step}, but step {seen} was logged"
    );
}

/// Trains the tiny spec with `sets` and returns the error line and the checkpoints left.
fn diverged(sets: &[&str]) -> (String, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(dir.path(), "");
    let mut args = vec!["train", spec.to_str().unwrap(), "--set", "train.steps=10"];
    for set in sets {
        args.extend(["--set", set]);
    }
    let out = run_err(dir.path(), &args);
    let stderr = stderr(&out);
    let error = stderr.lines().last().unwrap_or_default().to_string();
    let left = common::entries(&only_run(dir.path()).join("checkpoints"));
    (error, left)
}

#[test]
fn a_non_finite_loss_stops_naming_the_step_and_term_or_is_skipped() {
    // Diverges at the second step, before any checkpoint: the terms are named, and the
    // advice does not point at a checkpoint that does not exist.
    let (error, left) = diverged(&["train.lr=1e30"]);
    assert!(
        error.starts_with("error: step 1: non-finite kl = NaN, reconstruction = NaN"),
        "{error}"
    );
    assert!(
        error.contains("stopped before its first checkpoint"),
        "{error}"
    );
    assert!(!error.contains("--resume"), "{error}");
    assert_eq!(left, Vec::<String>::new());
    // A checkpoint after every step: the one before the divergence is the last good one.
    let (error, left) = diverged(&["train.lr=1e30", "train.checkpoint_every=1"]);
    assert!(
        error.contains("The last good checkpoint is step 1"),
        "{error}"
    );
    assert!(
        error.contains("probunet train --resume runs/tiny-"),
        "{error}"
    );
    assert_eq!(left, ["step-00000001"]);
    // A rate beyond float32 makes the first update infinite while its loss was finite:
    // the weights are refused at the checkpoint, never written.
    let (error, left) = diverged(&["train.lr=1e39", "train.checkpoint_every=1"]);
    assert!(
        error.contains("step 1: non-finite weights (refusing to checkpoint them)"),
        "{error}"
    );
    assert_eq!(left, Vec::<String>::new());

    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(dir.path(), "");
    let out = run_ok(
        dir.path(),
        &[
            "train",
            spec.to_str().unwrap(),
            "--set",
            "train.lr=1e30",
            "--set",
            "train.steps=10",
            "--set",
            "train.on_nan=\"skip\"",
        ],
    );
    assert!(
        stdout(&out).contains("batches were skipped"),
        "{}",
        stdout(&out)
    );
    let skipped: u64 = metrics(&only_run(dir.path()), Phase::Train)
        .iter()
        .map(|r| r.skipped)
        .sum();
    assert!(skipped >= 8, "{skipped} skipped");
}

#[test]
fn bad_specs_and_flags_name_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_err(dir.path(), &["train", "nope.toml"]);
    assert!(stderr(&out).contains("nope.toml"), "{}", stderr(&out));
    let spec = common::write_spec(dir.path(), "[oops]\nx = 1\n");
    let out = run_err(dir.path(), &["train", spec.to_str().unwrap()]);
    let err = stderr(&out);
    assert!(err.contains("tiny.toml") && err.contains("oops"), "{err}");
    let spec = common::write_spec(dir.path(), "");
    let out = run_err(
        dir.path(),
        &["train", spec.to_str().unwrap(), "--set", "train.batch=zero"],
    );
    let err = stderr(&out);
    assert!(err.contains("train.batch"), "{err}");
    let out = run_err(
        dir.path(),
        &["train", spec.to_str().unwrap(), "--threads", "100000"],
    );
    let err = stderr(&out);
    assert!(err.contains("100000 is not in 1..=1024"), "{err}");
    // Types and choices in words, without serde's type names or doubled backticks.
    for (set, says) in [
        (
            "train.lr=abc",
            "train.lr: found the string \"abc\", expected a number",
        ),
        ("train.steps=-3", "expected a whole number, 0 or more"),
        (
            "train.precision=\"fp16\"",
            "unknown value \"fp16\", expected one of: fp32, bf16",
        ),
    ] {
        let out = run_err(dir.path(), &["train", spec.to_str().unwrap(), "--set", set]);
        let err = stderr(&out);
        assert!(err.contains(says), "{set}: {err}");
        assert!(!err.contains("``"), "{err}");
    }
    // A store that is not there says how to make one.
    let out = run_err(
        dir.path(),
        &[
            "train",
            "--set",
            "data.store=\"data/lidc\"",
            spec.to_str().unwrap(),
        ],
    );
    let err = stderr(&out);
    assert!(
        err.contains("data/lidc: no prepared store here: make it with `probunet prepare"),
        "{err}"
    );
    let out = run_err(
        dir.path(),
        &["train", spec.to_str().unwrap(), "--device", "cuda:9"],
    );
    let err = stderr(&out);
    assert!(err.contains("cuda:9"), "{err}");
    // Failed starts leave no run folder.
    let runs = std::fs::read_dir(dir.path().join("runs")).map_or(0, |d| d.count());
    assert_eq!(runs, 0);
}

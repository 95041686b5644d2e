//! `probunet sweep` as a user runs it: plans, local parallel runs, summaries, HParams,
//! failures, Ctrl-C and resume, and the per-trial entry point that cluster jobs use.
mod common;

use common::{
    expect_failure, expect_success, metric_steps, probunet, run_err, run_ok, sweep_summary, text,
    Running,
};
use probunet::run::Phase;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Writes the tiny base and a sweep spec over it; returns the sweep spec's path.
fn write_sweep(dir: &Path, sweep: &str) -> PathBuf {
    std::fs::write(
        dir.join("tiny.toml"),
        common::tiny_spec(30, 15, "images = false\n"),
    )
    .unwrap();
    let path = dir.join("sweep.toml");
    std::fs::write(&path, format!("[sweep]\nbase = \"tiny.toml\"\n{sweep}")).unwrap();
    path
}

fn column<'a>(rows: &'a [BTreeMap<String, String>], key: &str) -> Vec<&'a str> {
    rows.iter().map(|r| r[key].as_str()).collect()
}

#[test]
fn plan_prints_the_trials_and_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_sweep(
        dir.path(),
        "name = \"p\"\nseed = 1\nsamples = 2\nrepeats = 2\n\
         [sweep.grid]\nbeta = [0.1, 10]\nlatent_dim = [2, 0]\n\
         [sweep.random]\n\"train.lr\" = { log_uniform = [1e-4, 1e-2] }\n",
    );
    let out = run_ok(dir.path(), &["sweep", spec.to_str().unwrap(), "--plan"]);
    let stdout = common::stdout(&out);
    assert!(
        stdout.starts_with("sweep p: 16 trials (beta 2 x latent_dim 2 x lr drawn x 2 repeats)"),
        "{stdout}"
    );
    assert!(stdout.contains("(not started)"), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[1]
            .split_whitespace()
            .eq(["#", "id", "beta", "latent_dim", "lr", "seed", "state"]),
        "{stdout}"
    );
    assert!(
        lines[2].starts_with("0   00-beta0.1-latent_dim2-lr") && lines[2].ends_with("pending"),
        "{stdout}"
    );
    // The repeats of one draw share it and differ in seed.
    let lr = |line: &str| line.split_whitespace().nth(4).unwrap().to_string();
    assert_eq!(lr(lines[2]), lr(lines[3]));
    assert_ne!(lr(lines[2]), lr(lines[4]));
    assert!(
        stdout.contains(
            "will fail: --set model.latent_dim=0: model.latent_dim: must be positive, got 0"
        ),
        "{stdout}"
    );
    assert!(!dir.path().join("runs").exists(), "--plan writes nothing");
}

#[test]
fn bad_sweeps_name_the_file_the_key_or_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[sweep.grid]\nbetta = [1]\n",
            "sweep.toml: sweep.grid: `betta`: unknown key, expected one of: data, log, model, \
             name, train, or the last part of a key (beta, lr, latent_dim, ...); did you mean \
             model.beta?",
        ),
        ("name = \"one\"\n", "sweep.toml: plans one trial: it has no axes"),
        ("[sweep.grid]\nbeta = []\n", "sweep.toml: sweep.grid.beta: the list of values is empty"),
        (
            "[sweep.random]\nlr = { log_uniform = [-1, 1] }\n",
            "sweep.toml: sweep.random.lr.log_uniform: the bounds of a log-uniform draw must be positive",
        ),
        (
            "set = { \"train.steps\" = 0 }\n[sweep.grid]\nbeta = [1]\n",
            "the base experiment with sweep.set does not resolve: --set train.steps=0: train.steps: must be at least 1",
        ),
    ];
    for (sweep, message) in cases {
        let spec = write_sweep(dir.path(), sweep);
        let out = run_err(dir.path(), &["sweep", spec.to_str().unwrap()]);
        assert!(text(&out).contains(message), "{sweep}: {}", text(&out));
    }
    let out = run_err(dir.path(), &["sweep", "none.toml"]);
    assert!(
        text(&out).contains("none.toml: does not exist"),
        "{}",
        text(&out)
    );
    assert!(!dir.path().join("runs").exists());

    // A folder planned from one spec refuses another rather than mixing them.
    let spec = write_sweep(dir.path(), "name = \"s\"\n[sweep.grid]\nbeta = [1, 10]\n");
    run_ok(
        dir.path(),
        &["sweep", spec.to_str().unwrap(), "--emit", "slurm"],
    );
    let spec = write_sweep(dir.path(), "name = \"s\"\n[sweep.grid]\nbeta = [1, 100]\n");
    let out = run_err(dir.path(), &["sweep", spec.to_str().unwrap(), "--plan"]);
    assert!(
        text(&out).contains(
            "runs/s: holds another plan for sweep `s`: trial 1 is 01-beta100 (model.beta=100) \
             by the spec but 01-beta10 (model.beta=10) in the folder"
        ),
        "{}",
        text(&out)
    );
    let out = run_err(dir.path(), &["sweep", spec.to_str().unwrap()]);
    assert!(
        text(&out).contains("Refusing to mix them"),
        "{}",
        text(&out)
    );
    // --set fixes a key in every trial, but not an axis, and not in a planned folder.
    let spec = write_sweep(dir.path(), "name = \"t\"\n[sweep.grid]\nbeta = [1, 10]\n");
    let spec = spec.to_str().unwrap();
    let plan = run_ok(
        dir.path(),
        &[
            "sweep",
            spec,
            "--plan",
            "--set",
            "train.steps=7",
            "--set",
            "lr=3e-3",
        ],
    );
    assert!(
        common::stdout(&plan).contains("every trial sets: train.steps=7 train.lr=0.003"),
        "{}",
        text(&plan)
    );
    let out = run_err(dir.path(), &["sweep", spec, "--plan", "--set", "beta=2"]);
    assert!(
        text(&out).contains("--set beta=2: model.beta is an axis of this sweep"),
        "{}",
        text(&out)
    );
    let out = run_err(dir.path(), &["sweep", "runs/s", "--set", "lr=1"]);
    assert!(
        text(&out).contains("--set changes a sweep's plan: give the sweep spec"),
        "{}",
        text(&out)
    );
    // --trial out of range, and no trial at all.
    let out = run_err(dir.path(), &["train", "--sweep", "runs/s", "--trial", "2"]);
    assert!(
        text(&out).contains("trial 2 is out of range: runs/s has 2 trials (0 to 1)"),
        "{}",
        text(&out)
    );
    let out = run_err(dir.path(), &["train", "--sweep", "runs/s"]);
    assert!(
        text(&out).contains(
            "or `probunet train --sweep FOLDER --trial N`), or run as a Slurm array task \
             (SLURM_ARRAY_TASK_ID)"
        ),
        "{}",
        text(&out)
    );
    let out = expect_failure(
        probunet(dir.path(), &["train", "--sweep", "runs/s"]).env("SLURM_ARRAY_TASK_ID", "x"),
    );
    assert!(
        text(&out).contains("SLURM_ARRAY_TASK_ID=\"x\" is not a trial number"),
        "{}",
        text(&out)
    );
    let out = run_err(
        dir.path(),
        &["train", "--sweep", "runs/none", "--trial", "0"],
    );
    assert!(
        text(&out).contains("runs/none: does not exist"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_local_sweep_runs_every_trial_and_says_which_values_are_best() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_sweep(
        dir.path(),
        "name = \"grid\"\n[sweep.grid]\nbeta = [0.5, 2]\nlatent_dim = [2, 4]\n",
    );
    let started = Instant::now();
    let out = run_ok(
        dir.path(),
        &[
            "sweep",
            spec.to_str().unwrap(),
            "--jobs",
            "2",
            "--threads",
            "1",
        ],
    );
    let stdout = common::stdout(&out);
    let stderr = common::stderr(&out);
    eprintln!(
        "4 trials, 2 at once: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        stdout.contains("4 to run: 2 at once, 1 thread(s) each"),
        "{stdout}"
    );
    // Plain lines, prefixed with the trial, since stderr is not a terminal.
    assert!(
        stderr.contains("[00-beta0.5-latent_dim2] step 30/30"),
        "{stderr}"
    );
    assert!(
        stderr.contains("trial 03-beta2-latent_dim4 finished (30 steps)"),
        "{stderr}"
    );
    assert!(
        stdout.contains("sweep grid: 4 trials: 4 finished\nbest: beta = "),
        "{stdout}"
    );
    assert!(
        stdout.contains("throughput: 120 trial-steps in "),
        "{stdout}"
    );

    let folder = dir.path().join("runs/grid");
    let rows = sweep_summary(&folder);
    assert_eq!(
        column(&rows, "id"),
        [
            "00-beta0.5-latent_dim2",
            "01-beta0.5-latent_dim4",
            "02-beta2-latent_dim2",
            "03-beta2-latent_dim4"
        ]
    );
    assert_eq!(column(&rows, "model.beta"), ["0.5", "0.5", "2", "2"]);
    assert_eq!(column(&rows, "model.latent_dim"), ["2", "4", "2", "4"]);
    assert_eq!(column(&rows, "status"), ["finished"; 4]);
    assert_eq!(column(&rows, "steps"), ["30"; 4]);
    for row in &rows {
        for key in [
            "wall_s",
            "started_at",
            "ended_at",
            "final_val_ged",
            "final_val_hm_iou",
            "final_val_elbo",
            "final_val_kl",
            "best_val_ged",
        ] {
            assert!(!row[key].is_empty(), "{key} in {row:?}");
        }
        let best: f64 = row["best_val_ged"].parse().unwrap();
        let last: f64 = row["final_val_ged"].parse().unwrap();
        assert!(best <= last, "{row:?}");
        assert!(row["started_at"] < row["ended_at"]);
    }
    // The printed table is sorted by the best GED.
    let table: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("rank"))
        .skip(1)
        .take(4)
        .collect();
    let geds: Vec<f64> = table
        .iter()
        .map(|l| l.split_whitespace().nth(7).unwrap().parse().unwrap())
        .collect();
    assert!(geds.windows(2).all(|w| w[0] <= w[1]), "{table:?}");

    // Each trial folder is an ordinary run folder whose spec names the override.
    let trial = folder.join("02-beta2-latent_dim2");
    let spec_toml = std::fs::read_to_string(trial.join("spec.toml")).unwrap();
    assert!(
        spec_toml.contains("beta = 2.0  # --set model.beta=2\n"),
        "{spec_toml}"
    );
    assert!(
        spec_toml.contains("steps = 30  # runs/grid/base.toml\n"),
        "{spec_toml}"
    );
    assert_eq!(metric_steps(&trial, Phase::Val), [0, 15, 30]);

    // The HParams dashboard: the experiment in the sweep folder, a session per trial.
    let trials: Vec<PathBuf> = column(&rows, "id")
        .iter()
        .map(|id| folder.join(id))
        .collect();
    let mut paths: Vec<&Path> = vec![&folder];
    paths.extend(trials.iter().map(PathBuf::as_path));
    let events = common::read_events(&paths);
    let experiment = &common::events_at(&events, &folder)["hparams"]["_hparams_/experiment"];
    // The swept axes with their values, then the other standard hyperparameters.
    let infos = experiment["hparam_infos"].as_array().unwrap();
    assert_eq!(
        infos[..2],
        serde_json::json!([
            {"name": "model.beta", "type": "DATA_TYPE_FLOAT64", "domain_discrete": [0.5, 2.0]},
            {"name": "model.latent_dim", "type": "DATA_TYPE_FLOAT64", "domain_discrete": [2.0, 4.0]},
        ])
        .as_array()
        .unwrap()[..]
    );
    let names: Vec<&str> = infos[2..]
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "run",
            "data",
            "model.filters",
            "model.reconstruction",
            "train.lr",
            "train.schedule",
            "train.batch",
            "train.seed"
        ]
    );
    assert_eq!(
        experiment["metric_infos"],
        serde_json::json!([
            {"name": {"tag": "hparams/best_val_ged"}},
            {"name": {"tag": "hparams/best_val_hm_iou"}},
            {"name": {"tag": "hparams/final_val_ged"}},
            {"name": {"tag": "hparams/final_val_hm_iou"}},
            {"name": {"tag": "val/elbo"}},
            {"name": {"tag": "val/kl"}},
        ])
    );
    assert!(folder.join("summary.png").is_file(), "the sweep's figure");
    for (trial, row) in trials.iter().zip(&rows) {
        let run = common::events_at(&events, trial);
        let start = &run["hparams"]["_hparams_/session_start_info"];
        let beta: f64 = row["model.beta"].parse().unwrap();
        let latent: f64 = row["model.latent_dim"].parse().unwrap();
        assert_eq!(start["hparams"]["model.beta"].as_f64(), Some(beta));
        assert_eq!(start["hparams"]["model.latent_dim"].as_f64(), Some(latent));
        assert_eq!(
            run["hparams"]["_hparams_/session_end_info"]["status"],
            "STATUS_SUCCESS"
        );
        // The full trial id, not cut.
        let id = trial.file_name().unwrap().to_str().unwrap();
        assert_eq!(start["hparams"]["run"].as_str(), Some(id));
        for tag in [
            "val/ged",
            "val/hm_iou",
            "val/elbo",
            "val/kl",
            "hparams/final_val_ged",
        ] {
            let steps: Vec<u64> = common::scalars(run, tag).iter().map(|p| p.0).collect();
            assert_eq!(steps, [0, 15, 30], "{tag} in {}", trial.display());
        }
        let best = common::scalars(run, "hparams/best_val_ged");
        let best_csv: f64 = row["best_val_ged"].parse().unwrap();
        assert!(
            (best.last().unwrap().1 - best_csv).abs() < 1e-4,
            "{best:?} vs {row:?}"
        );
    }

    // Again: every trial finished, so nothing runs; --collect agrees.
    let before = std::fs::read(folder.join("summary.csv")).unwrap();
    let out = run_ok(
        dir.path(),
        &["sweep", spec.to_str().unwrap(), "--jobs", "2"],
    );
    assert!(
        common::stdout(&out)
            .contains("sweep grid: 4 trials in runs/grid: 4 finished; nothing to run"),
        "{}",
        text(&out)
    );
    let out = run_ok(dir.path(), &["sweep", "runs/grid", "--collect"]);
    assert!(common::stdout(&out).contains("4 trials: 4 finished"));
    assert_eq!(std::fs::read(folder.join("summary.csv")).unwrap(), before);
}

#[test]
fn a_failing_trial_is_marked_failed_and_the_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_sweep(
        dir.path(),
        "name = \"bad\"\nset = { \"train.steps\" = 10 }\n\
         [sweep.grid]\nlatent_dim = [2, 0]\nlr = [1e-3, 1e30]\n",
    );
    let out = common::output(&mut probunet(
        dir.path(),
        &["sweep", spec.to_str().unwrap(), "--jobs", "2"],
    ));
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(
        all.contains("3 of 4 trials failed") && all.contains("--retry-failed"),
        "{all}"
    );
    let rows = sweep_summary(&dir.path().join("runs/bad"));
    assert_eq!(
        column(&rows, "status"),
        ["finished", "failed", "failed", "failed"]
    );
    assert!(rows[1]["error"].contains("non-finite"), "{:?}", rows[1]);
    // The hint is the sweep's retry, not `train --resume` (which would bypass its records).
    assert!(
        rows[1]["error"].contains("--trial 1") && !rows[1]["error"].contains("--resume"),
        "{:?}",
        rows[1]
    );
    for row in &rows[2..] {
        assert_eq!(
            row["error"],
            "--set model.latent_dim=0: model.latent_dim: must be positive, got 0"
        );
    }
    assert_eq!(rows[0]["steps"], "10");
    assert!(!rows[0]["best_val_ged"].is_empty());
    // The failed trial's session says so in the HParams dashboard.
    let trial = dir.path().join("runs/bad").join(&rows[1]["id"]);
    let events = common::read_events(&[&trial]);
    assert_eq!(
        common::events_at(&events, &trial)["hparams"]["_hparams_/session_end_info"]["status"],
        "STATUS_FAILURE"
    );
    // Failed trials stay failed on a re-run, unless retried.
    let out = common::output(&mut probunet(
        dir.path(),
        &["sweep", spec.to_str().unwrap()],
    ));
    assert!(
        text(&out)
            .contains("1 finished, 3 failed (--retry-failed runs them again); nothing to run"),
        "{}",
        text(&out)
    );
    let out = common::output(&mut probunet(
        dir.path(),
        &[
            "sweep",
            spec.to_str().unwrap(),
            "--retry-failed",
            "--jobs",
            "2",
        ],
    ));
    assert!(text(&out).contains("3 to run"), "{}", text(&out));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));

    // A trial whose process cannot start (here: its log cannot be opened) is failed for
    // this run, but keeps what its earlier attempts recorded.
    let status = trial.join("status.json");
    let before = common::read_json(&status);
    let log = trial.join("train.log");
    std::fs::remove_file(&log).unwrap();
    std::fs::create_dir(&log).unwrap();
    let out = common::output(&mut probunet(
        dir.path(),
        &["sweep", spec.to_str().unwrap(), "--retry-failed"],
    ));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let after = common::read_json(&status);
    assert_eq!(after["state"], "failed");
    let error = after["error"].as_str().unwrap();
    let named = format!("cannot open runs/bad/{}/train.log", rows[1]["id"]);
    assert!(error.starts_with(&named), "{error}");
    for key in ["started_at", "attempts", "steps", "total_steps"] {
        assert_eq!(after[key], before[key], "{key}");
    }
}

/// The last `step S/T` a trial's log reports.
fn logged_step(log: &Path) -> u64 {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(common::progress_step)
        .max()
        .unwrap_or(0)
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_every_trial_and_running_again_resumes_them() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_sweep(
        dir.path(),
        "name = \"stop\"\nset = { \"train.steps\" = 400, \"train.val_every\" = 0, \
         \"train.checkpoint_every\" = 0 }\n[sweep.grid]\nbeta = [0.5, 2, 8]\n",
    );
    let child = Running::spawn(&mut probunet(
        dir.path(),
        &["sweep", spec.to_str().unwrap(), "--jobs", "2"],
    ));
    let folder = dir.path().join("runs/stop");
    let logs = [
        folder.join("00-beta0.5").join("train.log"),
        folder.join("01-beta2").join("train.log"),
    ];
    common::wait_until("both trials to log step 10 in their train.log", || {
        logs.iter().all(|l| logged_step(l) >= 10)
    });
    child.interrupt();
    let out = child.wait();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(130), "{all}");
    assert!(
        all.contains("Resume with: probunet sweep") && all.contains("sweep.toml"),
        "{all}"
    );
    let rows = sweep_summary(&folder);
    assert_eq!(
        column(&rows, "status"),
        ["interrupted", "interrupted", "pending"],
        "{all}"
    );
    let stopped: Vec<u64> = rows[..2]
        .iter()
        .map(|r| r["steps"].parse().unwrap())
        .collect();
    for (row, step) in rows.iter().zip(&stopped) {
        assert!(*step >= 10 && *step < 400, "{row:?}");
        let ckpt = folder
            .join(&row["id"])
            .join(format!("checkpoints/step-{step:08}"));
        assert!(ckpt.is_dir(), "{} from Ctrl-C", ckpt.display());
    }

    // Running it again resumes the two from their checkpoints and runs the third.
    let out = run_ok(
        dir.path(),
        &["sweep", spec.to_str().unwrap(), "--jobs", "2"],
    );
    let all = text(&out);
    assert!(all.contains("3 to run"), "{all}");
    assert!(
        all.contains(&format!("resuming from step {}", stopped[0])),
        "{all}"
    );
    let rows = sweep_summary(&folder);
    assert_eq!(column(&rows, "status"), ["finished"; 3]);
    for row in &rows {
        assert_eq!(
            metric_steps(&folder.join(&row["id"]), Phase::Train),
            (1..=80).map(|i| i * 5).collect::<Vec<_>>(),
            "{}",
            row["id"]
        );
    }
    assert!(std::fs::read_to_string(&logs[0])
        .unwrap()
        .contains("resuming"));
}

#[test]
fn cluster_tasks_run_one_trial_each_and_collect_summarises_what_finished() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_sweep(
        dir.path(),
        "name = \"array\"\nset = { \"train.steps\" = 10 }\n[sweep.grid]\nbeta = [0.5, 1, 2]\n\
         [sweep.slurm]\nmem = \"500M\"\ntime = \"00:10:00\"\nconcurrency = 2\n",
    );
    let out = run_ok(
        dir.path(),
        &[
            "sweep",
            spec.to_str().unwrap(),
            "--emit",
            "slurm",
            "--cpus",
            "1",
        ],
    );
    assert!(
        common::stdout(&out).contains("submit it with:  sbatch runs/array/sweep.sbatch"),
        "{}",
        text(&out)
    );
    let folder = dir.path().join("runs/array");
    let script = std::fs::read_to_string(folder.join("sweep.sbatch")).unwrap();
    for line in [
        "#SBATCH --array=0-2%2\n",
        "#SBATCH --cpus-per-task=1\n",
        "#SBATCH --mem=500M\n",
        "#SBATCH --time=00:10:00\n",
        // The README's promise: Ctrl-C 120 s before the time limit, to probunet itself
        // (the shell execs it), which checkpoints and stops.
        "#SBATCH --signal=B:INT@120\n",
        "\nexec ",
        "--trial \"$SLURM_ARRAY_TASK_ID\" --plain",
        "--device cpu\n",
    ] {
        assert!(script.contains(line), "{line} in:\n{script}");
    }
    assert!(!script.contains("--gres"), "no GPU asked for:\n{script}");
    run_ok(
        dir.path(),
        &[
            "sweep",
            spec.to_str().unwrap(),
            "--emit",
            "slurm",
            "--gpus",
            "1",
            "--partition",
            "gpu",
            "--out",
            "gpu.sbatch",
        ],
    );
    let gpu = std::fs::read_to_string(dir.path().join("gpu.sbatch")).unwrap();
    assert!(gpu.contains("#SBATCH --gres=gpu:1\n") && gpu.contains("--partition=gpu\n"));
    assert!(gpu.contains("--device cuda\n"), "{gpu}");
    // `--out` replaces a script it wrote (above: sweep.sbatch twice over), never a file
    // of the user's.
    let emit_to = |out: &str| {
        let spec = spec.to_str().unwrap();
        ["sweep", spec, "--emit", "slurm", "--out", out].map(String::from)
    };
    run_ok(dir.path(), &emit_to("gpu.sbatch"));
    std::fs::write(dir.path().join("job.sh"), "#!/bin/bash\nmy own job\n").unwrap();
    let out = run_err(dir.path(), &emit_to("job.sh"));
    assert!(
        text(&out)
            .contains("job.sh: exists and is not a script `probunet sweep --emit slurm` wrote"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("job.sh")).unwrap(),
        "#!/bin/bash\nmy own job\n"
    );
    let out = run_err(
        dir.path(),
        &[
            "sweep",
            spec.to_str().unwrap(),
            "--emit",
            "slurm",
            "--mem",
            "lots",
        ],
    );
    assert!(
        text(&out).contains("sweep.slurm (or its flag): mem \"lots\": expected a size"),
        "{}",
        text(&out)
    );

    // Array task 1 and Indexed Job completion 0, as the engines set them.
    let out = expect_success(
        probunet(dir.path(), &["train", "--sweep", "runs/array", "--plain"])
            .env("SLURM_ARRAY_TASK_ID", "1"),
    );
    assert!(
        common::stdout(&out).contains("trial 1 finished: 10 steps in runs/array/01-beta1"),
        "{}",
        text(&out)
    );
    expect_success(
        probunet(dir.path(), &["train", "--sweep", "runs/array", "--plain"])
            .env("JOB_COMPLETION_INDEX", "0"),
    );
    // A finished trial is not run again.
    let out = run_ok(
        dir.path(),
        &["train", "--sweep", "runs/array", "--trial", "1"],
    );
    assert!(
        common::stdout(&out).contains("trial 1 (01-beta1) already finished (10 steps)"),
        "{}",
        text(&out)
    );

    let out = run_ok(dir.path(), &["sweep", "runs/array", "--collect"]);
    let stdout = common::stdout(&out);
    assert!(
        stdout.contains("sweep array: 3 trials: 2 finished, 1 pending"),
        "{stdout}"
    );
    let rows = sweep_summary(&folder);
    assert_eq!(column(&rows, "status"), ["finished", "finished", "pending"]);
    assert_eq!(column(&rows, "steps"), ["10", "10", ""]);
    // The next script holds only what is left.
    run_ok(
        dir.path(),
        &["sweep", spec.to_str().unwrap(), "--emit", "slurm"],
    );
    let script = std::fs::read_to_string(folder.join("sweep.sbatch")).unwrap();
    assert!(script.contains("#SBATCH --array=2%2\n"), "{script}");
}

/// Two `probunet sweep` on one folder share its trials: each trial is run once, by one of
/// them, from its first step; both end with every trial finished and none failed.
#[test]
fn two_sweeps_on_one_folder_share_the_trials_and_fail_none() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_sweep(
        dir.path(),
        "name = \"two\"\n[sweep.grid]\nbeta = [0.1, 1, 10, 100]\n",
    );
    let args = [
        "sweep",
        spec.to_str().unwrap(),
        "--jobs",
        "1",
        "--threads",
        "1",
    ];
    let first = Running::spawn(&mut probunet(dir.path(), &args));
    first.wait_for_stderr("its first trial under way", |line| {
        line.starts_with("[00-") && line.contains("step 5/")
    });
    let second = expect_success(&mut probunet(dir.path(), &args));
    let first = first.wait();
    assert!(first.status.success(), "{}", text(&first));
    let outputs = [text(&first), text(&second)];
    let folder = dir.path().join("runs/two");
    for (index, id) in ["00-beta0.1", "01-beta1", "02-beta10", "03-beta100"]
        .iter()
        .enumerate()
    {
        let started = format!("trial {id} started");
        let runs: usize = outputs.iter().map(|o| o.matches(&started).count()).sum();
        assert_eq!(runs, 1, "trial {index} started {runs} times:\n{outputs:#?}");
        let trial = folder.join(id);
        let status = common::read_json(&trial.join("status.json"));
        assert_eq!(status["state"], "finished", "{status}");
        assert_eq!(status["attempts"], 1, "{status}");
        let log = std::fs::read_to_string(trial.join("train.log")).unwrap();
        assert!(!log.contains("resuming"), "{log}");
        let steps = metric_steps(&trial, Phase::Train);
        assert_eq!(steps, (1..=6).map(|k| 5 * k).collect::<Vec<u64>>(), "{id}");
    }
    // The one that ends first may leave a trial to the other, and says so.
    for output in &outputs {
        assert!(!output.contains("failed"), "{output}");
        assert!(
            output.contains("4 trials: 4 finished")
                || output.contains("running: being run by another process"),
            "{output}"
        );
    }
    // The one that ends last saw every trial finish.
    assert!(
        outputs.iter().any(|o| o.contains("4 trials: 4 finished")),
        "{outputs:#?}"
    );
    let summary = sweep_summary(&folder);
    assert_eq!(column(&summary, "status"), ["finished"; 4]);
}

/// The README's promise that a trial's numbers do not depend on what runs beside it:
/// two trials two at once give, bit for bit, what they give one after the other (one
/// thread each both times).
#[test]
fn trials_run_two_at_once_equal_trials_run_one_by_one() {
    let sweep = "name = \"pair\"\n[sweep.grid]\nbeta = [0.1, 10]\n";
    let ran = |jobs: &str| {
        let dir = tempfile::tempdir().unwrap();
        let spec = write_sweep(dir.path(), sweep);
        let args = [
            "sweep",
            spec.to_str().unwrap(),
            "--jobs",
            jobs,
            "--threads",
            "1",
        ];
        expect_success(&mut probunet(dir.path(), &args));
        let folder = dir.path().join("runs/pair");
        let curves: Vec<_> = ["00-beta0.1", "01-beta10"]
            .iter()
            .map(|id| common::curves(&folder.join(id)))
            .collect();
        (dir, curves)
    };
    let (_together, two_at_once) = ran("2");
    let (_apart, one_by_one) = ran("1");
    assert_eq!(two_at_once[0].len(), 9, "{:?}", two_at_once[0]);
    assert_eq!(two_at_once, one_by_one);
    assert_ne!(two_at_once[0], two_at_once[1], "beta makes no difference");
}

/// The README's promise that a sweep whose process dies (SIGKILL, a closed terminal) does
/// not leave its trials running unseen: each notices, finishes its step, checkpoints and
/// is marked interrupted, though its pipes to the dead sweep are broken; running the
/// sweep again resumes it.
#[test]
fn trials_of_a_killed_sweep_checkpoint_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_sweep(
        dir.path(),
        "name = \"orphan\"\n[sweep.grid]\n\"train.steps\" = [100000]\n",
    );
    let args = [
        "sweep",
        spec.to_str().unwrap(),
        "--jobs",
        "1",
        "--threads",
        "1",
    ];
    let sweep = Running::spawn(&mut probunet(dir.path(), &args));
    sweep.wait_for_stderr("the trial under way", |line| line.contains("step 5/"));
    let killed = sweep.kill();
    assert!(!killed.status.success(), "{}", text(&killed));
    let trial = dir.path().join("runs/orphan/00-steps100000");
    let status = common::wait_for("the trial to stop", || {
        let status = common::read_json(&trial.join("status.json"));
        (status["state"] != "running").then_some(status)
    });
    assert_eq!(status["state"], "interrupted", "{status}");
    let step = status["steps"].as_u64().unwrap();
    assert!(step >= 5, "{status}");
    let checkpoint = trial.join(format!("checkpoints/step-{step:08}"));
    assert!(checkpoint.is_dir(), "{}", checkpoint.display());
    // Resumed from there by the next sweep, which is stopped again at once.
    let again = Running::spawn(&mut probunet(dir.path(), &args));
    let line = again.wait_for_stderr("the resumed trial", |line| line.contains("resum"));
    assert!(line.contains(&step.to_string()), "{line}");
    again.interrupt();
    let out = again.wait();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out));
}

//! The binary as a user runs it.
mod common;

use std::path::Path;
use std::process::{Command, Output};

fn probunet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_probunet"))
        .args(args)
        .output()
        .expect("running probunet")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_lists_every_subcommand_with_a_description() {
    let out = probunet(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for (command, words) in [
        ("prepare", "LIDC pickle"),
        ("train", "experiment spec"),
        ("eval", "GED"),
        ("sweep", "sweep"),
        ("doctor", "installation"),
    ] {
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with(command))
            .unwrap_or_else(|| panic!("no line for {command} in:\n{help}"));
        assert!(line.contains(words), "{command}: {line}");
    }
}

#[test]
fn doctor_builds_the_seed_model_and_times_a_step() {
    let out = probunet(&["doctor", "--device", "cpu", "--steps", "1", "--batch", "1"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("total 4996233 parameters"), "{stdout}");
    assert!(stdout.contains("ms/step"), "{stdout}");
}

#[test]
fn the_cpu_allocator_is_chosen_by_the_environment_and_bad_values_are_named() {
    let doctor = |vars: &[(&str, &str)]| {
        Command::new(env!("CARGO_BIN_EXE_probunet"))
            .args(["doctor", "--device", "cpu", "--steps", "0"])
            .envs(vars.iter().copied())
            .output()
            .expect("running probunet")
    };
    let out = doctor(&[]);
    assert!(
        text(&out.stdout)
            .contains("CPU allocator: probunet's caching allocator, keeping up to 1024 MiB"),
        "{}",
        text(&out.stdout)
    );
    let out = doctor(&[("PROBUNET_CPU_ALLOCATOR", "system")]);
    assert!(text(&out.stdout).contains("CPU allocator: libtorch's own"));
    let out = doctor(&[("PROBUNET_CPU_CACHE_MIB", "lots")]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("PROBUNET_CPU_CACHE_MIB=\"lots\""),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_missing_cuda_device_is_an_error_not_a_cpu_fallback() {
    let out = probunet(&["doctor", "--device", "cuda:7", "--steps", "0"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("cuda:7"),
        "{}",
        text(&out.stderr)
    );
    let out = probunet(&["doctor", "--device", "tpu"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("\"tpu\""),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bench_races_pytorch_and_writes_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("bench.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_probunet"))
        .args([
            "bench",
            "--device",
            "cpu",
            "--batches",
            "1",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--samples",
            "2",
        ])
        .arg("--out")
        .arg(&out_file)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("bf16 skipped"), "{stdout}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out_file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let impls: Vec<&str> = lines.iter().map(|l| l["impl"].as_str().unwrap()).collect();
    assert_eq!(impls, ["probunet", "pytorch"]);
    for line in &lines {
        assert!(line["train_images_per_s"].as_f64().unwrap() > 0.0);
        assert!(line["samples_per_s"].as_f64().unwrap() > 0.0);
        assert!(line["peak_mib"].as_f64().unwrap() > 0.0);
    }
}

/// `probunet` in `dir`, with no trial index in the environment unless `env` sets one.
fn probunet_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_probunet"))
        .current_dir(dir)
        .args(args)
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("JOB_COMPLETION_INDEX")
        .envs(env.iter().copied())
        .output()
        .expect("running probunet")
}

#[test]
fn sweep_trial_and_train_sweep_are_one_entry_point() {
    let out = probunet(&["sweep", "trial", "--help"]);
    let help = text(&out.stdout);
    assert!(out.status.success(), "{help}{}", text(&out.stderr));
    assert!(
        help.contains("<SWEEP> [N]") && help.contains("--plain"),
        "{help}"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tiny.toml"), common::tiny_spec(10, 5, "")).unwrap();
    std::fs::write(
        dir.path().join("sweep.toml"),
        "[sweep]\nbase = \"tiny.toml\"\nname = \"s\"\n[sweep.grid]\nbeta = [1, 10]\n",
    )
    .unwrap();
    // A spec and its flags still parse next to the subcommand.
    let out = probunet_in(
        dir.path(),
        &["sweep", "sweep.toml", "--jobs", "2", "--plan"],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = probunet_in(dir.path(), &["sweep", "sweep.toml", "--emit", "slurm"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Both spellings, without and with a trial index, meet the same errors.
    let spellings: [(&[&str], &[&str]); 2] = [
        (
            &["sweep", "trial", "runs/s"],
            &["sweep", "trial", "runs/s", "2"],
        ),
        (
            &["train", "--sweep", "runs/s"],
            &["train", "--sweep", "runs/s", "--trial", "2"],
        ),
    ];
    for (args, with_index) in spellings {
        let out = probunet_in(dir.path(), with_index, &[]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{with_index:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr)
                .contains("error: trial 2 is out of range: runs/s has 2 trials (0 to 1)"),
            "{with_index:?}: {}",
            text(&out.stderr)
        );
        let out = probunet_in(dir.path(), args, &[("JOB_COMPLETION_INDEX", "x")]);
        assert!(
            text(&out.stderr).contains("JOB_COMPLETION_INDEX=\"x\" is not a trial number"),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

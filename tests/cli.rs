//! The binary as a user runs it.
mod common;

use common::{run_err, run_ok, stderr, stdout};
use std::path::Path;

#[test]
fn help_lists_every_subcommand_with_a_description() {
    let dir = tempfile::tempdir().unwrap();
    let help = stdout(&run_ok(dir.path(), &["--help"]));
    for (command, words) in [
        ("prepare", "LIDC pickle"),
        ("train", "experiment spec"),
        ("eval", "GED"),
        ("predict", "new images"),
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

/// Every picture the README shows is in the repository (docs/img), so none is a broken link.
#[test]
fn every_image_the_readme_shows_is_committed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let images: Vec<&str> = readme
        .split("](")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .filter(|target| target.ends_with(".png"))
        .collect();
    assert!(images.len() >= 8, "{images:?}");
    for image in images {
        let bytes = std::fs::read(root.join(image)).unwrap_or_else(|e| panic!("{image}: {e}"));
        assert!(bytes.starts_with(b"\x89PNG"), "{image} is not a PNG");
    }
}

/// The README's headline result is docs/results.md's, word for word (the page is written
/// by scripts/results.py from the study's outputs), and every picture the page shows is
/// committed.
#[test]
fn the_readme_headline_is_the_results_page_and_its_pictures_are_committed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let page = std::fs::read_to_string(root.join("docs/results.md")).unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let headline = page
        .lines()
        .find(|l| l.starts_with("**Headline.**"))
        .unwrap_or_else(|| panic!("no headline in docs/results.md"));
    assert!(readme.contains(headline), "README lacks: {headline}");
    let images: Vec<&str> = page
        .lines()
        .filter_map(|l| l.strip_prefix("![")?.split("](").nth(1)?.strip_suffix(')'))
        .collect();
    assert!(images.len() >= 6, "{images:?}");
    for image in images {
        let path = root.join("docs").join(image);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{image}: {e}"));
        assert!(bytes.starts_with(b"\x89PNG"), "{image} is not a PNG");
    }
}

#[test]
fn prepare_shows_both_ways_to_call_it() {
    let dir = tempfile::tempdir().unwrap();
    let err = stderr(&run_err(dir.path(), &["prepare"]));
    assert!(err.contains("probunet prepare <INPUT> [OPTIONS]"), "{err}");
    assert!(
        err.contains("probunet prepare --synthetic [OPTIONS]"),
        "{err}"
    );
}

#[test]
fn doctor_builds_the_seed_model_and_times_a_step() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_ok(
        dir.path(),
        &["doctor", "--device", "cpu", "--steps", "1", "--batch", "1"],
    );
    let stdout = stdout(&out);
    assert!(stdout.contains("total 4996233 parameters"), "{stdout}");
    // Which libtorch, read from where this process loaded it.
    let libtorch = stdout.lines().find(|l| l.starts_with("libtorch ")).unwrap();
    assert!(libtorch.starts_with("libtorch 2.11.0"), "{libtorch}");
    assert!(
        libtorch.contains("/torch/lib: CUDA available"),
        "{libtorch}"
    );
    assert!(stdout.contains("ms/step"), "{stdout}");
}

#[test]
fn the_cpu_allocator_is_chosen_by_the_environment_and_bad_values_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let doctor = |vars: &[(&str, &str)]| {
        let mut cmd = common::probunet(dir.path(), &["doctor", "--device", "cpu", "--steps", "0"]);
        cmd.envs(vars.iter().copied());
        cmd
    };
    let out = common::expect_success(&mut doctor(&[]));
    assert!(
        stdout(&out).contains("CPU allocator: probunet's caching allocator, keeping up to 256 MiB"),
        "{}",
        stdout(&out)
    );
    let out = common::expect_success(&mut doctor(&[("PROBUNET_CPU_ALLOCATOR", "system")]));
    assert!(
        stdout(&out).contains("CPU allocator: libtorch's own"),
        "{}",
        stdout(&out)
    );
    let out = common::expect_failure(&mut doctor(&[("PROBUNET_CPU_CACHE_MIB", "lots")]));
    assert!(
        stderr(&out).contains("PROBUNET_CPU_CACHE_MIB=\"lots\""),
        "{}",
        stderr(&out)
    );
    // The activation layout is chosen the same way, before any command runs.
    let out = common::expect_failure(&mut doctor(&[("PROBUNET_CPU_LAYOUT", "NHWC")]));
    assert!(
        stderr(&out).contains("PROBUNET_CPU_LAYOUT=\"NHWC\""),
        "{}",
        stderr(&out)
    );
    // And so is the most images a CPU training step takes through at once.
    let out = common::expect_failure(&mut doctor(&[("PROBUNET_CPU_PART", "0")]));
    assert!(
        stderr(&out).contains("PROBUNET_CPU_PART=\"0\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_missing_cuda_device_is_an_error_not_a_cpu_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_err(
        dir.path(),
        &["doctor", "--device", "cuda:7", "--steps", "0"],
    );
    assert!(stderr(&out).contains("cuda:7"), "{}", stderr(&out));
    let out = run_err(dir.path(), &["doctor", "--device", "tpu"]);
    assert!(stderr(&out).contains("\"tpu\""), "{}", stderr(&out));
}

#[test]
fn bench_races_pytorch_and_writes_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("bench.jsonl");
    let out = run_ok(
        dir.path(),
        &[
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
            "--rounds",
            "2",
            "--out",
            out_file.to_str().unwrap(),
        ],
    );
    let stdout = stdout(&out);
    assert!(stdout.contains("bf16 skipped"), "{stdout}");
    assert!(stdout.contains("median of 2 rounds:"), "{stdout}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out_file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let impls: Vec<&str> = lines.iter().map(|l| l["impl"].as_str().unwrap()).collect();
    // The real port races too where the checkout has it beside (../shared/seed-port).
    // Each round runs every side once, alternating.
    match probunet::bench::seed_port() {
        Some(_) => assert_eq!(
            impls,
            [
                "probunet",
                "pytorch",
                "seed-port",
                "probunet",
                "pytorch",
                "seed-port"
            ]
        ),
        None => {
            common::loud(
                "bench test: no ../shared/seed-port, so the real port's row is not checked",
            );
            assert_eq!(impls, ["probunet", "pytorch", "probunet", "pytorch"]);
        }
    }
    assert!(
        lines[0]["layout"].as_str().unwrap().starts_with("trains "),
        "probunet records its layouts: {}",
        lines[0]
    );
    for line in &lines {
        assert!(line["train_images_per_s"].as_f64().unwrap() > 0.0);
        assert!(line["samples_per_s"].as_f64().unwrap() > 0.0);
        assert!(line["peak_mib"].as_f64().unwrap() > 0.0);
        let isa = line["cpu"].as_str().unwrap();
        assert!(
            ["AVX512", "AVX2", "DEFAULT", "other"].contains(&isa),
            "{line}"
        );
    }
    assert!(stdout.contains("CPU vector ISA in use: "), "{stdout}");
}

#[test]
fn sweep_trial_and_train_sweep_are_one_entry_point() {
    let dir = tempfile::tempdir().unwrap();
    let help = stdout(&run_ok(dir.path(), &["sweep", "trial", "--help"]));
    assert!(
        help.contains("<SWEEP> [N]") && help.contains("--plain") && help.contains("--events"),
        "{help}"
    );
    std::fs::write(dir.path().join("tiny.toml"), common::tiny_spec(10, 5, "")).unwrap();
    std::fs::write(
        dir.path().join("sweep.toml"),
        "[sweep]\nbase = \"tiny.toml\"\nname = \"s\"\n[sweep.grid]\nbeta = [1, 10]\n",
    )
    .unwrap();
    // A spec and its flags still parse next to the subcommand.
    run_ok(
        dir.path(),
        &["sweep", "sweep.toml", "--jobs", "2", "--plan"],
    );
    run_ok(dir.path(), &["sweep", "sweep.toml", "--emit", "slurm"]);
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
        let out = run_err(dir.path(), with_index);
        assert_eq!(out.status.code(), Some(1), "{with_index:?}");
        assert!(
            stderr(&out).contains("error: trial 2 is out of range: runs/s has 2 trials (0 to 1)"),
            "{with_index:?}: {}",
            stderr(&out)
        );
        let out = common::expect_failure(
            common::probunet(dir.path(), args).env("JOB_COMPLETION_INDEX", "x"),
        );
        assert!(
            stderr(&out).contains("JOB_COMPLETION_INDEX=\"x\" is not a trial number"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

/// The README's promise that the binary runs without `LD_LIBRARY_PATH` and uses CUDA on a
/// GPU machine: `libtorch_cuda.so` is linked (rustc's `--as-needed` would drop it) and the
/// RUNPATH names torch's `lib/` folder, which holds it.
#[test]
fn the_binary_needs_libtorch_cuda_and_finds_it_through_its_runpath() {
    let binary = env!("CARGO_BIN_EXE_probunet");
    let out = common::expect_success(std::process::Command::new("readelf").args(["-d", binary]));
    let dynamic = stdout(&out);
    let needed: Vec<&str> = dynamic
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| l.split('[').nth(1)?.strip_suffix(']'))
        .collect();
    assert!(needed.contains(&"libtorch_cuda.so"), "{needed:?}");
    let runpath = dynamic
        .lines()
        .find(|l| l.contains("(RUNPATH)"))
        .and_then(|l| l.split('[').nth(1)?.strip_suffix(']'))
        .unwrap_or_else(|| panic!("no RUNPATH in:\n{dynamic}"));
    let holds = |lib: &str| {
        runpath
            .split(':')
            .any(|dir| std::path::Path::new(dir).join(lib).is_file())
    };
    assert!(holds("libtorch_cuda.so"), "{runpath}");
    assert!(holds("libtorch_cpu.so"), "{runpath}");
    // And it starts with no library path set.
    let dir = tempfile::tempdir().unwrap();
    let out = common::expect_success(
        common::probunet(dir.path(), &["--version"]).env_remove("LD_LIBRARY_PATH"),
    );
    assert!(stdout(&out).starts_with("probunet "), "{}", stdout(&out));
}

/// Every spec the repository ships resolves: experiment specs load with every key known,
/// and sweep specs plan their trials, each of which resolves too.
#[test]
fn every_shipped_spec_resolves() {
    let dir = tempfile::tempdir().unwrap();
    let mut specs: Vec<_> = std::fs::read_dir(common::repo().join("experiments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    specs.sort();
    assert!(specs.len() >= 6, "{specs:?}");
    for spec in specs {
        let text = std::fs::read_to_string(&spec).unwrap();
        if text.contains("[sweep]") {
            let out = run_ok(dir.path(), &["sweep", spec.to_str().unwrap(), "--plan"]);
            assert!(
                !stdout(&out).contains("will fail"),
                "{}: {}",
                spec.display(),
                stdout(&out)
            );
        } else if let Err(e) = probunet::config::load(&spec, &[], &[]) {
            panic!("{}: {e}", spec.display());
        }
    }
}

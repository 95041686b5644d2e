//! Hostile input of every kind: sizes no machine holds, and stores and checkpoints that
//! were tampered with. Each ends in exit status 1 with an error naming the value or the
//! file, never a panic or an abort, and leaves nothing behind.
mod common;

use common::{entries, probunet, run_err, run_ok, stderr};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;

/// The error line of a command that must fail cleanly.
fn refused(out: &Output) -> String {
    let text = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{}", common::text(out));
    assert!(!text.contains("panicked"), "{text}");
    let error = text.lines().find(|l| l.starts_with("error: "));
    error
        .unwrap_or_else(|| panic!("no error line: {text}"))
        .into()
}

/// Memory is held to 4 GiB, so that what is refused does not depend on the machine.
const MEMORY_LIMIT: (&str, &str) = ("PROBUNET_MEMORY_LIMIT_MIB", "4096");

fn limited(dir: &Path, args: &[&str]) -> Output {
    common::expect_failure(probunet(dir, args).env(MEMORY_LIMIT.0, MEMORY_LIMIT.1))
}

#[test]
fn sizes_no_machine_holds_are_refused_before_anything_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(dir.path(), "");
    let spec = spec.to_str().unwrap();
    for (set, says) in [
        (
            "model.filters=[8,100000000]",
            "model.filters = [8, 100000000], model.latent_dim = 2 on batches of 8 images of \
             32x32 needs about",
        ),
        (
            "data.synthetic.size=65536",
            "data.synthetic (size = 65536, annotators = 4): one item of 65536x65536 pixels \
             with 4 annotators needs about 32.0 GiB",
        ),
        (
            "data.synthetic.annotators=100000",
            "data.synthetic (size = 32, annotators = 100000): one item of 32x32 pixels with \
             100000 annotators needs about",
        ),
        ("train.batch=100000000", "on batches of 100000000 images"),
        (
            "model.latent_dim=1000000000",
            "model.latent_dim = 1000000000 on batches of 8 images",
        ),
        (
            "train.val_samples=100000000",
            "validation with train.val_samples = 100000000",
        ),
    ] {
        let error = refused(&limited(dir.path(), &["train", spec, "--set", set]));
        assert!(error.contains(says), "{set}: {error}");
        assert!(
            error
                .ends_with("more than the 4.0 GiB of memory available (PROBUNET_MEMORY_LIMIT_MIB)"),
            "{set}: {error}"
        );
    }
    for (flags, says) in [
        (
            ["--items", "18446744073709551615"],
            "prepare --synthetic --items 18446744073709551615 --size 128 --annotators 4: a store \
             of 18446744073709551615 items of 128x128 pixels with 4 annotators needs about",
        ),
        (
            ["--size", "1000000"],
            "--size 1000000 --annotators 4: one item of 1000000x1000000 pixels with 4 \
             annotators needs about 7.3 TiB",
        ),
    ] {
        let mut args = vec!["prepare", "--synthetic", "--out", "data/big"];
        args.extend(flags);
        let error = refused(&limited(dir.path(), &args));
        assert!(error.contains(says), "{flags:?}: {error}");
    }
    // Own-data flags say they do not apply to the synthetic data, rather than being ignored.
    for flag in [&["--patient-regex", "x"][..], &["--missing", "empty"]] {
        let mut args = vec!["prepare", "--synthetic"];
        args.extend(flag);
        let error = stderr(&run_err(dir.path(), &args));
        assert!(
            error.contains("cannot be used with") && error.contains(flag[0]),
            "{error}"
        );
    }
    assert_eq!(entries(&dir.path().join("runs")), Vec::<String>::new());
    // The spec's own store may have been built before the model was refused; no half
    // store is left.
    let data = entries(&dir.path().join("data"));
    assert!(data.iter().all(|e| e.starts_with("synthetic-")), "{data:?}");
}

#[test]
fn eval_refuses_what_it_cannot_hold_or_compute() {
    let dir = tempfile::tempdir().unwrap();
    let run = common::trained_run(dir.path());
    let run = run.to_str().unwrap();
    let error = refused(&limited(
        dir.path(),
        &["eval", run, "--samples", "100000000"],
    ));
    assert!(
        error.contains("eval --samples 100000000 with --batch 4 needs about"),
        "{error}"
    );
    for (bootstrap, why) in [
        ("0", "a 95% percentile interval"),
        ("39", "a 95% percentile interval"),
        ("1000001", "at most 1000000 resamples"),
    ] {
        let error = refused(&run_err(
            dir.path(),
            &["eval", run, "--bootstrap", bootstrap],
        ));
        assert!(
            error.contains(&format!("--bootstrap {bootstrap}: {why}")),
            "{error}"
        );
    }
    assert_eq!(entries(&Path::new(run).join("eval")), Vec::<String>::new());
}

/// The step folder of a run's only step checkpoint.
fn step_checkpoint(run: &Path) -> PathBuf {
    let dir = run.join("checkpoints/step-00000010");
    assert!(dir.is_dir(), "{}", dir.display());
    dir
}

/// Overwrites the first float of a safetensors file's data with NaN.
fn poison_first_weight(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header..8 + header + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn tampered_checkpoints_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let run = common::trained_run(dir.path());
    let run_arg = run.to_str().unwrap();
    let state_path = step_checkpoint(&run).join("state.json");
    let honest = std::fs::read_to_string(&state_path).unwrap();
    // Edited as text: the loader's generator states are u128, more than a JSON Value holds.
    let lying = honest.replacen("\"step\": 10,", "\"step\": 1000000000000,", 1);
    assert_ne!(lying, honest);
    std::fs::write(&state_path, lying).unwrap();
    let error = refused(&run_err(dir.path(), &["train", "--resume", run_arg]));
    assert!(error.contains(&state_path.display().to_string()), "{error}");
    assert!(
        error.contains("says step 1000000000000, but its folder is step 10"),
        "{error}"
    );
    // A data cursor past the split would index outside it. The refused resume leaves no
    // event file of its own beside the run's.
    let event_files = || {
        entries(&run)
            .into_iter()
            .filter(|e| e.starts_with("events.out.tfevents"))
            .count()
    };
    let before = event_files();
    let at = honest.find("\"cursor\": ").unwrap() + "\"cursor\": ".len();
    let end = at + honest[at..].find(',').unwrap();
    let lying = format!("{}18446744073709551615{}", &honest[..at], &honest[end..]);
    std::fs::write(&state_path, lying).unwrap();
    let error = refused(&run_err(dir.path(), &["train", "--resume", run_arg]));
    assert!(error.contains(&state_path.display().to_string()), "{error}");
    assert!(
        error.contains("data cursor 18446744073709551615 is not a whole number of batches"),
        "{error}"
    );
    assert_eq!(event_files(), before);
    std::fs::write(&state_path, honest).unwrap();

    let model = step_checkpoint(&run).join("model.safetensors");
    let honest_model = std::fs::read(&model).unwrap();
    poison_first_weight(&model);
    let error = refused(&run_err(dir.path(), &["train", "--resume", run_arg]));
    assert!(
        error.contains(&format!("checkpoint {}: variable", model.display())),
        "{error}"
    );
    assert!(error.contains("holds NaN or infinite values"), "{error}");
    // Adam's moments too: a NaN there would turn every later step NaN and be blamed on
    // the spec.
    std::fs::write(&model, honest_model).unwrap();
    let optimizer = step_checkpoint(&run).join("optimizer.safetensors");
    poison_first_weight(&optimizer);
    let error = refused(&run_err(dir.path(), &["train", "--resume", run_arg]));
    assert!(
        error.contains(&format!(
            "checkpoint {}: optimizer tensor",
            optimizer.display()
        )),
        "{error}"
    );
    assert!(error.contains("holds NaN or infinite values"), "{error}");
    let best = run.join("checkpoints/best/model.safetensors");
    poison_first_weight(&best);
    let error = refused(&run_err(dir.path(), &["eval", run_arg]));
    assert!(error.contains("holds NaN or infinite values"), "{error}");
    assert_eq!(entries(&run.join("eval")), Vec::<String>::new());
}

/// A copy of the run's store in `dir/name`, with `edit` applied to its manifest.
fn tampered_store(store: &Path, dir: &Path, name: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let copy = dir.join(name);
    std::fs::create_dir(&copy).unwrap();
    for file in ["manifest.json", "data.safetensors"] {
        std::fs::copy(store.join(file), copy.join(file)).unwrap();
    }
    let path = copy.join("manifest.json");
    let mut manifest = common::read_json(&path);
    edit(&mut manifest);
    std::fs::write(&path, manifest.to_string()).unwrap();
    copy
}

#[test]
fn a_store_whose_manifest_or_header_lies_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let run = common::trained_run(dir.path());
    let meta = common::read_json(&run.join("meta.json"));
    let store = PathBuf::from(meta["store"].as_str().unwrap());
    let run = run.to_str().unwrap();
    let eval_on = |store: &Path| {
        let out = run_err(
            dir.path(),
            &["eval", run, "--store", store.to_str().unwrap()],
        );
        refused(&out)
    };
    let short = tampered_store(&store, dir.path(), "short", |m| {
        m["keys"].as_array_mut().unwrap().truncate(3);
    });
    let error = eval_on(&short);
    assert!(
        error.contains(&format!(
            "{}: keys lists 3 entries for 120 items",
            short.join("manifest.json").display()
        )),
        "{error}"
    );
    let far = tampered_store(&store, dir.path(), "far", |m| {
        m["split"]["test"][0] = Value::from(1_000_000_000u64);
    });
    let error = eval_on(&far);
    assert!(
        error.contains("split.test names item 1000000000, but the store has 120 items"),
        "{error}"
    );
    let header = tampered_store(&store, dir.path(), "header", |_| {});
    let arrays = header.join("data.safetensors");
    let mut bytes = std::fs::read(&arrays).unwrap();
    let at = bytes.windows(4).position(|w| w == b"\"U8\"").unwrap();
    bytes[at + 1] = b'I';
    std::fs::write(&arrays, bytes).unwrap();
    let error = eval_on(&header);
    assert!(error.contains(&arrays.display().to_string()), "{error}");
    assert!(error.contains("tensor \"masks\" is I8"), "{error}");
    run_ok(dir.path(), &["eval", run, "--bootstrap", "40"]);
}

/// bench, bench-eval and doctor on the CPU, without the PyTorch side.
const BENCH: [&str; 6] = [
    "bench",
    "--device",
    "cpu",
    "--no-torch",
    "--precisions",
    "fp32",
];
const BENCH_EVAL: [&str; 6] = [
    "bench-eval",
    "--device",
    "cpu",
    "--no-torch",
    "--repeats",
    "1",
];
const DOCTOR: [&str; 3] = ["doctor", "--device", "cpu"];

/// The error line of a command line that clap refuses (exit status 2) before it runs.
fn misused(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(2), "{}", common::text(out));
    let text = stderr(out);
    let error = text.lines().find(|l| l.starts_with("error: "));
    error
        .unwrap_or_else(|| panic!("no error line: {text}"))
        .into()
}

#[test]
fn bench_doctor_and_bench_eval_refuse_counts_out_of_range_by_flag() {
    let dir = tempfile::tempdir().unwrap();
    let (bench, bench_eval, doctor) = (&BENCH[..], &BENCH_EVAL[..], &DOCTOR[..]);
    // Flag, value, and why clap refuses it.
    for (command, flag, value, why) in [
        (bench, "batches", "1,0", "must be at least 1"),
        (bench, "samples", "0", "must be at least 1"),
        (bench, "steps", "0", "0 is not in 1..=10000"),
        (
            bench,
            "steps",
            "100000000000",
            "100000000000 is not in 1..=10000",
        ),
        (bench, "warmup", "1001", "1001 is not in 0..=1000"),
        (
            doctor,
            "steps",
            "100000000000",
            "100000000000 is not in 0..=10000",
        ),
        (bench_eval, "images", "0", "0 is not in 1..=10000"),
        (
            bench_eval,
            "images",
            "1000000000000",
            "1000000000000 is not in 1..=10000",
        ),
        (&["bench-eval"], "repeats", "101", "101 is not in 1..=100"),
    ] {
        let mut args = command.to_vec();
        let named = format!("--{flag}");
        args.extend([named.as_str(), value]);
        let error = misused(&run_err(dir.path(), &args));
        let bad = value.rsplit(',').next().unwrap();
        let says = format!(
            "error: invalid value '{bad}' for '--{flag} <{}>': {why}",
            flag.to_uppercase()
        );
        assert_eq!(error, says, "{args:?}");
    }
    for (command, flags, says) in [
        (
            bench_eval,
            &["--size", "0"][..],
            "--size must be a positive multiple of 8 for 4 model levels, got 0",
        ),
        (
            bench_eval,
            &["--size", "12"],
            "--size must be a positive multiple of 8 for 4 model levels, got 12",
        ),
        (
            bench_eval,
            &["--filters", "0"],
            "--filters: needs one or more positive counts, got [0]",
        ),
        (
            bench_eval,
            &["--latent-dim", "0"],
            "--latent-dim: must be positive, got 0",
        ),
        (
            doctor,
            &["--steps", "0", "--latent-dim", "0"],
            "--latent-dim: must be positive, got 0",
        ),
    ] {
        let args: Vec<&str> = command.iter().chain(flags).copied().collect();
        let error = refused(&run_err(dir.path(), &args));
        assert_eq!(error, format!("error: {says}"), "{args:?}");
    }
    assert_eq!(entries(dir.path()), Vec::<String>::new());
}

#[test]
fn bench_doctor_and_bench_eval_refuse_what_memory_cannot_hold_by_flag() {
    let dir = tempfile::tempdir().unwrap();
    let (bench, bench_eval, doctor) = (&BENCH[..], &BENCH_EVAL[..], &DOCTOR[..]);
    // The batch's images and masks: on the CPU only a part of 2 images holds activations.
    let training = "training model.filters = [32, 64, 128, 192], model.latent_dim = 2 on \
                    batches of 1000000000000 images of 128x128 needs about 116.4 PiB";
    for (command, flags, says) in [
        (
            doctor,
            &["--steps", "1", "--batch", "1000000000000"][..],
            format!("doctor --batch 1000000000000: {training}"),
        ),
        (
            doctor,
            &["--steps", "0", "--latent-dim", "100000000000"],
            "doctor --latent-dim 100000000000 needs about 292.5 TiB".into(),
        ),
        (
            bench,
            &["--batches", "1000000000000"],
            format!("bench --batches 1000000000000: {training}"),
        ),
        (
            bench,
            &["--batches", "1", "--samples", "1000000000000"],
            "bench --samples 1000000000000 at --batches 1 needs about 174.6 PiB".into(),
        ),
        (
            bench_eval,
            &["--images", "1", "--size", "1000000"],
            "bench-eval --images 1 --batch 4 --size 1000000 needs about 109.1 TiB".into(),
        ),
        (
            bench_eval,
            &["--images", "1", "--batch", "1000000000000"],
            "bench-eval --images 1 --batch 1000000000000 --size 128 needs about 349.2 PiB".into(),
        ),
        (
            bench_eval,
            &["--samples", "1000000000"],
            "bench-eval --samples 1000000000 at --batch 4 --size 128 needs about 715.3 TiB".into(),
        ),
        (
            bench_eval,
            &["--filters", "8,100000000"],
            "bench-eval --filters 8,100000000 --latent-dim 2 needs about 1.9 EiB".into(),
        ),
    ] {
        let args: Vec<&str> = command.iter().chain(flags).copied().collect();
        let error = refused(&limited(dir.path(), &args));
        assert_eq!(
            error,
            format!(
                "error: {says}, more than the 4.0 GiB of memory available \
                 (PROBUNET_MEMORY_LIMIT_MIB)"
            ),
            "{args:?}"
        );
    }
    // Refused before bench opened its output.
    assert_eq!(entries(dir.path()), Vec::<String>::new());
}

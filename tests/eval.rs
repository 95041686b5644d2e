//! `probunet eval` as a user runs it: the outputs in the run folder, their agreement with
//! each other and with TensorBoard's reader, reproducibility, and the errors for bad input.
mod common;

use common::{read_json, run_err, run_ok, stderr, stdout};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tempfile::TempDir;

/// The fixture: a tiny trained run in a temporary folder of this test binary's own, so that
/// overlapping test runs never share it.
struct Fixture {
    dir: TempDir,
    run: PathBuf,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

/// Statics are never dropped, so the fixture's folder is removed when the process exits.
extern "C" fn remove_fixture() {
    if let Some(fixture) = FIXTURE.get() {
        let _ = std::fs::remove_dir_all(fixture.dir.path());
    }
}

/// A tiny trained run, made once per test binary: `(root, run)`. Commands run in `root`,
/// where the run's synthetic store lives; each test evaluates copies of the run in a
/// temporary folder of its own.
fn fixture() -> (&'static Path, &'static Path) {
    let fixture = FIXTURE.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("probunet-eval-fixture-")
            .tempdir()
            .unwrap();
        // SAFETY: registers a plain function with no arguments, as atexit(3) asks.
        assert_eq!(unsafe { libc::atexit(remove_fixture) }, 0, "atexit");
        let root = dir.path();
        common::write_spec(root, "");
        // Checkpoints at steps 20 and 30 and the best of the validations at 10, 20, 30.
        run_ok(
            root,
            &[
                "train",
                "tiny.toml",
                "--plain",
                "--set",
                "train.steps=30",
                "--set",
                "train.val_every=10",
            ],
        );
        let run = common::only_run(root);
        Fixture { dir, run }
    });
    (fixture.dir.path(), &fixture.run)
}

/// A copy of the fixture run in `scratch` and `probunet eval ARGS` on it, to be run.
fn eval_copy(scratch: &Path, name: &str, args: &[&str]) -> (PathBuf, Command) {
    let (root, run) = fixture();
    let copy = scratch.join(name);
    copy_dir(run, &copy);
    let mut cmd = common::probunet(root, &["eval", copy.to_str().unwrap(), "--device", "cpu"]);
    cmd.args(args);
    (copy, cmd)
}

fn eval_ok(scratch: &Path, name: &str, args: &[&str]) -> (PathBuf, String) {
    let (copy, mut cmd) = eval_copy(scratch, name, args);
    (copy, stdout(&common::expect_success(&mut cmd)))
}

fn eval_err(scratch: &Path, name: &str, args: &[&str]) -> String {
    let (_, mut cmd) = eval_copy(scratch, name, args);
    stderr(&common::expect_failure(&mut cmd))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The CSV as (header, rows of fields).
fn csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text
        .lines()
        .map(|l| l.split(',').map(String::from).collect());
    let header = lines.next().unwrap();
    (header, lines.collect())
}

fn column(path: &Path, name: &str) -> Vec<f64> {
    let (header, rows) = csv(path);
    let i = header.iter().position(|h| h == name).unwrap();
    rows.iter().map(|r| r[i].parse().unwrap()).collect()
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    (be(16), be(20))
}

fn close(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-9 * a.abs().max(1.0)
}

#[test]
fn eval_writes_aggregates_rows_figures_and_tensorboard_for_each_sample_count() {
    let scratch = tempfile::tempdir().unwrap();
    let (run, stdout) = eval_ok(scratch.path(), "outputs", &[]);
    assert!(stdout.contains("GED (phiseg)"), "{stdout}");
    let eval = run.join("eval");
    let store = read_json(&eval.join("test-16.json"))["store"]["path"]
        .as_str()
        .unwrap()
        .to_owned();
    let manifest = read_json(&fixture().0.join(store).join("manifest.json"));
    let test_items: Vec<u64> = manifest["split"]["test"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(!test_items.is_empty());
    for n in [16, 100] {
        let report = read_json(&eval.join(format!("test-{n}.json")));
        assert_eq!(report["samples"], n);
        assert_eq!(report["split"], "test");
        assert_eq!(report["items"], test_items.len());
        assert_eq!(report["seed"], 0);
        assert_eq!(report["checkpoint"]["choice"], "best");
        assert!(report["checkpoint"]["path"]
            .as_str()
            .unwrap()
            .ends_with("checkpoints/best"));
        assert!(report["checkpoint"]["step"].as_u64().unwrap() > 0);
        assert_eq!(report["conventions"]["default"], "phiseg");
        assert_eq!(
            report["conventions"]["computed"],
            serde_json::json!(["phiseg", "kohl-nan"])
        );
        assert_eq!(report["bootstrap"]["resamples"], 10_000);

        let rows = eval.join(format!("test-{n}.csv"));
        let (header, lines) = csv(&rows);
        assert_eq!(header[..4], ["item", "key", "patient", "empty_annotations"]);
        let items: Vec<u64> = lines.iter().map(|r| r[0].parse().unwrap()).collect();
        assert_eq!(items, test_items, "one row per test image, in store order");
        for convention in ["phiseg", "kohl-nan"] {
            for metric in ["ged", "hm_iou", "diversity", "ncc", "mean_pred_iou"] {
                let summary = &report["metrics"][convention][metric];
                let col = if metric == "ncc" {
                    "ncc".to_string()
                } else {
                    format!("{metric}_{}", convention.replace('-', "_"))
                };
                let values: Vec<f64> = column(&rows, &col)
                    .into_iter()
                    .filter(|v| !v.is_nan())
                    .collect();
                assert_eq!(
                    summary["n"].as_u64().unwrap() as usize,
                    values.len(),
                    "{convention} {metric}"
                );
                assert_eq!(
                    summary["n_nan"].as_u64().unwrap() as usize,
                    test_items.len() - values.len()
                );
                if values.is_empty() {
                    assert!(
                        summary["mean"].is_null(),
                        "{convention} {metric}: NaN is null"
                    );
                    continue;
                }
                let mean = values.iter().sum::<f64>() / values.len() as f64;
                let got = summary["mean"].as_f64().unwrap();
                assert!(
                    close(got, mean),
                    "{convention} {metric}: {got} vs CSV {mean}"
                );
                let (low, high) = (
                    summary["ci_low"].as_f64().unwrap(),
                    summary["ci_high"].as_f64().unwrap(),
                );
                assert!(
                    low <= got + 1e-12 && got <= high + 1e-12,
                    "{low} {got} {high}"
                );
                assert!(summary["std"].as_f64().unwrap() >= 0.0);
            }
        }
        // PHiSeg GED is never NaN for finite samples: every image is scored.
        assert_eq!(report["metrics"]["phiseg"]["ged"]["n_nan"], 0);
        // The ideal model is scored beside it; at 16 samples its GED is the reference
        // prepare recorded, and its samples are not the model's.
        let ideal_ged = report["ideal"]["metrics"]["phiseg"]["ged"]["mean"]
            .as_f64()
            .unwrap();
        if n == 16 {
            let reference = manifest["ideal"]["ged_test"].as_f64().unwrap();
            assert!(close(ideal_ged, reference), "{ideal_ged} vs {reference}");
        }
        assert_ne!(ideal_ged, report["metrics"]["phiseg"]["ged"]["mean"]);
        assert!(report["ideal"]["metrics"]["phiseg"]["hm_iou"]["ci_low"].is_f64());
        // Empty masks: the annotations' fraction from the CSV's empty_annotations column.
        let empty = column(&rows, "empty_annotations");
        let annotators = manifest["shape"]["annotators"].as_f64().unwrap();
        let mean = empty.iter().sum::<f64>() / empty.len() as f64 / annotators;
        let got = report["empty_masks"]["annotations"]["mean"]
            .as_f64()
            .unwrap();
        assert!(close(got, mean), "{got} vs {mean}");
        // The per-image columns average to the report's means.
        let mean_of = |name: &str| {
            let values = column(&rows, name);
            values.iter().sum::<f64>() / values.len() as f64
        };
        let samples = report["empty_masks"]["samples"]["mean"].as_f64().unwrap();
        assert!(close(samples, mean_of("empty_samples")), "{samples}");
        assert!(close(ideal_ged, mean_of("ideal_ged_phiseg")), "{ideal_ged}");
        let ideal_empty = report["ideal"]["empty_samples"]["mean"].as_f64().unwrap();
        assert!(close(ideal_empty, mean_of("ideal_empty_samples")));
        let geds = column(&rows, "ged_phiseg");
        let sorted = {
            let mut g = geds.clone();
            g.sort_by(f64::total_cmp);
            g
        };
        assert!(close(
            report["examples"]["best"]["ged"].as_f64().unwrap(),
            sorted[0]
        ));
        assert!(close(
            report["examples"]["worst"]["ged"].as_f64().unwrap(),
            *sorted.last().unwrap()
        ));
        assert!(close(
            report["examples"]["median"]["ged"].as_f64().unwrap(),
            sorted[(sorted.len() - 1) / 2]
        ));
        for which in ["best", "median", "worst"] {
            // Input, 4 annotations, 8 samples, mean and variance: 15 tiles of 32 px drawn
            // at 128, under the headers and the caption, with two colour bars.
            let (width, height) = png_size(&eval.join(format!("test-{n}-{which}.png")));
            assert_eq!(height, 12 + 22 + 22 + 128 + 12, "{which}");
            assert!(
                width > 15 * 128 + 3 * 20 + 10 * 4 + 2 * 16,
                "{which}: {width}"
            );
        }
    }
    let leftovers: Vec<String> = std::fs::read_dir(&eval)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    let events = common::read_events(&[&eval]);
    let events = common::events_at(&events, &eval);
    let step = read_json(&eval.join("test-16.json"))["checkpoint"]["step"]
        .as_u64()
        .unwrap();
    for n in [16, 100] {
        for which in ["best", "median", "worst"] {
            let image = &events["images"][format!("eval/test-{n}/{which}")][0];
            assert_eq!(image["step"], step);
            assert!(image["png_width"].as_u64().unwrap() > 15 * 128);
        }
        // The summary as a table, not as single-dot charts.
        assert!(
            events["scalars"].as_object().unwrap().is_empty(),
            "{}",
            events["scalars"]
        );
        let text = &events["text"][format!("eval/test-{n}/summary")][0];
        assert_eq!(text[0], step);
        let table = text[1].as_str().unwrap();
        let report = read_json(&eval.join(format!("test-{n}.json")));
        for metric in ["ged", "hm_iou", "ncc", "diversity"] {
            let row = table
                .lines()
                .find(|l| l.starts_with(&format!("| {metric} |")))
                .unwrap_or_else(|| panic!("{metric} in {table}"));
            let summary = &report["metrics"]["phiseg"][metric];
            let expected = match summary["mean"].as_f64() {
                Some(mean) => format!(
                    "{mean:.4} [{:.4}, {:.4}]",
                    summary["ci_low"].as_f64().unwrap(),
                    summary["ci_high"].as_f64().unwrap()
                ),
                None => "-".into(),
            };
            assert!(row.contains(&expected), "{row} lacks {expected}");
        }
    }
}

#[test]
fn results_depend_on_the_seed_but_not_on_the_batch_size_or_other_sample_counts() {
    let scratch = tempfile::tempdir().unwrap();
    let (a, _) = eval_ok(
        scratch.path(),
        "batch-1",
        &["--batch", "1", "--samples", "12"],
    );
    let (b, _) = eval_ok(
        scratch.path(),
        "batch-5",
        &["--batch", "5", "--samples", "5,12"],
    );
    let (c, _) = eval_ok(
        scratch.path(),
        "seed-1",
        &["--samples", "12", "--seed", "1"],
    );
    let path = |run: &Path| run.join("eval/test-12.csv");
    for name in [
        "ged_phiseg",
        "hm_iou_phiseg",
        "ncc",
        "mean_pred_iou_kohl_nan",
    ] {
        let (x, y) = (column(&path(&a), name), column(&path(&b), name));
        for (i, (x, y)) in x.iter().zip(&y).enumerate() {
            // Float rounding may differ between batch sizes; different noise would not be close.
            assert!(
                (x.is_nan() && y.is_nan()) || (x - y).abs() < 1e-4,
                "{name}, row {i}: {x} vs {y}"
            );
        }
    }
    let (x, z) = (column(&path(&a), "ncc"), column(&path(&c), "ncc"));
    assert!(
        x.iter().zip(&z).any(|(x, z)| (x - z).abs() > 1e-6),
        "another seed draws other samples"
    );
    assert!(b.join("eval/test-5.json").is_file());
    assert_eq!(read_json(&c.join("eval/test-12.json"))["seed"], 1);
}

#[test]
fn deterministic_decodes_the_prior_mean_so_every_sample_is_the_same_mask() {
    let scratch = tempfile::tempdir().unwrap();
    let (run, _) = eval_ok(
        scratch.path(),
        "deterministic",
        &["--samples", "3,6", "--deterministic"],
    );
    let report = read_json(&run.join("eval/test-6.json"));
    assert!(
        report["noise"].as_str().unwrap().starts_with("none"),
        "{}",
        report["noise"]
    );
    let csv = |n: usize| run.join(format!("eval/test-{n}.csv"));
    for d in column(&csv(6), "diversity_phiseg") {
        assert_eq!(d, 0.0, "identical samples are 0 apart");
    }
    // The same mask however many times it is drawn: one GED per image at any count,
    // and each image's samples are all empty or none is.
    assert_eq!(column(&csv(3), "ged_phiseg"), column(&csv(6), "ged_phiseg"));
    for e in column(&csv(6), "empty_samples") {
        assert!(e == 0.0 || e == 1.0, "{e}");
    }
}

#[test]
fn checkpoints_are_chosen_by_name_or_path_with_a_note_when_best_is_missing() {
    let scratch = tempfile::tempdir().unwrap();
    let (run, _) = eval_ok(
        scratch.path(),
        "last",
        &["--checkpoint", "last", "--samples", "4"],
    );
    let report = read_json(&run.join("eval/test-4.json"));
    assert_eq!(report["checkpoint"]["choice"], "last");
    assert_eq!(report["checkpoint"]["step"], 30);
    assert!(report["checkpoint"]["path"]
        .as_str()
        .unwrap()
        .ends_with("step-00000030"));

    let (_, run) = fixture();
    let model = run.join("checkpoints/step-00000020/model.safetensors");
    let (copy, _) = eval_ok(
        scratch.path(),
        "path",
        &["--checkpoint", model.to_str().unwrap(), "--samples", "4"],
    );
    let report = read_json(&copy.join("eval/test-4.json"));
    assert_eq!(report["checkpoint"]["step"], 20);
    assert_eq!(report["checkpoint"]["model"], model.to_str().unwrap());

    // A step number, as `step-20` or `20`; one that was not kept is named with those that were.
    for choice in ["step-20", "20"] {
        let (copy, _) = eval_ok(
            scratch.path(),
            choice,
            &["--checkpoint", choice, "--samples", "4"],
        );
        let report = read_json(&copy.join("eval/test-4.json"));
        assert_eq!(report["checkpoint"]["step"], 20, "{choice}");
    }
    let err = eval_err(scratch.path(), "step-7", &["--checkpoint", "step-7"]);
    assert!(
        err.contains("keeps no checkpoint of step 7; it keeps steps [20, 30]"),
        "{err}"
    );

    let (root, run) = fixture();
    let copy = scratch.path().join("no-best");
    copy_dir(run, &copy);
    std::fs::remove_dir_all(copy.join("checkpoints/best")).unwrap();
    let out = run_ok(
        root,
        &[
            "eval",
            copy.to_str().unwrap(),
            "--device",
            "cpu",
            "--samples",
            "4",
        ],
    );
    let stdout = stdout(&out);
    assert!(stdout.contains("note: no best checkpoint"), "{stdout}");
    assert_eq!(
        read_json(&copy.join("eval/test-4.json"))["checkpoint"]["step"],
        30
    );
}

#[test]
fn bad_input_gets_a_clear_error() {
    let scratch = tempfile::tempdir().unwrap();
    let (root, run) = fixture();
    // Not a run folder.
    let err = stderr(&run_err(root, &["eval", "nowhere", "--device", "cpu"]));
    assert!(
        err.contains("nowhere") && err.contains("not a run folder"),
        "{err}"
    );

    // A run folder without a checkpoint.
    let bare = scratch.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(run.join("spec.toml"), bare.join("spec.toml")).unwrap();
    let err = stderr(&run_err(
        root,
        &["eval", bare.to_str().unwrap(), "--device", "cpu"],
    ));
    assert!(
        err.contains("no checkpoint to evaluate") && err.contains("--checkpoint PATH"),
        "{err}"
    );

    // A checkpoint of another model shape: the spec now asks for wider second-level filters.
    let (root, run) = fixture();
    let wider = scratch.path().join("wider");
    copy_dir(run, &wider);
    let spec = std::fs::read_to_string(wider.join("spec.toml")).unwrap();
    assert!(spec.contains("filters = [8, 16]"));
    std::fs::write(
        wider.join("spec.toml"),
        spec.replace("filters = [8, 16]", "filters = [8, 24]"),
    )
    .unwrap();
    let err = stderr(&run_err(
        root,
        &["eval", wider.to_str().unwrap(), "--device", "cpu"],
    ));
    for words in [
        "does not fit the model of",
        "model.filters = [8, 24]",
        "variable posterior.encoder.1.0.bias is [16] in the checkpoint but [24] in the model",
        "variables differ",
    ] {
        assert!(err.contains(words), "{words}: {err}");
    }
    // Same through --checkpoint PATH from another run: the mismatch names the variable.
    let latent = scratch.path().join("latent");
    copy_dir(run, &latent);
    let spec = std::fs::read_to_string(latent.join("spec.toml")).unwrap();
    std::fs::write(
        latent.join("spec.toml"),
        spec.replace("latent_dim = 2", "latent_dim = 3"),
    )
    .unwrap();
    let model = run.join("checkpoints/best/model.safetensors");
    let err = stderr(&run_err(
        root,
        &[
            "eval",
            latent.to_str().unwrap(),
            "--device",
            "cpu",
            "--checkpoint",
            model.to_str().unwrap(),
        ],
    ));
    assert!(
        err.contains("fcomb.layers.0.weight is [8, 10, 1, 1] in the checkpoint but [8, 11, 1, 1]"),
        "{err}"
    );

    // A store without the asked split, and a split name that does not exist.
    run_ok(
        root,
        &[
            "prepare",
            "--synthetic",
            "--items",
            "40",
            "--size",
            "32",
            "--split",
            "90,10,0",
            "--out",
            scratch.path().join("no-test").to_str().unwrap(),
        ],
    );
    let stderr = eval_err(
        scratch.path(),
        "missing-split",
        &["--store", scratch.path().join("no-test").to_str().unwrap()],
    );
    assert!(
        stderr.contains("no-test")
            && stderr.contains("the test split is empty")
            && stderr.contains("test 0"),
        "{stderr}"
    );
    let stderr = eval_err(scratch.path(), "bad-split", &["--split", "holdout"]);
    assert!(
        stderr.contains("unknown split \"holdout\": expected train, val or test"),
        "{stderr}"
    );
    let stderr = eval_err(
        scratch.path(),
        "bad-checkpoint",
        &["--checkpoint", "missing/model.safetensors"],
    );
    assert!(
        stderr.contains("--checkpoint missing/model.safetensors: no such file or folder"),
        "{stderr}"
    );
    let stderr = eval_err(scratch.path(), "bad-samples", &["--samples", "0"]);
    assert!(stderr.contains("--samples must be positive"), "{stderr}");
}

#[test]
fn bench_eval_times_both_sides_on_the_same_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "bench-eval",
        "--device",
        "cpu",
        "--size",
        "16",
        "--images",
        "3",
        "--samples",
        "6",
        "--batch",
        "2",
        "--filters",
        "4,8",
        "--repeats",
        "1",
    ];
    let out = run_ok(dir.path(), &args);
    let stdout = stdout(&out);
    assert!(stdout.contains("probunet / PyTorch:"), "{stdout}");
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let out = run_ok(dir.path(), &json_args);
    let rows: Vec<Value> = common::stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (
            rows[0]["implementation"].as_str(),
            rows[1]["implementation"].as_str()
        ),
        (Some("probunet"), Some("pytorch"))
    );
    for row in &rows {
        assert_eq!(
            (row["images"].as_u64(), row["samples"].as_u64()),
            (Some(3), Some(6))
        );
        assert!(row["images_per_s"].as_f64().unwrap() > 0.0);
    }
    // The same weights, images and noise: the same samples and scores on both sides.
    for key in ["mean_ged", "mean_hm_iou", "mean_diversity"] {
        let (a, b) = (
            rows[0][key].as_f64().unwrap(),
            rows[1][key].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-6, "{key}: probunet {a}, PyTorch {b}");
    }
}

/// A `best` checkpoint that is there but damaged is said to be so, not passed over as if
/// validation had never given a finite GED; `--checkpoint last` still evaluates.
#[test]
fn a_damaged_best_checkpoint_is_named_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let run = common::trained_run(dir.path());
    let best = run.join("checkpoints/best");
    assert!(best.join("model.safetensors").is_file());
    std::fs::remove_file(best.join("model.safetensors")).unwrap();
    let run_arg = run.to_str().unwrap();
    let out = run_err(dir.path(), &["eval", run_arg, "--samples", "2"]);
    let err = stderr(&out);
    let want = format!("{} is damaged (no model.safetensors in it)", best.display());
    assert!(err.contains(&want), "{err}");
    run_ok(
        dir.path(),
        &["eval", run_arg, "--checkpoint", "last", "--samples", "2"],
    );
}

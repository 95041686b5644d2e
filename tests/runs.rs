//! `probunet runs`: every run and sweep trial of a folder in one table or CSV.
mod common;

use common::{run_err, run_ok, stderr, stdout};
use std::collections::BTreeMap;

/// `probunet runs --csv` as one map per row, by column name.
fn csv_rows(text: &str) -> Vec<BTreeMap<String, String>> {
    common::csv_maps(csv::Reader::from_reader(text.as_bytes()))
}

#[test]
fn runs_lists_plain_runs_and_sweep_trials_from_what_is_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::write_spec(dir.path(), "");
    let spec = spec.to_str().unwrap();
    for beta in ["1.0", "3.0"] {
        let beta = format!("model.beta={beta}");
        run_ok(
            dir.path(),
            &["train", spec, "--set", "train.steps=10", "--set", &beta],
        );
    }
    let sweep = dir.path().join("sweep.toml");
    std::fs::write(
        &sweep,
        "[sweep]\nbase = \"tiny.toml\"\nname = \"s\"\n[sweep.grid]\n\"train.steps\" = [5]\n",
    )
    .unwrap();
    run_ok(dir.path(), &["sweep", sweep.to_str().unwrap()]);
    // Neither a run nor a sweep: left out.
    std::fs::create_dir(dir.path().join("runs/notes")).unwrap();

    let rows = csv_rows(&stdout(&run_ok(dir.path(), &["runs", "--csv"])));
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str()).collect();
    assert_eq!(names.len(), 3, "{rows:#?}");
    assert!(
        names[0].starts_with("tiny-") && names[1].starts_with("tiny-"),
        "{names:?}"
    );
    assert_eq!(names[2], "s/00-steps5");
    let field = |key: &str| rows.iter().map(|r| r[key].as_str()).collect::<Vec<_>>();
    assert_eq!(field("status"), ["finished"; 3]);
    assert_eq!(field("steps"), ["10", "10", "5"]);
    assert_eq!(field("total_steps"), ["10", "10", "5"]);
    assert_eq!(field("beta"), ["1.0", "3.0", "1.0"]);
    assert_eq!(field("latent_dim"), ["2", "2", "2"]);
    assert!(
        field("data").iter().all(|d| d.starts_with("synthetic-")),
        "{rows:#?}"
    );
    for row in &rows {
        let ged: f64 = row["best_val_ged"].parse().unwrap();
        let last: f64 = row["final_val_ged"].parse().unwrap();
        assert!(ged.is_finite() && ged <= last, "{row:?}");
        assert!(row["elbo"].parse::<f64>().unwrap() < 0.0, "{row:?}");
    }

    let table = stdout(&run_ok(dir.path(), &["runs", "runs", "--sort", "steps"]));
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("name") && lines[0].contains("best GED"),
        "{table}"
    );
    assert!(
        lines[1].starts_with("tiny-") && lines[1].contains("10/10"),
        "{table}"
    );
    assert!(
        lines[3].starts_with("s/00-steps5") && lines[3].contains("5/5"),
        "{table}"
    );
    assert_eq!(lines[4], "3 runs");

    // eval on the sweep folder names its trials instead of "not a run folder".
    let err = stderr(&run_err(dir.path(), &["eval", "runs/s"]));
    assert!(
        err.contains(
            "runs/s is a sweep folder, not a run: evaluate one of its trials (runs/s/00-steps5)"
        ),
        "{err}"
    );
}

#[test]
fn runs_says_what_it_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let err = stderr(&run_err(dir.path(), &["runs", "nowhere"]));
    assert!(
        err.contains("cannot list runs in nowhere") && err.contains("probunet train"),
        "{err}"
    );
    let run = common::trained_run(dir.path());
    std::fs::remove_file(run.join("meta.json")).unwrap();
    let table = stdout(&run_ok(dir.path(), &["runs"]));
    let name = run.file_name().unwrap().to_str().unwrap();
    assert!(table.contains(&format!("{name}: ")), "{table}");
    assert!(table.contains("meta.json"), "{table}");
    let rows = csv_rows(&stdout(&run_ok(dir.path(), &["runs", "--csv"])));
    assert_eq!(rows[0]["steps"], "10");
    assert!(rows[0]["note"].contains("meta.json"), "{rows:?}");
}

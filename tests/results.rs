//! `scripts/results.sh` and `scripts/results.py`, the study behind docs/results.md, run
//! end to end on a tiny copy of the study: the page is written from the runs' own outputs,
//! a second run retrains and re-evaluates nothing, and a missing evaluation is named.
mod common;

use common::{read_json, repo};
use std::path::Path;
use std::process::Command;

/// A repository-shaped folder with the two scripts and a tiny study's specs.
fn study(root: &Path) {
    for dir in ["scripts", "experiments", "docs"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    for script in ["results.sh", "results.py"] {
        let to = root.join("scripts").join(script);
        std::fs::copy(repo().join("scripts").join(script), to).unwrap();
    }
    let experiments = root.join("experiments");
    // The suite's small experiment, 6 steps validated every 3, stands in for synthetic.toml.
    let spec = common::tiny_spec(6, 3, "");
    std::fs::write(experiments.join("synthetic.toml"), spec).unwrap();
    std::fs::write(
        experiments.join("synthetic-sweep.toml"),
        "[sweep]\nbase = \"synthetic.toml\"\nrepeats = 2\n\
         [sweep.grid]\nbeta = [0.1, 10]\nlatent_dim = [2]\n",
    )
    .unwrap();
    // Every trial of this one diverges: the page lists failed trials instead of them.
    std::fs::write(
        experiments.join("synthetic-clamp.toml"),
        "[sweep]\nbase = \"synthetic.toml\"\nrepeats = 2\n\
         set = { \"model.log_sigma_clamp\" = 20, \"train.lr\" = 1e12 }\n\
         [sweep.grid]\nbeta = [0.1]\nlatent_dim = [2]\n",
    )
    .unwrap();
    std::fs::write(
        experiments.join("synthetic-baseline.toml"),
        "[sweep]\nbase = \"synthetic.toml\"\nrepeats = 2\nset = { \"model.beta\" = 1000 }\n",
    )
    .unwrap();
}

fn results_sh(root: &Path) -> std::process::Output {
    let out = Command::new("bash")
        .arg("scripts/results.sh")
        .current_dir(root)
        .env("PROBUNET", env!("CARGO_BIN_EXE_probunet"))
        .env("PROBUNET_PYTHON", common::python())
        .env("JOBS", "1")
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    out
}

#[test]
fn the_results_page_is_written_from_the_study_and_regenerates_without_retraining() {
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    study(root);
    results_sh(root);
    let page = std::fs::read_to_string(root.join("docs/results.md")).unwrap();

    // The ideal model's row and the headline carry the evaluation's own numbers.
    let trial = root.join("runs/synthetic-sweep/00-beta0.1-latent_dim2-seed0");
    let report = read_json(&trial.join("eval/test-100.json"));
    let ideal = report["ideal"]["metrics"]["phiseg"]["ged"]["mean"]
        .as_f64()
        .unwrap();
    let (_, at_100) = page
        .split_once("### 100 samples per image")
        .unwrap_or_else(|| panic!("{page}"));
    let ideal_row = at_100
        .lines()
        .find(|l| l.starts_with("| ideal model | "))
        .unwrap_or_else(|| panic!("{page}"));
    assert!(ideal_row.contains(&format!("{ideal:.3} [")), "{ideal_row}");
    assert!(
        page.contains(&format!("against the ideal model's {ideal:.3}")),
        "{page}"
    );
    for row in ["| beta 0.1, latent_dim 2 |", "| beta 10, latent_dim 2 |"] {
        assert!(page.contains(row), "{row} in {page}");
    }
    assert!(page.contains("| deterministic baseline (beta 1000) |"));
    let failed = page
        .split_once("## Trials that failed")
        .unwrap_or_else(|| panic!("{page}"))
        .1;
    for trial in [
        "00-beta0.1-latent_dim2-seed0",
        "01-beta0.1-latent_dim2-seed1",
    ] {
        assert!(
            failed.contains(&format!("| synthetic-clamp/{trial} |")),
            "{failed}"
        );
    }
    assert!(failed.contains("non-finite"), "{failed}");
    assert!(page.contains("AVX"), "the machine is named: {page}");
    // Every picture the page shows is there, copied whole.
    let images: Vec<&str> = page
        .lines()
        .filter_map(|l| l.strip_prefix("![")?.split("](").nth(1)?.strip_suffix(')'))
        .collect();
    assert_eq!(images.len(), 6, "{images:?}");
    for image in &images {
        let bytes = std::fs::read(root.join("docs").join(image)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "{image}");
    }
    let leftovers = common::entries(&root.join("docs/img/results"));
    assert!(
        leftovers.iter().all(|e| !e.contains(".tmp")),
        "{leftovers:?}"
    );

    // Again: nothing is trained or evaluated twice, and the page comes out the same.
    let modified = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let evaluated = modified(&trial.join("eval/test-100.json"));
    let out = results_sh(root);
    assert!(
        !common::text(&out).contains("eval test:"),
        "{}",
        common::text(&out)
    );
    assert_eq!(modified(&trial.join("eval/test-100.json")), evaluated);
    assert_eq!(
        std::fs::read_to_string(root.join("docs/results.md")).unwrap(),
        page
    );

    // The page is only read from outputs: a missing evaluation is named, not guessed.
    std::fs::remove_file(trial.join("eval/test-100.json")).unwrap();
    let out = Command::new(common::python())
        .arg("scripts/results.py")
        .current_dir(root)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert!(
        err.contains("00-beta0.1-latent_dim2-seed0/eval/test-100.json is missing"),
        "{err}"
    );
}

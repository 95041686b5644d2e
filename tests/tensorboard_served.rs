//! Runs as TensorBoard serves them: the real `tensorboard` on a free loopback port, read
//! through its HTTP data API (scripts/tensorboard_api.py), which is what its dashboards
//! are drawn from: runs, grouped scalar tags, the custom-scalars layout, images, text and
//! HParams sessions that compare plain runs.
use serde_json::Value;
use std::ffi::OsStr;
use std::path::Path;

mod common;
use common::{metrics, run_ok};
use probunet::run::Phase;

fn train(dir: &Path, name: &str, beta: &str) -> String {
    let spec = common::write_spec(dir, "");
    run_ok(
        dir,
        &[
            "train",
            spec.to_str().unwrap(),
            "--set",
            "train.steps=20",
            "--set",
            "train.val_every=10",
            "--set",
            &format!("name={name}"),
            "--set",
            &format!("model.beta={beta}"),
        ],
    );
    let runs = std::fs::read_dir(dir.join("runs")).unwrap();
    runs.map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| n.starts_with(&format!("{name}-")))
        .unwrap()
}

fn steps(points: &Value) -> Vec<u64> {
    points
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_u64().unwrap())
        .collect()
}

#[test]
fn tensorboard_serves_grouped_tags_layout_images_text_and_hparams() {
    let dir = tempfile::tempdir().unwrap();
    let a = train(dir.path(), "a", "1");
    let b = train(dir.path(), "b", "3");
    let run_a = dir.path().join("runs").join(&a);
    run_ok(
        dir.path(),
        &[
            "eval",
            run_a.to_str().unwrap(),
            "--samples",
            "4",
            "--bootstrap",
            "40",
        ],
    );
    let eval = format!("{a}/eval");
    let logdir = dir.path().join("runs");
    let args: Vec<&OsStr> = vec![logdir.as_os_str(), a.as_ref(), b.as_ref(), eval.as_ref()];
    let served: Value =
        serde_json::from_str(&common::run_script("tensorboard_api.py", &args)).unwrap();

    for plugin in ["scalars", "images", "text", "custom_scalars", "hparams"] {
        assert_eq!(
            served["plugins"][plugin], true,
            "{plugin}: {}",
            served["plugins"]
        );
    }
    // Tags in groups, constants (beta, a constant learning rate) not charted.
    let tags: Vec<&str> = served["scalar_tags"][&a]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    for tag in &tags {
        let group = tag.split('/').next().unwrap();
        assert!(
            ["train", "val", "perf", "hparams"].contains(&group),
            "{tag}"
        );
    }
    assert!(
        tags.contains(&"val/ged_ideal") && tags.contains(&"train/elbo"),
        "{tags:?}"
    );
    assert!(!tags
        .iter()
        .any(|t| t.contains("beta") || t.contains("learning_rate")));
    let scalars = &served["scalars"][&a];
    assert_eq!(
        steps(&scalars["val/ged"]),
        [0, 10, 20],
        "validation at step 0 too"
    );
    assert_eq!(steps(&scalars["val/ged_ideal"]), [0, 10, 20]);

    // val GED and the ideal in one custom-scalars chart.
    let charts: Vec<&Value> = served["layout"]["category"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["chart"].as_array().unwrap())
        .collect();
    assert!(
        charts
            .iter()
            .any(|c| c["multiline"]["tag"] == serde_json::json!(["^val/ged$", "^val/ged_ideal$"])),
        "{}",
        served["layout"]
    );

    // Labelled figures: validation grids at each validation, eval's best/median/worst.
    let grids = served["images"][&a]["val/samples"].as_array().unwrap();
    assert_eq!(
        grids
            .iter()
            .map(|g| g["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [0, 10, 20]
    );
    assert!(grids
        .iter()
        .all(|g| g["height"].as_u64().unwrap() > 4 * 128));
    for which in ["best", "median", "worst"] {
        let figure = &served["images"][&eval][format!("eval/test-4/{which}")][0];
        assert!(
            figure["height"].as_u64().unwrap() > 128,
            "{which}: {figure}"
        );
    }

    // The spec as text; eval's results as a table, not single-dot charts.
    let spec = served["text"][&a]["run/spec"][0][1].as_str().unwrap();
    assert!(
        spec.contains("<code>") && spec.contains("batch = 8"),
        "{spec}"
    );
    let table = served["text"][&eval]["eval/test-4/summary"][0][1]
        .as_str()
        .unwrap();
    assert!(
        table.contains("<table>") && table.contains("hm_iou"),
        "{table}"
    );
    assert!(
        served["scalar_tags"][&eval].is_null(),
        "{}",
        served["scalar_tags"]
    );

    // HParams: plain runs are sessions, named in full, with best and final val GED.
    let names: Vec<&str> = served["hparams"]["hparamInfos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"model.beta") && names.contains(&"run"),
        "{names:?}"
    );
    let groups = served["session_groups"]["sessionGroups"]
        .as_array()
        .unwrap();
    assert_eq!(groups.len(), 2, "{groups:?}");
    for (name, beta) in [(&a, 1.0), (&b, 3.0)] {
        let group = groups
            .iter()
            .find(|g| g["hparams"]["run"] == name.as_str())
            .unwrap();
        assert_eq!(group["hparams"]["model.beta"], beta);
        let metric = |tag: &str| {
            group["metricValues"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"]["tag"] == tag)
                .unwrap_or_else(|| panic!("{tag} in {group}"))["value"]
                .as_f64()
                .unwrap()
        };
        let vals = metrics(&dir.path().join("runs").join(name), Phase::Val);
        let last = vals.last().unwrap().ged.unwrap();
        let best = vals[1..]
            .iter()
            .map(|r| r.ged.unwrap())
            .fold(f64::INFINITY, f64::min);
        assert!((metric("hparams/final_val_ged") - last).abs() < 1e-5);
        assert!((metric("hparams/best_val_ged") - best).abs() < 1e-5);
    }
}

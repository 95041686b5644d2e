//! The README's main job learns: a shortened quickstart run on the CPU ends with a
//! validation GED far below an untrained model's and reports the ideal-model reference.
mod common;

use std::process::Command;

fn val_ged(stdout: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("val GED"))
        .unwrap_or_else(|| panic!("no val GED in:\n{stdout}"));
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

#[test]
fn the_quickstart_visibly_learns() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::repo().join("experiments/quickstart.toml");
    let train = |steps: u32| {
        let out = Command::new(env!("CARGO_BIN_EXE_probunet"))
            .current_dir(dir.path())
            .args([
                "train",
                spec.to_str().unwrap(),
                "--device",
                "cpu",
                "--plain",
            ])
            .args([
                "--set",
                &format!("train.steps={steps}"),
                "--set",
                &format!("train.val_every={steps}"),
            ])
            .args([
                "--set",
                "train.checkpoint_every=0",
                "--set",
                "log.images=false",
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let untrained = val_ged(&train(1));
    let stdout = train(300);
    let trained = val_ged(&stdout);
    assert!(stdout.contains("ideal-model reference"), "{stdout}");
    assert!(
        untrained > 0.65,
        "an untrained model scores GED {untrained}"
    );
    assert!(
        trained < 0.6,
        "after 300 steps the val GED is {trained} (untrained {untrained})"
    );
}

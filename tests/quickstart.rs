//! The README's main job learns: the quickstart run on the CPU, its full 600 steps, ends
//! with a validation GED far below an untrained model's and reports the ideal-model
//! reference. (Shortened to 300 steps, a shorter cosine schedule, it ended at 0.33 or at
//! 0.58 depending on float rounding alone, too near any bound to pin; the full run ended at
//! 0.318 and 0.487 for the same two builds, 2-core Zen 5, 2026-12-02; with the Winograd
//! convolutions 0.297, and with their weight gradients too 0.372, 2-core Zen 4,
//! 2026-12-03.)
mod common;

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
        let mut cmd = common::probunet(
            dir.path(),
            &[
                "train",
                spec.to_str().unwrap(),
                "--device",
                "cpu",
                "--plain",
                "--set",
                &format!("train.steps={steps}"),
                "--set",
                &format!("train.val_every={steps}"),
                "--set",
                "train.checkpoint_every=0",
                "--set",
                "log.images=false",
            ],
        );
        // libtorch's own thread count, as the README's run gets, not the runner's one.
        match std::env::var_os("OMP_NUM_THREADS") {
            Some(threads) => cmd.env("OMP_NUM_THREADS", threads),
            None => cmd.env_remove("OMP_NUM_THREADS"),
        };
        common::stdout(&common::expect_success(&mut cmd))
    };
    let untrained = val_ged(&train(1));
    let stdout = train(600);
    let trained = val_ged(&stdout);
    assert!(stdout.contains("ideal-model reference"), "{stdout}");
    assert!(
        untrained > 0.65,
        "an untrained model scores GED {untrained}"
    );
    assert!(
        trained < 0.6,
        "after 600 steps the val GED is {trained} (untrained {untrained})"
    );
}

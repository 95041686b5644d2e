//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Python that has torch, numpy and tensorboard: `$PROBUNET_PYTHON`, else the
/// project's `.venv`. Missing is a failure, not a skip: the README's test command sets it up.
pub fn python() -> PathBuf {
    let path = std::env::var_os("PROBUNET_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"));
    assert!(
        path.exists(),
        "no Python environment at {}: run scripts/setup.sh (or set PROBUNET_PYTHON)",
        path.display()
    );
    path
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a script from `scripts/` with the project's Python and returns its stdout;
/// a non-zero exit fails the test with the script's stderr.
pub fn run_script(script: &str, args: &[&std::ffi::OsStr]) -> String {
    let output = Command::new(python())
        .arg(repo().join("scripts").join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running scripts/{script}: {e}"));
    assert!(
        output.status.success(),
        "scripts/{script} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

/// The text of a small, fast experiment: 32x32 synthetic images, a two-level model,
/// `steps` CPU steps validated every `val_every`; `log` adds keys to its `[log]` table.
pub fn tiny_spec(steps: u32, val_every: u32, log: &str) -> String {
    format!(
        r#"name = "tiny"
[data.synthetic]
items = 120
size = 32
seed = 1

[model]
filters = [8, 16]
beta = 1.0
reconstruction = "batch_mean"

[train]
batch = 8
steps = {steps}
lr = 1e-3
val_every = {val_every}
val_samples = 4
checkpoint_every = 10
keep_last = 2
device = "cpu"

[log]
every = 5
runs_dir = "runs"
{log}"#
    )
}

/// Writes [`tiny_spec`] (60 steps) as `tiny.toml` in `dir`; `extra` goes into `[log]`.
pub fn write_spec(dir: &Path, extra: &str) -> PathBuf {
    let spec = tiny_spec(60, 20, extra);
    let path = dir.join("tiny.toml");
    std::fs::write(&path, spec).unwrap();
    path
}

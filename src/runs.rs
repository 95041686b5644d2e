//! `probunet runs`: one row per run folder and sweep trial under a folder, read from what
//! is on disk (spec.toml, meta.json, metrics.csv, a trial's status.json), so that runs
//! outside a sweep can be listed and compared too.

use crate::config::{self, Experiment};
use crate::data::split::SplitName;
use crate::data::store::read_manifest;
use crate::run::{read_rows_but_torn_tail, Phase, RunDir, RunLock, SPEC_FILE};
use crate::sweep::plan::PLAN_FILE;
use crate::sweep::trial::Status;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RunsError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One run, as `probunet runs` shows it. Missing values (no validation yet, a run from
/// before a field was recorded) are `None`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunRow {
    /// The folder, relative to the listed one (`<sweep>/<trial>` for trials).
    pub name: String,
    pub started_at: Option<DateTime<Utc>>,
    /// finished, running, stopped (a plain run short of its steps), or a trial's state.
    pub status: String,
    /// The last logged training step.
    pub steps: u64,
    pub total_steps: Option<u64>,
    pub best_val_ged: Option<f64>,
    pub best_val_hm_iou: Option<f64>,
    pub best_step: Option<u64>,
    pub final_val_ged: Option<f64>,
    pub final_val_hm_iou: Option<f64>,
    /// The last training interval's ELBO and KL.
    pub elbo: Option<f64>,
    pub kl: Option<f64>,
    /// The store's folder name.
    pub data: Option<String>,
    pub beta: Option<f64>,
    pub latent_dim: Option<i64>,
    pub lr: Option<f64>,
    pub batch: Option<usize>,
    /// What could not be read, if anything.
    pub note: Option<String>,
}

/// Every run folder in `dir` and every trial of every sweep folder in it, by name.
pub fn list(dir: &Path) -> Result<Vec<RunRow>, RunsError> {
    let mut rows = Vec::new();
    for (name, path) in subfolders(dir)? {
        if path.join(SPEC_FILE).is_file() {
            rows.push(row(name, &path));
        } else if path.join(PLAN_FILE).is_file() {
            for (trial, trial_path) in subfolders(&path)? {
                if trial_path.join(SPEC_FILE).is_file() {
                    rows.push(row(format!("{name}/{trial}"), &trial_path));
                }
            }
        }
    }
    Ok(rows)
}

/// The folders in `dir`, sorted by name; hidden ones are left out.
fn subfolders(dir: &Path) -> Result<Vec<(String, PathBuf)>, RunsError> {
    let io = |source| RunsError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && entry.file_type().is_ok_and(|t| t.is_dir()) {
            found.push((name, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// What the folder says of itself; unreadable parts leave their fields empty and a note.
fn row(name: String, path: &Path) -> RunRow {
    let mut notes = Vec::new();
    let experiment = config::load(&path.join(SPEC_FILE), &[], &[])
        .map(|resolved| resolved.experiment)
        .map_err(|e| notes.push(e.to_string()))
        .ok();
    let meta = RunDir::open(path).and_then(|run| run.read_meta());
    let meta = meta.map_err(|e| notes.push(e.to_string())).ok();
    let rows = read_rows_but_torn_tail(&path.join(crate::run::METRICS_FILE))
        .map_err(|e| notes.push(e.to_string()))
        .unwrap_or_default();
    let curves = Curves::of(&rows);
    let store = meta.as_ref().and_then(|m| m.store.clone());
    let total_steps = experiment
        .as_ref()
        .and_then(|e| planned_steps(e, store.as_deref()));
    RunRow {
        name,
        started_at: meta.as_ref().map(|m| m.started_at),
        status: status(path, total_steps),
        steps: curves.steps,
        total_steps,
        best_val_ged: curves.best.map(|b| b.0),
        best_val_hm_iou: curves.best.and_then(|b| b.1),
        best_step: curves.best.map(|b| b.2),
        final_val_ged: curves.last_val.map(|v| v.0),
        final_val_hm_iou: curves.last_val.and_then(|v| v.1),
        elbo: curves.elbo,
        kl: curves.kl,
        data: store.and_then(|s| Some(s.file_name()?.to_string_lossy().into_owned())),
        beta: experiment.as_ref().map(|e| e.model.beta),
        latent_dim: experiment.as_ref().map(|e| e.model.latent_dim),
        lr: experiment.as_ref().map(|e| e.train.lr),
        batch: experiment.as_ref().map(|e| e.train.batch),
        note: (!notes.is_empty()).then(|| notes.join("; ")),
    }
}

/// What metrics.csv says: the last training step and its terms, the last validation and
/// the best one (lowest GED) as (GED, HM-IoU, step).
#[derive(Debug, Default)]
struct Curves {
    steps: u64,
    elbo: Option<f64>,
    kl: Option<f64>,
    last_val: Option<(f64, Option<f64>)>,
    best: Option<(f64, Option<f64>, u64)>,
}

impl Curves {
    fn of(rows: &[crate::run::MetricsRow]) -> Curves {
        let mut curves = Curves::default();
        for row in rows {
            match row.phase {
                Phase::Train => {
                    curves.steps = curves.steps.max(row.step);
                    (curves.elbo, curves.kl) = (row.elbo, row.kl);
                }
                Phase::Val => {
                    let Some(ged) = row.ged.filter(|g| g.is_finite()) else {
                        continue;
                    };
                    curves.last_val = Some((ged, row.hm_iou));
                    // Step 0 scores the untrained model: a baseline, never the best.
                    if row.step > 0 && curves.best.is_none_or(|(best, _, _)| ged < best) {
                        curves.best = Some((ged, row.hm_iou, row.step));
                    }
                }
            }
        }
        curves
    }
}

/// The spec's steps, or its epochs times the batches of the store's train split.
fn planned_steps(experiment: &Experiment, store: Option<&Path>) -> Option<u64> {
    if let Some(steps) = experiment.train.steps {
        return Some(steps);
    }
    let manifest = read_manifest(store?).ok()?;
    let train_items = manifest.split.indices(SplitName::Train).len();
    crate::train::planned_steps(experiment, train_items)
}

/// A trial's own state; for a plain run, running while its lock is held, else finished
/// when its last checkpoint is at its planned steps and stopped when not. (The metrics
/// are not enough: a run that fails on its last step, a non-finite weight say, has
/// logged that step but saved nothing.)
fn status(path: &Path, total: Option<u64>) -> String {
    if let Some(status) = Status::read(path) {
        return status.state.as_str().into();
    }
    if RunLock::is_held(path) {
        return "running".into();
    }
    let saved = RunDir::open(path)
        .ok()
        .and_then(|run| run.checkpoint_step());
    match (saved, total) {
        (Some(saved), Some(total)) if saved >= total => "finished".into(),
        _ => "stopped".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::MetricsRow;

    #[test]
    fn a_plain_run_is_finished_only_once_its_last_step_is_saved() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create_in(&dir.path().join("r")).unwrap();
        std::fs::write(run.spec_path(), "").unwrap();
        assert_eq!(status(&run.path, Some(4)), "stopped");
        std::fs::create_dir_all(run.path.join("checkpoints/step-00000002")).unwrap();
        assert_eq!(status(&run.path, Some(4)), "stopped");
        std::fs::create_dir_all(run.path.join("checkpoints/step-00000004")).unwrap();
        assert_eq!(status(&run.path, Some(4)), "finished");
        assert_eq!(status(&run.path, None), "stopped");
    }

    fn val(step: u64, ged: f64) -> MetricsRow {
        let mut row = MetricsRow::new(step, 0, Phase::Val);
        row.ged = Some(ged);
        row.hm_iou = Some(ged / 10.0);
        row
    }

    #[test]
    fn the_best_validation_is_the_lowest_finite_ged() {
        let mut train = MetricsRow::new(30, 1, Phase::Train);
        train.elbo = Some(-12.0);
        let rows = [
            val(10, 0.5),
            val(20, 0.3),
            val(25, f64::NAN),
            train,
            val(30, 0.4),
        ];
        let curves = Curves::of(&rows);
        assert_eq!(curves.steps, 30);
        assert_eq!(curves.elbo, Some(-12.0));
        assert_eq!(curves.best, Some((0.3, Some(0.03), 20)));
        assert_eq!(curves.last_val, Some((0.4, Some(0.04))));
    }
}

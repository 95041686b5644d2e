//! The run folder, `runs/<name>-<timestamp>/` or a sweep's `runs/<sweep>/<trial>/`: one
//! training run's resolved spec, provenance, metrics.csv, TensorBoard events,
//! checkpoints, evaluations and lock. Training writes it; eval, sweep and predict read
//! it. Every file it holds is named here, and written atomically (temporary name, then
//! rename) unless it is appended to.
mod checkpoint;
mod curves;
mod lock;
mod metrics;
pub mod safetensors;

pub use checkpoint::{
    check_finite, first_non_finite, shape_mismatch, Checkpoint, Checkpoints, OpenInterval,
    TrainState, MODEL_FILE, STATE_FILE,
};
pub use curves::{write_curves, CURVES_FILE};
pub use lock::RunLock;
pub use metrics::{read_rows, read_rows_but_torn_tail, MetricsCsv, MetricsRow, Phase, StepStats};

use crate::config::Experiment;
use crate::data::prepare::Summary;
use crate::data::source::DataSource;
use crate::data::store::Store;
use crate::data::DataError;
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};

/// The resolved spec, each value annotated with where it came from.
pub const SPEC_FILE: &str = "spec.toml";
/// What names a file while [`write_atomic`] writes it: `spec.toml` is `spec<TEMPORARY><pid>`.
pub const TEMPORARY: &str = ".tmp-";
/// Provenance: version, commit, command, device, the store read.
pub const META_FILE: &str = "meta.json";
pub const METRICS_FILE: &str = "metrics.csv";
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// `probunet eval`'s results.
pub const EVAL_DIR: &str = "eval";
/// Held (flock) by the one process that writes into the run.
pub const LOCK_FILE: &str = ".lock";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file of the run that is there but unreadable: a torn CSV line, bad JSON.
    #[error("{}: {why}", path.display())]
    Corrupt { path: PathBuf, why: String },
    #[error("checkpoint {}: {why}", path.display())]
    Checkpoint { path: PathBuf, why: String },
    #[error("{}: not a run folder (no {SPEC_FILE})", path.display())]
    NotARun { path: PathBuf },
    #[error("{}: already holds a run ({SPEC_FILE} exists); resume it instead", path.display())]
    AlreadyARun { path: PathBuf },
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("data: set data.store or data.synthetic")]
    NoData,
    #[error(
        "{} is in use by another probunet process (it holds {}); wait for it to finish or stop it",
        path.display(), path.join(LOCK_FILE).display()
    )]
    Locked { path: PathBuf },
}

impl RunError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        RunError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Writes `path` atomically and durably: a temporary name beside it, synced, then a rename
/// and a sync of the folder, so a reader, a crash or a power cut sees the old contents or
/// the new, never a mix or an empty file.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), RunError> {
    let mut tmp = path.with_extension("").into_os_string();
    tmp.push(format!("{TEMPORARY}{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let written = crate::sys::write_synced(&tmp, contents).map_err(|e| RunError::io(&tmp, e));
    let renamed = written.and_then(|()| fs::rename(&tmp, path).map_err(|e| RunError::io(path, e)));
    if renamed.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    renamed?;
    sync_parent(path)
}

/// Syncs the folder holding `path`, which makes a rename into it durable.
pub fn sync_parent(path: &Path) -> Result<(), RunError> {
    let parent = crate::sys::parent_dir(path);
    crate::sys::sync_dir(parent).map_err(|e| RunError::io(parent, e))
}

/// A value written as pretty JSON, atomically.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<(), RunError> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| RunError::Corrupt {
        path: path.to_path_buf(),
        why: format!("cannot serialise: {e}"),
    })?;
    write_atomic(path, &json)
}

/// `meta.json`: what made the run, and the store it reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub probunet_version: String,
    pub git_commit: Option<String>,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub command: Vec<String>,
    pub device: String,
    pub libtorch: String,
    /// The store's absolute path, so that the run works from any working folder. Runs
    /// made before it was recorded lack it.
    #[serde(default)]
    pub store: Option<PathBuf>,
}

impl Meta {
    /// This process's provenance, for a run on `device` reading `store`.
    pub fn now(device: String, store: &Path) -> Meta {
        Meta {
            probunet_version: env!("CARGO_PKG_VERSION").into(),
            git_commit: option_env!("PROBUNET_GIT_COMMIT").map(Into::into),
            started_at: chrono::Utc::now(),
            command: std::env::args().collect(),
            device,
            libtorch: (crate::sys::libtorch().version).unwrap_or_else(|| "unknown".into()),
            store: Some(std::path::absolute(store).unwrap_or_else(|_| store.to_path_buf())),
        }
    }
}

/// Where the experiment's data comes from, as its spec says.
pub fn data_source(experiment: &Experiment) -> Result<DataSource, RunError> {
    let data = &experiment.data;
    DataSource::of(data.store.as_deref(), data.synthetic.as_ref()).ok_or(RunError::NoData)
}

/// A run folder.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    /// A new, empty `runs_dir/<name>-<YYYYmmdd-HHMMSS>` (with a counter if that exists).
    pub fn create(runs_dir: &Path, name: &str) -> Result<RunDir, RunError> {
        fs::create_dir_all(runs_dir).map_err(|e| RunError::io(runs_dir, e))?;
        let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
        let mut attempt = 1u32;
        loop {
            let folder = match attempt {
                1 => format!("{name}-{stamp}"),
                n => format!("{name}-{stamp}-{n}"),
            };
            let path = runs_dir.join(folder);
            match fs::create_dir(&path) {
                Ok(()) => return Ok(RunDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => attempt += 1,
                Err(e) => return Err(RunError::io(&path, e)),
            }
        }
    }

    /// The folder `dir` for a new run (a sweep's trial folder): created if missing; it
    /// must not hold a run yet. Other files in it are left alone.
    pub fn create_in(dir: &Path) -> Result<RunDir, RunError> {
        fs::create_dir_all(dir).map_err(|e| RunError::io(dir, e))?;
        if dir.join(SPEC_FILE).exists() {
            return Err(RunError::AlreadyARun {
                path: dir.to_path_buf(),
            });
        }
        Ok(RunDir {
            path: dir.to_path_buf(),
        })
    }

    /// An existing run folder.
    pub fn open(path: &Path) -> Result<RunDir, RunError> {
        if !path.join(SPEC_FILE).is_file() {
            return Err(RunError::NotARun {
                path: path.to_path_buf(),
            });
        }
        Ok(RunDir {
            path: path.to_path_buf(),
        })
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn spec_path(&self) -> PathBuf {
        self.file(SPEC_FILE)
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.file(METRICS_FILE)
    }

    pub fn eval_dir(&self) -> PathBuf {
        self.file(EVAL_DIR)
    }

    /// The run's checkpoints, keeping the last `keep_last`.
    pub fn checkpoints(&self, keep_last: usize) -> Checkpoints {
        Checkpoints::new(self.file(CHECKPOINTS_DIR), keep_last)
    }

    /// The step of the run's latest checkpoint, if it has one.
    pub fn checkpoint_step(&self) -> Option<u64> {
        self.checkpoints(1)
            .steps()
            .ok()?
            .last()
            .map(|(step, _)| *step)
    }

    /// Writes `name` in the run atomically.
    pub fn write_atomic(&self, name: &str, contents: &[u8]) -> Result<(), RunError> {
        write_atomic(&self.file(name), contents)
    }

    pub fn write_meta(&self, meta: &Meta) -> Result<(), RunError> {
        write_json(&self.file(META_FILE), meta)
    }

    pub fn read_meta(&self) -> Result<Meta, RunError> {
        let path = self.file(META_FILE);
        let text = fs::read_to_string(&path).map_err(|e| RunError::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| RunError::Corrupt {
            path,
            why: e.to_string(),
        })
    }

    /// The store the run reads: the absolute path its meta.json recorded, else (a run
    /// from before that was recorded) `fallback`, the spec's store as seen from the
    /// working folder.
    pub fn store_dir(&self, fallback: impl FnOnce() -> PathBuf) -> PathBuf {
        self.read_meta()
            .ok()
            .and_then(|meta| meta.store)
            .unwrap_or_else(fallback)
    }

    /// The store the run reads, generating a synthetic one that is missing: the store
    /// and, when one was generated, what prepare reports.
    pub fn open_store(
        &self,
        experiment: &Experiment,
    ) -> Result<(Store, Option<Summary>), RunError> {
        let source = data_source(experiment)?;
        let fallback = source.dir().to_path_buf();
        Ok(source.at(self.store_dir(|| fallback)).open()?)
    }

    /// Takes the run's lock, or says which process holds it: only one process writes
    /// into a run at a time (training, a resume, a sweep trial).
    pub fn lock(&self) -> Result<RunLock, RunError> {
        RunLock::try_acquire(&self.path)?.ok_or_else(|| RunError::Locked {
            path: self.path.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_folder_is_locked_by_one_process_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create_in(&dir.path().join("r")).unwrap();
        let held = run.lock().unwrap();
        assert!(RunLock::is_held(&run.path));
        let err = run.lock().unwrap_err();
        assert!(
            err.to_string()
                .contains("in use by another probunet process"),
            "{err}"
        );
        drop(held);
        assert!(!RunLock::is_held(&run.path));
        run.lock().unwrap();
    }

    #[test]
    fn meta_records_the_store_as_an_absolute_path() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create_in(dir.path()).unwrap();
        let meta = Meta::now("cpu".into(), Path::new("data/x"));
        run.write_meta(&meta).unwrap();
        let store = run.store_dir(|| PathBuf::from("elsewhere"));
        assert!(
            store.is_absolute() && store.ends_with("data/x"),
            "{store:?}"
        );
        let old = RunDir::create_in(&dir.path().join("old")).unwrap();
        assert_eq!(
            old.store_dir(|| PathBuf::from("fallback")),
            PathBuf::from("fallback")
        );
    }

    #[test]
    fn create_in_refuses_a_folder_that_holds_a_run() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SPEC_FILE), "").unwrap();
        let err = RunDir::create_in(dir.path()).unwrap_err();
        assert!(err.to_string().contains("already holds a run"), "{err}");
        assert!(RunDir::open(dir.path()).is_ok());
        let err = RunDir::open(&dir.path().join("nope")).unwrap_err();
        assert!(err.to_string().contains("not a run folder"), "{err}");
    }
}

//! Checkpoints: `checkpoints/step-<N>/` with the model, the optimiser moments and the
//! training position, each written under a hidden name and renamed into place, so a
//! killed process leaves either a whole checkpoint or none.
use super::TrainError;
use crate::data::loader::LoaderState;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use tch::Tensor;

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";

/// Everything besides tensors that a resumed run needs. Randomness needs no saved state:
/// libtorch's generator is reseeded from (seed, step) at every step and validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Steps completed (the next step to run).
    pub step: u64,
    pub epoch: u64,
    pub loader: LoaderState,
    pub optimizer_steps: u64,
    pub best_val_ged: Option<f64>,
    /// The validation GED measured at this step, if validation ran here.
    pub val_ged: Option<f64>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// A checkpoint on disk.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainState,
}

impl Checkpoint {
    pub fn model_path(&self) -> PathBuf {
        self.dir.join(MODEL_FILE)
    }

    pub fn optimizer_tensors(&self) -> Result<HashMap<String, Tensor>, TrainError> {
        let path = self.dir.join(OPTIMIZER_FILE);
        let tensors = Tensor::read_safetensors(&path).map_err(|e| TrainError::Checkpoint {
            path,
            why: e.to_string(),
        })?;
        Ok(tensors.into_iter().collect())
    }

    /// Reads a checkpoint folder.
    pub fn open(dir: &Path) -> Result<Checkpoint, TrainError> {
        let path = dir.join(STATE_FILE);
        let text = fs::read_to_string(&path).map_err(|e| TrainError::Checkpoint {
            path: path.clone(),
            why: e.to_string(),
        })?;
        let state = serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
            path,
            why: e.to_string(),
        })?;
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            state,
        })
    }
}

/// The checkpoints of a run: `root/step-<N>` (the last `keep_last`) and `root/best`.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    root: PathBuf,
    keep_last: usize,
}

fn io_error(path: &Path, e: std::io::Error) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        why: e.to_string(),
    }
}

impl Checkpoints {
    pub fn new(root: PathBuf, keep_last: usize) -> Self {
        Self {
            root,
            keep_last: keep_last.max(1),
        }
    }

    pub fn best_dir(&self) -> PathBuf {
        self.root.join("best")
    }

    /// Completed step checkpoints, oldest first.
    pub fn steps(&self) -> Result<Vec<(u64, PathBuf)>, TrainError> {
        if !self.root.exists() {
            return Ok(Vec::new());
        }
        let mut found: Vec<(u64, PathBuf)> = fs::read_dir(&self.root)
            .map_err(|e| io_error(&self.root, e))?
            .filter_map(|entry| {
                let path = entry.ok()?.path();
                let step = path
                    .file_name()?
                    .to_str()?
                    .strip_prefix("step-")?
                    .parse()
                    .ok()?;
                Some((step, path))
            })
            .collect();
        found.sort();
        Ok(found)
    }

    pub fn latest(&self) -> Result<Option<Checkpoint>, TrainError> {
        match self.steps()?.last() {
            Some((_, dir)) => Checkpoint::open(dir).map(Some),
            None => Ok(None),
        }
    }

    /// Writes `step-<N>` (and prunes old ones), or replaces `best` when `best` is set.
    pub fn save(
        &self,
        model: &[(String, Tensor)],
        optimizer: &[(String, Tensor)],
        state: &TrainState,
        best: bool,
    ) -> Result<PathBuf, TrainError> {
        let name = if best {
            "best".to_string()
        } else {
            format!("step-{:08}", state.step)
        };
        let target = self.root.join(&name);
        let partial = self.root.join(format!(".{name}.partial"));
        if partial.exists() {
            fs::remove_dir_all(&partial).map_err(|e| io_error(&partial, e))?;
        }
        fs::create_dir_all(&partial).map_err(|e| io_error(&partial, e))?;
        let write = |file: &str, tensors: &[(String, Tensor)]| {
            let path = partial.join(file);
            Tensor::write_safetensors(tensors, &path).map_err(|e| TrainError::Checkpoint {
                path,
                why: e.to_string(),
            })
        };
        write(MODEL_FILE, model)?;
        if !best {
            write(OPTIMIZER_FILE, optimizer)?;
        }
        let state_path = partial.join(STATE_FILE);
        let json = serde_json::to_vec_pretty(state).expect("the state serialises");
        fs::write(&state_path, json).map_err(|e| io_error(&state_path, e))?;
        for file in fs::read_dir(&partial).map_err(|e| io_error(&partial, e))? {
            let path = file.map_err(|e| io_error(&partial, e))?.path();
            fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| io_error(&path, e))?;
        }
        if target.exists() {
            let old = self.root.join(format!(".{name}.old"));
            fs::rename(&target, &old).map_err(|e| io_error(&target, e))?;
            fs::rename(&partial, &target).map_err(|e| io_error(&target, e))?;
            fs::remove_dir_all(&old).map_err(|e| io_error(&old, e))?;
        } else {
            fs::rename(&partial, &target).map_err(|e| io_error(&target, e))?;
        }
        if !best {
            let steps = self.steps()?;
            for (_, dir) in steps
                .iter()
                .take(steps.len().saturating_sub(self.keep_last))
            {
                fs::remove_dir_all(dir).map_err(|e| io_error(dir, e))?;
            }
        }
        Ok(target)
    }
}

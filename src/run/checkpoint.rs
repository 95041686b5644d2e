//! Checkpoints: `checkpoints/step-<N>/` with the model, the optimiser moments and the
//! training position, each written under a hidden name and renamed into place, so a
//! killed process leaves either a whole checkpoint or none.
use super::RunError;
use crate::data::loader::LoaderState;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::{nn, Tensor};

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
    /// The log interval the checkpoint fell inside, so that the resumed run's next
    /// row averages the same steps as an uninterrupted run's.
    #[serde(default)]
    pub interval: Option<OpenInterval>,
}

/// A log interval in progress: what its steps summed so far.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OpenInterval {
    pub steps: u64,
    pub skipped: u64,
    pub sums: super::StepStats,
    /// Seconds it has run.
    pub seconds: f64,
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

    /// The Adam moments, refused when one holds NaN or infinity (a damaged file: a
    /// training step never writes those, and they would turn every later step NaN).
    pub fn optimizer_tensors(&self) -> Result<HashMap<String, Tensor>, RunError> {
        let path = self.dir.join(OPTIMIZER_FILE);
        let tensors = Tensor::read_safetensors(&path).map_err(|e| RunError::Checkpoint {
            path: path.clone(),
            why: super::safetensors::read_error(&e),
        })?;
        let tensors = finite_or_damaged(tensors, "optimizer tensor", &path)?;
        Ok(tensors.into_iter().collect())
    }

    /// Reads a checkpoint folder.
    pub fn open(dir: &Path) -> Result<Checkpoint, RunError> {
        let path = dir.join(STATE_FILE);
        let text = fs::read_to_string(&path).map_err(|e| RunError::Checkpoint {
            path: path.clone(),
            why: e.to_string(),
        })?;
        let state: TrainState = serde_json::from_str(&text).map_err(|e| RunError::Checkpoint {
            path: path.clone(),
            why: e.to_string(),
        })?;
        let named_step = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<u64>().ok());
        state
            .check(named_step)
            .map_err(|why| RunError::Checkpoint { path, why })?;
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            state,
        })
    }
}

impl TrainState {
    /// What a state written by a training step always satisfies: the step its folder is
    /// named after, and no more optimiser steps or epochs than steps.
    fn check(&self, named_step: Option<u64>) -> Result<(), String> {
        if let Some(named) = named_step.filter(|&n| n != self.step) {
            return Err(format!(
                "says step {}, but its folder is step {named}: not a checkpoint probunet wrote",
                self.step
            ));
        }
        if self.optimizer_steps > self.step || self.epoch > self.step {
            return Err(format!(
                "{} optimiser steps and {} epochs in {} steps: not a checkpoint probunet wrote",
                self.optimizer_steps, self.epoch, self.step
            ));
        }
        Ok(())
    }
}

/// The name of the first of `variables` that holds NaN or infinity, if any. All are
/// checked at once (one device sync), and one by one only when one is not finite.
pub fn first_non_finite(variables: &[(String, Tensor)]) -> Result<Option<&str>, tch::TchError> {
    let finite = |t: &Tensor| t.f_isfinite().and_then(|t| t.f_all());
    let each = variables
        .iter()
        .map(|(_, t)| finite(t))
        .collect::<Result<Vec<_>, _>>()?;
    if variables.is_empty() || bool::try_from(Tensor::f_stack(&each, 0)?.f_all()?)? {
        return Ok(None);
    }
    for ((name, _), all) in variables.iter().zip(&each) {
        if !bool::try_from(all)? {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// Refuses weights that hold NaN or infinity, naming the first such variable: training
/// never writes them, so they were damaged or written by something else.
pub fn check_finite(vs: &nn::VarStore, model_file: &Path) -> Result<(), RunError> {
    let variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    finite_or_damaged(variables, "variable", model_file).map(drop)
}

/// `tensors` read from `file`, sorted by name, or an error naming the first that holds
/// NaN or infinity (a `what`, such as "variable").
fn finite_or_damaged(
    mut tensors: Vec<(String, Tensor)>,
    what: &str,
    file: &Path,
) -> Result<Vec<(String, Tensor)>, RunError> {
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let bad = |why: String| RunError::Checkpoint {
        path: file.to_path_buf(),
        why,
    };
    match first_non_finite(&tensors).map_err(|e| bad(e.to_string()))? {
        Some(name) => Err(bad(format!(
            "{what} {name} holds NaN or infinite values; training never writes those, so \
             this checkpoint is damaged"
        ))),
        None => Ok(tensors),
    }
}

/// The variable shapes in a safetensors file, read from its header alone.
fn stored_shapes(path: &Path) -> Result<BTreeMap<String, Vec<i64>>, RunError> {
    let bad = |why: String| RunError::Checkpoint {
        path: path.to_path_buf(),
        why,
    };
    let mut file = File::open(path).map_err(|e| io_error(path, e))?;
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix)
        .map_err(|_| bad("shorter than a safetensors header".into()))?;
    let len = u64::from_le_bytes(prefix);
    if len > 100 << 20 {
        return Err(bad(format!(
            "not a safetensors file (header of {len} bytes)"
        )));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|_| bad("truncated safetensors header".into()))?;
    #[derive(Deserialize)]
    struct Entry {
        shape: Vec<i64>,
    }
    let mut entries: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("unreadable safetensors header: {e}")))?;
    entries.remove("__metadata__");
    entries
        .into_iter()
        .map(|(name, value)| {
            let entry: Entry =
                serde_json::from_value(value).map_err(|e| bad(format!("tensor {name}: {e}")))?;
            Ok((name, entry.shape))
        })
        .collect()
}

/// Whether `model_file` holds exactly the variables of `vs`, with the same shapes. `Ok(None)`
/// when it does; otherwise a description of the first variable (by name) that is missing,
/// extra or shaped differently, with both shapes, and how many differ in all.
pub fn shape_mismatch(vs: &nn::VarStore, model_file: &Path) -> Result<Option<String>, RunError> {
    let stored = stored_shapes(model_file)?;
    let model: BTreeMap<String, Vec<i64>> = vs
        .variables()
        .into_iter()
        .map(|(name, t)| (name, t.size()))
        .collect();
    let mut names: Vec<&String> = stored.keys().chain(model.keys()).collect();
    names.sort();
    names.dedup();
    let total = names.len();
    let differences: Vec<String> = names
        .into_iter()
        .filter_map(|name| match (stored.get(name), model.get(name)) {
            (Some(a), Some(b)) if a == b => None,
            (Some(a), Some(b)) => Some(format!(
                "variable {name} is {a:?} in the checkpoint but {b:?} in the model"
            )),
            (Some(a), None) => Some(format!(
                "the checkpoint has a variable {name} {a:?} that the model lacks"
            )),
            (None, Some(b)) => Some(format!(
                "the model's variable {name} {b:?} is not in the checkpoint"
            )),
            (None, None) => unreachable!("every name comes from one side"),
        })
        .collect();
    Ok(differences.first().map(|first| {
        if differences.len() == 1 {
            first.clone()
        } else {
            format!(
                "{first} ({} of {total} variables differ)",
                differences.len()
            )
        }
    }))
}

/// The checkpoints of a run: `root/step-<N>` (the last `keep_last`) and `root/best`.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    root: PathBuf,
    keep_last: usize,
}

fn io_error(path: &Path, e: std::io::Error) -> RunError {
    RunError::Checkpoint {
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

    /// The folder that holds them.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn best_dir(&self) -> PathBuf {
        self.root.join("best")
    }

    /// Completed step checkpoints, oldest first.
    pub fn steps(&self) -> Result<Vec<(u64, PathBuf)>, RunError> {
        if !self.root_exists()? {
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

    /// Whether the checkpoints folder is there: an error (a permission, an I/O error) is
    /// not taken for "no checkpoints", which would start a run afresh over them.
    fn root_exists(&self) -> Result<bool, RunError> {
        self.root.try_exists().map_err(|e| io_error(&self.root, e))
    }

    pub fn latest(&self) -> Result<Option<Checkpoint>, RunError> {
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
    ) -> Result<PathBuf, RunError> {
        let name = if best {
            "best".to_string()
        } else {
            format!("step-{:08}", state.step)
        };
        let partial = self.root.join(format!(".{name}.partial"));
        self.write_partial(&partial, model, (!best).then_some(optimizer), state)?;
        let target = self.root.join(&name);
        self.swap_into_place(&partial, &target, &name)?;
        if !best {
            self.prune()?;
        }
        Ok(target)
    }

    /// A whole checkpoint under the hidden name `partial`, synced to disk.
    fn write_partial(
        &self,
        partial: &Path,
        model: &[(String, Tensor)],
        optimizer: Option<&[(String, Tensor)]>,
        state: &TrainState,
    ) -> Result<(), RunError> {
        if partial.exists() {
            fs::remove_dir_all(partial).map_err(|e| io_error(partial, e))?;
        }
        fs::create_dir_all(partial).map_err(|e| io_error(partial, e))?;
        let write = |file: &str, tensors: &[(String, Tensor)]| {
            let path = partial.join(file);
            super::safetensors::write(&path, tensors).map_err(|e| RunError::Checkpoint {
                path,
                why: e.to_string(),
            })
        };
        write(MODEL_FILE, model)?;
        if let Some(optimizer) = optimizer {
            write(OPTIMIZER_FILE, optimizer)?;
        }
        let state_path = partial.join(STATE_FILE);
        let json = serde_json::to_vec_pretty(state).map_err(|e| RunError::Checkpoint {
            path: state_path.clone(),
            why: e.to_string(),
        })?;
        // The safetensors writer syncs its files; the state is synced here, then the folder.
        crate::sys::write_synced(&state_path, &json).map_err(|e| io_error(&state_path, e))?;
        super::sync_parent(&state_path)
    }

    /// Renames `partial` to `target`; an existing `target` is moved to `.<name>.old`
    /// first and removed after. A `.old` left by a process killed mid-swap is recovered
    /// (see [`Checkpoints::repair`]) before it is reused.
    fn swap_into_place(&self, partial: &Path, target: &Path, name: &str) -> Result<(), RunError> {
        let old = self.root.join(format!(".{name}.old"));
        self.repair_one(target, &old)?;
        if target.exists() {
            fs::rename(target, &old).map_err(|e| io_error(target, e))?;
            fs::rename(partial, target).map_err(|e| io_error(target, e))?;
            super::sync_parent(target)?;
            fs::remove_dir_all(&old).map_err(|e| io_error(&old, e))
        } else {
            fs::rename(partial, target).map_err(|e| io_error(target, e))?;
            super::sync_parent(target)
        }
    }

    /// Keeps the newest `keep_last` step checkpoints.
    fn prune(&self) -> Result<(), RunError> {
        let steps = self.steps()?;
        for (_, dir) in steps
            .iter()
            .take(steps.len().saturating_sub(self.keep_last))
        {
            fs::remove_dir_all(dir).map_err(|e| io_error(dir, e))?;
        }
        Ok(())
    }

    /// Puts back what a process killed inside [`Checkpoints::save`] left: a `.<name>.old`
    /// whose `<name>` is missing was the checkpoint (killed between the two renames) and
    /// is renamed back; one beside its `<name>` is stale and removed; `.partial` folders
    /// were never complete and are removed.
    pub fn repair(&self) -> Result<(), RunError> {
        if !self.root_exists()? {
            return Ok(());
        }
        for entry in fs::read_dir(&self.root).map_err(|e| io_error(&self.root, e))? {
            let path = entry.map_err(|e| io_error(&self.root, e))?.path();
            let Some(file) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let hidden = file.strip_prefix('.');
            if let Some(name) = hidden.and_then(|f| f.strip_suffix(".old")) {
                self.repair_one(&self.root.join(name), &path)?;
            } else if hidden.is_some_and(|f| f.ends_with(".partial")) {
                fs::remove_dir_all(&path).map_err(|e| io_error(&path, e))?;
            }
        }
        Ok(())
    }

    fn repair_one(&self, target: &Path, old: &Path) -> Result<(), RunError> {
        if !old.exists() {
            return Ok(());
        }
        if target.exists() {
            fs::remove_dir_all(old).map_err(|e| io_error(old, e))
        } else {
            fs::rename(old, target).map_err(|e| io_error(old, e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelConfig, ProbUNet};
    use tch::Device;

    fn saved(config: ModelConfig, dir: &Path) -> PathBuf {
        let vs = nn::VarStore::new(Device::Cpu);
        ProbUNet::new(&vs.root(), config).unwrap();
        let path = dir.join(format!("{}.safetensors", dir.read_dir().unwrap().count()));
        vs.save(&path).unwrap();
        path
    }

    fn model(config: ModelConfig) -> nn::VarStore {
        let vs = nn::VarStore::new(Device::Cpu);
        ProbUNet::new(&vs.root(), config).unwrap();
        vs
    }

    #[test]
    fn the_first_non_finite_variable_is_named() {
        let t = |v: &[f32]| Tensor::from_slice(v);
        let mut variables = vec![
            ("a".to_string(), t(&[1.0, 2.0])),
            ("b".to_string(), t(&[0.0, f32::NAN])),
            ("c".to_string(), t(&[f32::INFINITY])),
        ];
        assert_eq!(first_non_finite(&variables).unwrap(), Some("b"));
        variables.retain(|(name, _)| name != "b");
        assert_eq!(first_non_finite(&variables).unwrap(), Some("c"));
        variables.retain(|(name, _)| name != "c");
        assert_eq!(first_non_finite(&variables).unwrap(), None);
        assert_eq!(first_non_finite(&[]).unwrap(), None);
    }

    #[test]
    fn a_checkpoint_of_another_shape_names_the_first_difference() {
        let dir = tempfile::tempdir().unwrap();
        let small = ModelConfig {
            filters: vec![8, 16],
            ..ModelConfig::default()
        };
        let file = saved(small.clone(), dir.path());
        assert_eq!(shape_mismatch(&model(small.clone()), &file).unwrap(), None);

        let wider = ModelConfig {
            filters: vec![8, 24],
            ..small.clone()
        };
        let why = shape_mismatch(&model(wider), &file).unwrap().unwrap();
        assert_eq!(
            why,
            "variable posterior.encoder.1.0.bias is [16] in the checkpoint but [24] in the \
             model (21 of 54 variables differ)"
        );
        let latent = ModelConfig {
            latent_dim: 3,
            ..small.clone()
        };
        let why = shape_mismatch(&model(latent), &file).unwrap().unwrap();
        assert_eq!(
            why,
            "variable fcomb.layers.0.weight is [8, 10, 1, 1] in the checkpoint but \
             [8, 11, 1, 1] in the model (5 of 54 variables differ)"
        );
        let deeper = ModelConfig {
            filters: vec![8, 16, 32],
            ..small
        };
        let why = shape_mismatch(&model(deeper), &file).unwrap().unwrap();
        assert!(
            why.starts_with(
                "the model's variable posterior.encoder.2.0.bias [32] is not in the checkpoint"
            ),
            "{why}"
        );
        // A shallower model than the checkpoint's: the checkpoint has variables to spare.
        let shallower = model(ModelConfig {
            filters: vec![8],
            ..ModelConfig::default()
        });
        let why = shape_mismatch(&shallower, &file).unwrap().unwrap();
        assert!(why.contains("that the model lacks"), "{why}");

        let junk = dir.path().join("junk.safetensors");
        std::fs::write(&junk, b"12").unwrap();
        let err = shape_mismatch(&model(ModelConfig::default()), &junk).unwrap_err();
        assert!(err.to_string().contains("junk.safetensors"), "{err}");
    }

    fn state(step: u64) -> TrainState {
        TrainState {
            step,
            epoch: 0,
            loader: LoaderState {
                epoch: 0,
                cursor: 0,
                epoch_rng: crate::seed::rng(0, 0, 0),
                draw_rng: crate::seed::rng(0, 0, 1),
            },
            optimizer_steps: step,
            best_val_ged: None,
            val_ged: None,
            created_at: chrono::Utc::now(),
            interval: None,
        }
    }

    /// A process killed between the two renames of a swap leaves `.best.old` and no
    /// `best`; one killed after them but before the removal leaves both.
    #[test]
    fn a_swap_killed_at_any_point_is_repaired_and_best_can_be_replaced_again() {
        let dir = tempfile::tempdir().unwrap();
        let checkpoints = Checkpoints::new(dir.path().join("checkpoints"), 2);
        let weights = vec![("w".to_string(), Tensor::from_slice(&[1.0f32]))];
        checkpoints
            .save(&weights, &weights, &state(10), true)
            .unwrap();
        let root = dir.path().join("checkpoints");
        // Killed between the renames: only the old copy is there.
        fs::rename(root.join("best"), root.join(".best.old")).unwrap();
        fs::create_dir_all(root.join(".best.partial")).unwrap();
        checkpoints.repair().unwrap();
        assert_eq!(Checkpoint::open(&root.join("best")).unwrap().state.step, 10);
        assert!(!root.join(".best.old").exists() && !root.join(".best.partial").exists());
        // Killed before removing the old copy: the stale one goes, the swap works again.
        copy_dir(&root.join("best"), &root.join(".best.old"));
        checkpoints
            .save(&weights, &weights, &state(20), true)
            .unwrap();
        assert_eq!(Checkpoint::open(&root.join("best")).unwrap().state.step, 20);
        assert!(!root.join(".best.old").exists());
    }

    fn copy_dir(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

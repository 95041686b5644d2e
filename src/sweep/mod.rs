//! `probunet sweep`: hyperparameter sweeps over beta, latent_dim or any other key, run
//! in parallel on this machine or as a Slurm job array.
//!
//! A sweep spec (see [`spec`]) names a base experiment and the axes to vary. Its plan,
//! the table of trials, is drawn once and kept in `runs/<sweep>/sweep.json`; each trial
//! runs in `runs/<sweep>/<trial-id>/`, an ordinary run folder, through one entry point,
//! `probunet train --sweep runs/<sweep> --trial N` ([`trial::run`]). A local sweep runs
//! `--jobs` of those processes at once ([`local`]); `--emit slurm` writes a job array
//! that runs one per task ([`slurm`]); `--collect` summarises whatever finished
//! ([`summary`]).
pub mod local;
pub mod plan;
pub mod slurm;
pub mod spec;
pub mod summary;
pub mod trial;

pub use local::{LocalOptions, Report, Stop};
pub use plan::Plan;
pub use spec::{SlurmOptions, SweepSpec};

use crate::config::ConfigError;
use crate::tensorboard::TensorboardError;
use crate::train::TrainError;
use std::path::{Path, PathBuf};
use summary::TrialState;

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// Something wrong in a sweep spec, naming the file.
    #[error("{}: {why}", path.display())]
    Spec { path: PathBuf, why: String },
    /// Something wrong with a sweep folder or a file in it.
    #[error("{}: {why}", path.display())]
    Folder { path: PathBuf, why: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Boxed: a training error is large, and sweeps pass errors around a lot.
    #[error(transparent)]
    Train(Box<TrainError>),
    #[error(transparent)]
    Tensorboard(#[from] TensorboardError),
    #[error(
        "trial {index} interrupted at step {step}; its checkpoint is in {}. Resume it with: \
         probunet train --sweep {} --trial {index} (or run the sweep again)",
        run.display(), folder.display()
    )]
    Interrupted {
        index: usize,
        step: u64,
        folder: PathBuf,
        run: PathBuf,
    },
    /// A trial stopped on a non-finite loss: the hint names the sweep's retry command, not
    /// `train --resume` (which would leave the sweep's records behind).
    #[error(
        "trial {index}: step {step}: non-finite {what}; the trial stopped (train.on_nan = \"stop\"). \
         Its last good checkpoint is in {}. Retry it from there with: probunet train --sweep {} \
         --trial {index} --set train.lr=<lower> (or every failed trial: probunet sweep {} \
         --retry-failed), or set train.on_nan = \"skip\" in the sweep spec",
        run.display(), folder.display(), folder.display()
    )]
    TrialNonFinite {
        index: usize,
        step: u64,
        what: String,
        folder: PathBuf,
        run: PathBuf,
    },
    /// The sweep ran, but not every trial finished.
    #[error("{message}")]
    Incomplete { interrupted: bool, message: String },
    #[error("{0}")]
    Other(String),
}

impl From<TrainError> for SweepError {
    fn from(e: TrainError) -> Self {
        SweepError::Train(Box::new(e))
    }
}

/// The sweep a command names: a sweep spec, or a sweep folder (`runs/<sweep>`).
pub struct Target {
    pub folder: PathBuf,
    /// The plan drawn from the spec, when a spec was named.
    pub planned: Option<Plan>,
    pub spec: Option<SweepSpec>,
}

impl Target {
    pub fn open(path: &Path) -> Result<Target, SweepError> {
        if path.is_dir() {
            Plan::load(path)?;
            return Ok(Target {
                folder: path.to_path_buf(),
                planned: None,
                spec: None,
            });
        }
        let spec = SweepSpec::load(path)?;
        let plan = Plan::build(&spec)?;
        Ok(Target {
            folder: spec.folder(),
            planned: Some(plan),
            spec: Some(spec),
        })
    }

    /// The folder's plan, made from the spec if the folder has none yet; a folder whose
    /// plan differs from the spec's is refused.
    pub fn create(&self) -> Result<Plan, SweepError> {
        match &self.planned {
            Some(plan) => plan.create_or_check(&self.folder),
            None => Plan::load(&self.folder),
        }
    }

    /// The folder's plan if it has one (checked against the spec), else the spec's,
    /// writing nothing.
    pub fn existing(&self) -> Result<(Plan, bool), SweepError> {
        match &self.planned {
            Some(plan) if self.folder.join(plan::PLAN_FILE).exists() => {
                let existing = Plan::load(&self.folder)?;
                if let Some(why) = plan.difference(&existing) {
                    return Err(plan::mismatch(&self.folder, &existing, &why));
                }
                Ok((existing, true))
            }
            Some(plan) => Ok((plan.clone(), false)),
            None => Ok((Plan::load(&self.folder)?, true)),
        }
    }
}

/// `probunet sweep --plan`: the trial table and each trial's state, running nothing and
/// writing nothing.
pub fn print_plan(target: &Target) -> Result<(), SweepError> {
    let (plan, exists) = target.existing()?;
    let mut shape: Vec<String> = plan
        .axes
        .iter()
        .map(|a| match &a.kind {
            plan::AxisKind::Grid(values) => format!("{} {}", a.name, values.len()),
            plan::AxisKind::Random(_) => format!("{} drawn", a.name),
            plan::AxisKind::Repeat(seeds) => format!("{} repeats", seeds.len()),
        })
        .collect();
    if shape.is_empty() {
        shape.push("no axes".into());
    }
    println!(
        "sweep {}: {} trials ({}) over {}, in {}{}",
        plan.name,
        plan.trials.len(),
        shape.join(" x "),
        plan.base_source,
        target.folder.display(),
        if exists { "" } else { " (not started)" }
    );
    if !plan.fixed.is_empty() {
        println!("every trial sets: {}", plan.fixed.join(" "));
    }
    let mut lines: Vec<Vec<String>> = Vec::new();
    let mut header = vec!["#".to_string(), "id".to_string()];
    header.extend(plan.axes.iter().map(|a| a.name.clone()));
    header.push("state".into());
    lines.push(header);
    for trial in &plan.trials {
        let mut line = vec![trial.index.to_string(), trial.id.clone()];
        line.extend(trial.values.iter().map(plan::value_display));
        let state = if exists {
            summary::trial_state(&target.folder, &plan, trial.index)
        } else {
            TrialState::Pending
        };
        line.push(state.as_str().into());
        lines.push(line);
    }
    print!("{}", summary::aligned(&lines));
    for (index, error) in plan.check_trials() {
        println!(
            "trial {} ({}) will fail: {error}",
            index, plan.trials[index].id
        );
    }
    Ok(())
}

/// Collects the summary of the sweep in `folder`: writes `summary.csv` and returns the
/// table and verdict to print, and the rows.
pub fn summarise(folder: &Path, plan: &Plan) -> Result<(String, Vec<summary::Row>), SweepError> {
    let rows = summary::collect(folder, plan);
    summary::write_csv(folder, plan, &rows)?;
    let text = format!(
        "{}\n{}\nsummary: {}",
        summary::table(plan, &rows),
        summary::verdict(plan, &rows),
        folder.join(plan::SUMMARY_FILE).display()
    );
    Ok((text, rows))
}

/// `probunet sweep SPEC`: runs the trials that have not finished, `options.jobs` at a
/// time, then writes and prints the summary. Returns an `Incomplete` error when a trial
/// failed or Ctrl-C stopped the sweep (after the summary).
pub fn run_local(
    target: &Target,
    options: &LocalOptions,
    stop: &Stop,
) -> Result<Report, SweepError> {
    let plan = target.create()?;
    let report = local::run(&target.folder, &plan, options, stop)?;
    let (text, rows) = summarise(&target.folder, &plan)?;
    println!("{text}");
    if report.ran > 0 {
        println!(
            "throughput: {} trial-steps in {:.1} s = {:.2} trial-steps/s ({} trials, {} at once, \
             {} thread(s) each)",
            report.trial_steps,
            report.wall_s,
            report.throughput(),
            report.ran,
            options.jobs,
            options.threads
        );
    }
    let again = match &target.spec {
        Some(spec) => spec.path.display().to_string(),
        None => target.folder.display().to_string(),
    };
    if stop.requested() {
        let stopped = rows
            .iter()
            .filter(|r| matches!(r.state, TrialState::Interrupted | TrialState::Pending))
            .count();
        return Err(SweepError::Incomplete {
            interrupted: true,
            message: format!(
                "interrupted: {stopped} trial(s) did not finish; the running ones checkpointed. \
                 Resume with: probunet sweep {again}"
            ),
        });
    }
    let failed = rows
        .iter()
        .filter(|r| r.state == TrialState::Failed)
        .count();
    if failed > 0 {
        return Err(SweepError::Incomplete {
            interrupted: false,
            message: format!(
                "{failed} of {} trials failed (their errors are above and in {}); \
                 `probunet sweep {again} --retry-failed` runs them again",
                rows.len(),
                target.folder.join(plan::SUMMARY_FILE).display()
            ),
        });
    }
    Ok(report)
}

/// `probunet sweep SPEC --emit slurm`: makes the sweep folder and writes the sbatch
/// script for the trials still to run; returns its path, or `None` when none are left.
pub fn emit_slurm(
    target: &Target,
    flags: &SlurmOptions,
    retry_failed: bool,
    out: Option<&Path>,
) -> Result<Option<PathBuf>, SweepError> {
    let spec_options = match &target.spec {
        Some(spec) => spec.slurm.clone(),
        None => Plan::load(&target.folder)?.slurm,
    };
    let options = slurm::merge(&spec_options, flags);
    slurm::check(&options).map_err(|why| match &target.spec {
        Some(spec) => SweepError::Spec {
            path: spec.path.clone(),
            why: format!("sweep.slurm (or its flag): {why}"),
        },
        None => SweepError::Other(format!("slurm option {why}")),
    })?;
    let plan = target.create()?;
    let indices: Vec<usize> = plan
        .trials
        .iter()
        .map(|t| t.index)
        .filter(|&i| match summary::trial_state(&target.folder, &plan, i) {
            TrialState::Finished | TrialState::Running => false,
            TrialState::Failed => retry_failed,
            _ => true,
        })
        .collect();
    if indices.is_empty() {
        println!(
            "sweep {}: no trial is left to run (finished, running or failed; \
             --retry-failed includes the failed ones)",
            plan.name
        );
        return Ok(None);
    }
    local::prepare(&target.folder, &plan, &indices);
    let io = |path: &Path, e: std::io::Error| SweepError::Folder {
        path: path.to_path_buf(),
        why: e.to_string(),
    };
    let logs = target.folder.join(slurm::LOG_DIR);
    std::fs::create_dir_all(&logs).map_err(|e| io(&logs, e))?;
    let folder = std::fs::canonicalize(&target.folder).map_err(|e| io(&target.folder, e))?;
    let workdir = std::env::current_dir().map_err(|e| io(Path::new("."), e))?;
    let exe = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .map_err(|e| SweepError::Other(format!("cannot find the probunet executable: {e}")))?;
    let text = slurm::script(&plan, &folder, &workdir, &exe, &indices, &options)?;
    let path = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| target.folder.join("sweep.sbatch"));
    crate::train::run::write_atomic(&path, text.as_bytes())?;
    println!(
        "wrote {}: {} of {} trials as a job array, at most {} at once\n\
         submit it with:  sbatch {}\n\
         then collect:    probunet sweep {} --collect",
        path.display(),
        indices.len(),
        plan.trials.len(),
        options.concurrency.unwrap_or(slurm::DEFAULT_CONCURRENCY),
        path.display(),
        target.folder.display()
    );
    Ok(Some(path))
}

/// `probunet sweep SPEC|FOLDER --collect`: the summary of whatever the folder holds.
pub fn collect(target: &Target) -> Result<Vec<summary::Row>, SweepError> {
    let (plan, exists) = target.existing()?;
    if !exists {
        return Err(SweepError::Folder {
            path: target.folder.clone(),
            why: "does not exist yet: the sweep has not been started".into(),
        });
    }
    let (text, rows) = summarise(&target.folder, &plan)?;
    println!("{text}");
    Ok(rows)
}

/// `--devices 0,1` (or `cuda:0,cpu`) as device names, checked against what libtorch sees.
pub fn parse_devices(list: &[String]) -> Result<Vec<String>, SweepError> {
    let count = tch::Cuda::device_count().max(0) as usize;
    list.iter()
        .map(|item| {
            let item = item.trim();
            let name = if item.eq_ignore_ascii_case("cpu") {
                return Ok("cpu".to_string());
            } else if let Ok(n) = item.parse::<usize>() {
                n
            } else if let Some(n) = item
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
            {
                n
            } else {
                return Err(SweepError::Other(format!(
                    "--devices: {item:?} is not a device: expected GPU numbers such as 0,1 \
                     (or cuda:0, or cpu)"
                )));
            };
            if name >= count {
                return Err(SweepError::Other(format!(
                    "--devices: GPU {name} asked for, but libtorch sees {count} CUDA device(s)"
                )));
            }
            Ok(format!("cuda:{name}"))
        })
        .collect()
}

/// Every visible GPU when the sweep's trials would use one (`train.device` auto or
/// cuda), else none (trials keep their spec's device).
pub fn default_devices(plan: &Plan) -> Vec<String> {
    let count = tch::Cuda::device_count().max(0) as usize;
    if count == 0 {
        return Vec::new();
    }
    let wants_gpu = crate::config::load_str(&plan.base_text, &plan.base_source, &[], &plan.fixed)
        .map(|r| r.experiment.train.device != crate::device::DeviceSpec::Cpu)
        .unwrap_or(true);
    if wants_gpu {
        (0..count).map(|n| format!("cuda:{n}")).collect()
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every sweep spec shipped in experiments/ parses and plans.
    #[test]
    fn shipped_sweeps_plan() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if path.extension().is_some_and(|e| e == "toml") && SweepSpec::is_sweep(&text) {
                let spec = SweepSpec::load(&path).unwrap_or_else(|e| panic!("{e}"));
                let plan = Plan::build(&spec).unwrap_or_else(|e| panic!("{e}"));
                assert!(plan.check_trials().is_empty(), "{}", path.display());
                found.push(spec.name);
            }
        }
        assert!(found.iter().any(|n| n == "beta"), "{found:?}");
    }
}

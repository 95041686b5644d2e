//! `probunet sweep`: hyperparameter sweeps over beta, latent_dim or any other key, run
//! in parallel on this machine or as a Slurm job array.
//!
//! A sweep spec (see [`spec`]) names a base experiment and the axes to vary. Its plan,
//! the table of trials, is drawn once and kept in `runs/<sweep>/sweep.json`; each trial
//! runs in `runs/<sweep>/<trial-id>/`, an ordinary run folder, through one entry point,
//! `probunet sweep trial runs/<sweep> N` ([`trial::run_trial`]). A local sweep runs
//! `--jobs` of those processes at once ([`local`]); `--emit slurm` writes a job array
//! that runs one per task ([`slurm`]); `--collect` summarises whatever finished
//! ([`summary`]).
pub mod local;
pub mod plan;
pub mod slurm;
pub mod spec;
pub mod summary;
pub mod trial;

pub use local::{LocalOptions, Observer, Queue, Report, Stop, SweepEvent};
pub use plan::Plan;
pub use spec::{SlurmOptions, SweepSpec};

use crate::config::ConfigError;
use crate::run::RunError;
use crate::tensorboard::{Image, TensorboardError};
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
    #[error(transparent)]
    Figure(#[from] crate::figure::FigureError),
    #[error(transparent)]
    Run(#[from] RunError),
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
    /// A trial stopped on a non-finite loss: the hint names the sweep's own commands, not
    /// `train --resume` (which would leave the sweep's records behind).
    #[error("{}", non_finite_advice(*index, *step, what, folder, run, *has_checkpoint))]
    TrialNonFinite {
        index: usize,
        step: u64,
        what: String,
        folder: PathBuf,
        run: PathBuf,
        /// Whether the trial wrote a checkpoint that a re-run resumes from.
        has_checkpoint: bool,
    },
    /// The sweep ran, but not every trial finished.
    #[error("{message}")]
    Incomplete { interrupted: bool, message: String },
    #[error("{0}")]
    Other(String),
}

fn non_finite_advice(
    index: usize,
    step: u64,
    what: &str,
    folder: &Path,
    run: &Path,
    has_checkpoint: bool,
) -> String {
    let restart = match has_checkpoint {
        true => format!(
            "Its last good checkpoint is in {}; a re-run resumes from it.",
            run.display()
        ),
        false => "It stopped before its first checkpoint; a re-run starts afresh.".into(),
    };
    format!(
        "trial {index}: step {step}: non-finite {what}; the trial stopped (train.on_nan = \"stop\"). \
         {restart} Run it again with: probunet train --sweep {folder} --trial {index} (or every \
         failed trial: probunet sweep {folder} --retry-failed); for other settings (a lower \
         train.lr, or train.on_nan = \"skip\"), change the sweep spec and start a new sweep",
        folder = folder.display()
    )
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
    /// The sweep of a spec (with `sets`, `--set` flags, added to its fixed overrides) or
    /// of a folder.
    pub fn open(path: &Path, sets: &[String]) -> Result<Target, SweepError> {
        if path.is_dir() {
            if !sets.is_empty() {
                return Err(SweepError::Other(format!(
                    "--set changes a sweep's plan: give the sweep spec, not its folder {}",
                    path.display()
                )));
            }
            Plan::load(path)?;
            return Ok(Target {
                folder: path.to_path_buf(),
                planned: None,
                spec: None,
            });
        }
        let mut spec = SweepSpec::load(path)?;
        spec.set_fixed(sets)?;
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

/// The plan's shape: each axis with its size.
fn plan_shape(plan: &Plan) -> String {
    let shape: Vec<String> = plan
        .axes
        .iter()
        .map(|a| match &a.kind {
            plan::AxisKind::Grid(values) => format!("{} {}", a.name, values.len()),
            plan::AxisKind::Random(_) => format!("{} drawn", a.name),
            plan::AxisKind::Repeat(seeds) => format!("{} repeats", seeds.len()),
        })
        .collect();
    match shape.is_empty() {
        true => "no axes".into(),
        false => shape.join(" x "),
    }
}

/// `probunet sweep --plan`: the trial table and each trial's state, running nothing and
/// writing nothing.
pub fn plan_text(target: &Target) -> Result<String, SweepError> {
    let (plan, exists) = target.existing()?;
    let mut out = format!(
        "sweep {}: {} trials ({}) over {}, in {}{}\n",
        plan.name,
        plan.trials.len(),
        plan_shape(&plan),
        plan.base_source,
        target.folder.display(),
        if exists { "" } else { " (not started)" }
    );
    if !plan.fixed.is_empty() {
        out.push_str(&format!("every trial sets: {}\n", plan.fixed.join(" ")));
    }
    let mut header = vec!["#".to_string(), "id".to_string()];
    header.extend(plan.axes.iter().map(|a| a.name.clone()));
    header.push("state".into());
    let mut lines: Vec<Vec<String>> = vec![header];
    for trial in &plan.trials {
        let mut line = vec![trial.index.to_string(), trial.id.clone()];
        line.extend(trial.values.iter().map(plan::value_display));
        let state = match exists {
            true => summary::reported_state(&target.folder, &plan, trial.index),
            false => TrialState::Pending,
        };
        line.push(state.as_str().into());
        lines.push(line);
    }
    out.push_str(&summary::aligned(&lines));
    for (index, error) in plan.check_trials() {
        let id = &plan.trials[index].id;
        out.push_str(&format!("trial {index} ({id}) will fail: {error}\n"));
    }
    Ok(out)
}

/// Collects the summary of the sweep in `folder`: writes `summary.csv` and `summary.png`
/// and returns the table and verdict to print, and the rows.
pub fn summarise(folder: &Path, plan: &Plan) -> Result<(String, Vec<summary::Row>), SweepError> {
    let (text, rows, _) = write_summary(folder, plan)?;
    Ok((text, rows))
}

/// [`summarise`], keeping the figure for the sweep's TensorBoard too.
fn write_summary(
    folder: &Path,
    plan: &Plan,
) -> Result<(String, Vec<summary::Row>, Image), SweepError> {
    let rows = summary::collect(folder, plan);
    summary::write_csv(folder, plan, &rows)?;
    let figure = summary::figure(folder, plan, &rows)?;
    crate::run::write_atomic(&folder.join(plan::SUMMARY_FIGURE), &figure.to_png()?)?;
    let text = format!(
        "{}\n{}\nsummary: {}",
        summary::table(plan, &rows),
        summary::verdict(plan, &rows),
        folder.join(plan::SUMMARY_FILE).display()
    );
    Ok((text, rows, figure))
}

/// The summary figure in the sweep folder's TensorBoard, at the step of the number of
/// finished trials, so that a sweep resumed later shows how the picture grew.
fn board_summary(folder: &Path, rows: &[summary::Row], figure: &Image) -> Result<(), SweepError> {
    let finished = rows
        .iter()
        .filter(|r| r.state == TrialState::Finished)
        .count();
    let mut writer = crate::tensorboard::EventWriter::create(folder)?;
    writer.add_image("sweep/best_val_ged", finished as i64, figure)?;
    Ok(writer.close()?)
}

/// What a local sweep did: its report, the summary to show, and how it ended (an
/// `Incomplete` error when a trial failed or Ctrl-C stopped it).
pub struct LocalRun {
    pub report: Report,
    pub summary: String,
    pub end: Result<(), SweepError>,
}

/// `probunet sweep SPEC`: runs the trials that have not finished, `options.jobs` at a
/// time, then writes the summary.
pub fn run_local(
    target: &Target,
    options: &LocalOptions,
    stop: &Stop,
    observe: Observer,
) -> Result<LocalRun, SweepError> {
    let plan = target.create()?;
    let report = local::run_pending(&target.folder, &plan, options, stop, observe)?;
    let (summary, rows, figure) = write_summary(&target.folder, &plan)?;
    board_summary(&target.folder, &rows, &figure)?;
    let end = incomplete(target, &rows, stop.requested());
    Ok(LocalRun {
        report,
        summary,
        end,
    })
}

/// The error of a sweep that left trials unfinished, with the command that goes on.
fn incomplete(target: &Target, rows: &[summary::Row], stopped: bool) -> Result<(), SweepError> {
    let again = match &target.spec {
        Some(spec) => spec.path.display().to_string(),
        None => target.folder.display().to_string(),
    };
    if stopped {
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
    Ok(())
}

/// What `--emit slurm` did.
#[derive(Debug, Clone)]
pub enum Emitted {
    /// Every trial finished, runs, or failed (not retried): no script was written.
    NothingLeft { sweep: String },
    Script {
        path: PathBuf,
        /// Trials in the job array, of all the sweep's.
        trials: usize,
        total: usize,
        concurrency: u32,
        folder: PathBuf,
    },
}

/// The Slurm options of the spec (or the folder's plan) overridden by the flags, checked.
fn slurm_options(target: &Target, flags: &SlurmOptions) -> Result<SlurmOptions, SweepError> {
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
    Ok(options)
}

/// `probunet sweep SPEC --emit slurm`: makes the sweep folder and writes the sbatch
/// script for the trials still to run.
pub fn emit_slurm(
    target: &Target,
    flags: &SlurmOptions,
    retry_failed: bool,
    out: Option<&Path>,
) -> Result<Emitted, SweepError> {
    let options = slurm_options(target, flags)?;
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
        return Ok(Emitted::NothingLeft { sweep: plan.name });
    }
    let path = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| target.folder.join("sweep.sbatch"));
    slurm::check_replaceable(&path)?;
    local::prepare(&target.folder, &plan, &indices);
    let logs = target.folder.join(slurm::LOG_DIR);
    std::fs::create_dir_all(&logs).map_err(|e| RunError::io(&logs, e))?;
    let folder =
        std::fs::canonicalize(&target.folder).map_err(|e| RunError::io(&target.folder, e))?;
    let workdir = std::env::current_dir().map_err(|e| RunError::io(Path::new("."), e))?;
    let exe = std::env::current_exe()
        .and_then(std::fs::canonicalize)
        .map_err(|e| SweepError::Other(format!("cannot find the probunet executable: {e}")))?;
    let text = slurm::script(&plan, &folder, &workdir, &exe, &indices, &options)?;
    crate::run::write_atomic(&path, text.as_bytes())?;
    Ok(Emitted::Script {
        path,
        trials: indices.len(),
        total: plan.trials.len(),
        concurrency: options.concurrency.unwrap_or(slurm::DEFAULT_CONCURRENCY),
        folder: target.folder.clone(),
    })
}

/// `probunet sweep SPEC|FOLDER --collect`: the summary of whatever the folder holds (the
/// text to show, and the rows).
pub fn collect(target: &Target) -> Result<(String, Vec<summary::Row>), SweepError> {
    let (plan, exists) = target.existing()?;
    if !exists {
        return Err(SweepError::Folder {
            path: target.folder.clone(),
            why: "does not exist yet: the sweep has not been started".into(),
        });
    }
    summarise(&target.folder, &plan)
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

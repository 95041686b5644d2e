//! What a sweep found: `runs/<sweep>/summary.csv` with a row per trial, and the table of
//! trials sorted by validation GED that answers "which values are best".
use super::plan::{value_display, Plan, SUMMARY_FILE};
use super::trial::{checkpoint_step, State, Status, STATUS_FILE};
use super::SweepError;
use crate::figure::{sweep_figure, FigureError, SweepPanel};
use crate::run::{read_rows_but_torn_tail, write_atomic, Phase, METRICS_FILE};
use crate::run::{RunDir, RunLock};
use crate::tensorboard::Image;
use chrono::{DateTime, Utc};
use std::path::Path;

/// Where a trial stands, from its folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrialState {
    /// Not started.
    Pending,
    /// A process holds its lock now.
    Running,
    Finished,
    Failed,
    /// Stopped before the end (Ctrl-C, a killed process, a time limit): it resumes from
    /// its checkpoint, or starts again if it has none.
    Interrupted,
}

impl TrialState {
    pub fn as_str(self) -> &'static str {
        match self {
            TrialState::Pending => "pending",
            TrialState::Running => "running",
            TrialState::Finished => "finished",
            TrialState::Failed => "failed",
            TrialState::Interrupted => "interrupted",
        }
    }
}

/// The state of trial `index` for deciding what to run: its status file, corrected by its
/// lock (a "running" trial whose process is gone was interrupted).
pub fn trial_state(folder: &Path, plan: &Plan, index: usize) -> TrialState {
    state_in(&plan.trial_dir(folder, index))
}

/// The state of trial `index` as summaries report it: [`trial_state`], except that a
/// "running" status written on another host is reported running. Its lock lives in that
/// host's kernel, so from here (a login node reading a Slurm node's trial through a
/// shared file system) it looks interrupted. What to run still counts it interrupted, so
/// a trial whose node died is not stuck.
pub fn reported_state(folder: &Path, plan: &Plan, index: usize) -> TrialState {
    reported_in(&plan.trial_dir(folder, index))
}

fn reported_in(dir: &Path) -> TrialState {
    let elsewhere = |s: &Status| s.state == State::Running && s.host != crate::sys::hostname();
    match state_in(dir) {
        TrialState::Interrupted if Status::read(dir).is_some_and(|s| elsewhere(&s)) => {
            TrialState::Running
        }
        state => state,
    }
}

fn state_in(dir: &Path) -> TrialState {
    if RunLock::is_held(dir) {
        return TrialState::Running;
    }
    match Status::read(dir).map(|s| s.state) {
        Some(State::Finished) => TrialState::Finished,
        Some(State::Failed) => TrialState::Failed,
        Some(State::Running | State::Interrupted) => TrialState::Interrupted,
        None if dir.join(STATUS_FILE).exists() || checkpoint_step(dir).is_some() => {
            TrialState::Interrupted
        }
        None => TrialState::Pending,
    }
}

/// One validation's metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Val {
    pub step: u64,
    pub ged: Option<f64>,
    pub hm_iou: Option<f64>,
    pub elbo: Option<f64>,
    pub kl: Option<f64>,
}

/// One trial's line of the summary.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub index: usize,
    pub id: String,
    pub values: Vec<String>,
    pub state: TrialState,
    pub error: Option<String>,
    pub steps: Option<u64>,
    pub total_steps: Option<u64>,
    pub wall_s: Option<f64>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    /// The last validation.
    pub last: Option<Val>,
    /// The validation with the lowest GED (what the `best` checkpoint holds).
    pub best: Option<Val>,
}

/// The summary rows of every trial, in trial order, from whatever is in the folder.
pub fn collect(folder: &Path, plan: &Plan) -> Vec<Row> {
    plan.trials
        .iter()
        .map(|trial| {
            let dir = plan.trial_dir(folder, trial.index);
            let status = Status::read(&dir);
            let rows = read_rows_but_torn_tail(&dir.join(METRICS_FILE)).unwrap_or_default();
            let vals: Vec<Val> = rows
                .iter()
                .filter(|r| r.phase == Phase::Val)
                .map(|r| Val {
                    step: r.step,
                    ged: r.ged,
                    hm_iou: r.hm_iou,
                    elbo: r.elbo,
                    kl: r.kl,
                })
                .collect();
            // Step 0 scores the untrained model: a baseline, never the best.
            let best = vals
                .iter()
                .filter(|v| v.step > 0 && v.ged.is_some_and(f64::is_finite))
                .min_by(|a, b| {
                    a.ged
                        .unwrap_or(f64::NAN)
                        .total_cmp(&b.ged.unwrap_or(f64::NAN))
                })
                .copied();
            let logged = rows.iter().map(|r| r.step).max();
            Row {
                index: trial.index,
                id: trial.id.clone(),
                values: trial.values.iter().map(value_display).collect(),
                state: reported_state(folder, plan, trial.index),
                error: status.as_ref().and_then(|s| s.error.clone()),
                steps: status
                    .as_ref()
                    .and_then(|s| s.steps)
                    .into_iter()
                    .chain(logged)
                    .max(),
                total_steps: status.as_ref().and_then(|s| s.total_steps),
                wall_s: status.as_ref().map(|s| s.wall_s).filter(|w| *w > 0.0),
                started_at: status.as_ref().map(|s| s.started_at),
                ended_at: status.as_ref().and_then(|s| s.ended_at),
                last: vals.last().copied(),
                best,
            }
        })
        .collect()
}

fn number(x: Option<f64>) -> String {
    x.map(|x| format!("{x}")).unwrap_or_default()
}

/// Writes `folder/summary.csv` (atomically): a row per trial in trial order.
pub fn write_csv(folder: &Path, plan: &Plan, rows: &[Row]) -> Result<(), SweepError> {
    let mut out = csv::Writer::from_writer(Vec::new());
    let mut header: Vec<String> = vec!["index".into(), "id".into()];
    header.extend(plan.axes.iter().map(|a| a.key.clone()));
    header.extend(
        [
            "status",
            "error",
            "steps",
            "total_steps",
            "wall_s",
            "started_at",
            "ended_at",
            "final_step",
            "final_val_ged",
            "final_val_hm_iou",
            "final_val_elbo",
            "final_val_kl",
            "best_step",
            "best_val_ged",
            "best_val_hm_iou",
            "best_val_elbo",
            "best_val_kl",
        ]
        .map(String::from),
    );
    let csv_error = |e: csv::Error| SweepError::Folder {
        path: folder.join(SUMMARY_FILE),
        why: e.to_string(),
    };
    out.write_record(&header).map_err(csv_error)?;
    let time = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339()).unwrap_or_default();
    let val = |v: Option<Val>| {
        [
            v.map(|v| v.step.to_string()).unwrap_or_default(),
            number(v.and_then(|v| v.ged)),
            number(v.and_then(|v| v.hm_iou)),
            number(v.and_then(|v| v.elbo)),
            number(v.and_then(|v| v.kl)),
        ]
    };
    for row in rows {
        let mut record = vec![row.index.to_string(), row.id.clone()];
        record.extend(row.values.iter().cloned());
        record.extend([
            row.state.as_str().to_string(),
            row.error.clone().unwrap_or_default(),
            row.steps.map(|s| s.to_string()).unwrap_or_default(),
            row.total_steps.map(|s| s.to_string()).unwrap_or_default(),
            row.wall_s.map(|w| format!("{w:.1}")).unwrap_or_default(),
            time(row.started_at),
            time(row.ended_at),
        ]);
        record.extend(val(row.last));
        record.extend(val(row.best));
        out.write_record(&record).map_err(csv_error)?;
    }
    let bytes = out.into_inner().map_err(|e| SweepError::Folder {
        path: folder.join(SUMMARY_FILE),
        why: e.to_string(),
    })?;
    write_atomic(&folder.join(SUMMARY_FILE), &bytes)?;
    Ok(())
}

/// The rows sorted best first: by the best validation GED, trials without one last.
pub fn ranked(rows: &[Row]) -> Vec<&Row> {
    let mut sorted: Vec<&Row> = rows.iter().collect();
    sorted.sort_by(|a, b| {
        let key = |r: &Row| r.best.and_then(|v| v.ged).filter(|g| g.is_finite());
        match (key(a), key(b)) {
            (Some(x), Some(y)) => x.total_cmp(&y).then(a.index.cmp(&b.index)),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a.index.cmp(&b.index),
        }
    });
    sorted
}

/// The table printed at the end of a sweep and by `--collect`.
pub fn table(plan: &Plan, rows: &[Row]) -> String {
    let mut header: Vec<String> = vec!["rank".into(), "id".into()];
    header.extend(plan.axes.iter().map(|a| a.name.clone()));
    header.extend(
        [
            "status",
            "steps",
            "wall",
            "best GED",
            "at step",
            "final GED",
            "HM-IoU",
            "ELBO",
            "KL",
        ]
        .map(String::from),
    );
    let fixed = |x: Option<f64>, digits: usize| {
        x.map(|x| format!("{x:.digits$}"))
            .unwrap_or_else(|| "-".into())
    };
    let mut lines: Vec<Vec<String>> = vec![header];
    for (rank, row) in ranked(rows).into_iter().enumerate() {
        let mut line = vec![(rank + 1).to_string(), row.id.clone()];
        line.extend(row.values.iter().cloned());
        let last = row.last;
        line.extend([
            row.state.as_str().to_string(),
            row.steps.map_or("-".into(), |s| s.to_string()),
            row.wall_s.map_or("-".into(), |w| format!("{w:.0}s")),
            fixed(row.best.and_then(|v| v.ged), 4),
            row.best.map_or("-".into(), |v| v.step.to_string()),
            fixed(last.and_then(|v| v.ged), 4),
            fixed(last.and_then(|v| v.hm_iou), 4),
            fixed(last.and_then(|v| v.elbo), 1),
            fixed(last.and_then(|v| v.kl), 3),
        ]);
        lines.push(line);
    }
    let mut out = aligned(&lines);
    let failed: Vec<&Row> = rows
        .iter()
        .filter(|r| r.state == TrialState::Failed)
        .collect();
    if !failed.is_empty() {
        out.push_str("\nfailed:\n");
        for row in failed {
            out.push_str(&format!(
                "  {}: {}\n",
                row.id,
                row.error.as_deref().unwrap_or("no error recorded")
            ));
        }
    }
    out
}

/// One line on the best trial and the tally of states.
pub fn verdict(plan: &Plan, rows: &[Row]) -> String {
    let count = |state: TrialState| rows.iter().filter(|r| r.state == state).count();
    let mut tally = Vec::new();
    for state in [
        TrialState::Finished,
        TrialState::Failed,
        TrialState::Interrupted,
        TrialState::Running,
        TrialState::Pending,
    ] {
        let n = count(state);
        if n > 0 {
            tally.push(format!("{n} {}", state.as_str()));
        }
    }
    let mut out = format!(
        "sweep {}: {} trials: {}",
        plan.name,
        rows.len(),
        tally.join(", ")
    );
    if let Some(best) = ranked(rows)
        .first()
        .filter(|r| r.best.and_then(|v| v.ged).is_some_and(f64::is_finite))
    {
        let values: Vec<String> = plan
            .axes
            .iter()
            .zip(&best.values)
            .map(|(axis, v)| format!("{} = {v}", axis.name))
            .collect();
        out.push_str(&format!(
            "\nbest: {} ({}) with val GED {:.4} at step {}",
            values.join(", "),
            best.id,
            best.best.and_then(|v| v.ged).unwrap_or(f64::NAN),
            best.best.map_or(0, |v| v.step)
        ));
    }
    out
}

/// `lines` as left-aligned columns two spaces apart, one line each (trailing spaces trimmed):
/// the plan and summary tables.
pub(crate) fn aligned(lines: &[Vec<String>]) -> String {
    let columns = lines.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            lines
                .iter()
                .filter_map(|l| l.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in lines {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `summary.png`'s figure: per axis, each trial's best val GED at its value, with the
/// ideal model's GED where the data has one.
pub fn figure(folder: &Path, plan: &Plan, rows: &[Row]) -> Result<Image, FigureError> {
    let panels: Vec<SweepPanel> = plan
        .axes
        .iter()
        .enumerate()
        .map(|(a, axis)| {
            let values = categories(rows.iter().map(|r| r.values[a].as_str()));
            let trials = rows
                .iter()
                .filter_map(|r| {
                    let ged = r.best.and_then(|v| v.ged)?;
                    let at = values.iter().position(|v| *v == r.values[a])?;
                    Some((at, ged))
                })
                .collect();
            SweepPanel {
                axis: axis.key.clone(),
                values,
                trials,
            }
        })
        .collect();
    let ideal = rows
        .iter()
        .find_map(|r| ideal_val_ged(&plan.trial_dir(folder, r.index)));
    sweep_figure(&panels, ideal)
}

/// The distinct values in order of appearance, sorted as numbers when they all are.
fn categories<'a>(values: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut distinct: Vec<String> = Vec::new();
    for v in values {
        if !distinct.iter().any(|d| d == v) {
            distinct.push(v.to_string());
        }
    }
    let numbers: Option<Vec<f64>> = distinct.iter().map(|v| v.parse().ok()).collect();
    if let Some(numbers) = numbers {
        let mut pairs: Vec<(f64, String)> = numbers.into_iter().zip(distinct).collect();
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
        distinct = pairs.into_iter().map(|p| p.1).collect();
    }
    distinct
}

/// The ideal model's val GED of the store a run read (synthetic data only).
fn ideal_val_ged(run: &Path) -> Option<f64> {
    let store = RunDir::open(run).ok()?.read_meta().ok()?.store?;
    let manifest = crate::data::store::read_manifest(&store).ok()?;
    Some(manifest.ideal?.ged_val)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(index: usize, ged: Option<f64>, state: TrialState) -> Row {
        Row {
            index,
            id: format!("{index:02}"),
            values: vec![index.to_string()],
            state,
            error: (state == TrialState::Failed).then(|| "step 3: non-finite loss".into()),
            steps: Some(10),
            total_steps: Some(10),
            wall_s: Some(2.0),
            started_at: None,
            ended_at: None,
            last: ged.map(|g| Val {
                step: 10,
                ged: Some(g),
                hm_iou: Some(0.5),
                elbo: Some(-3.0),
                kl: Some(0.1),
            }),
            best: ged.map(|g| Val {
                step: 10,
                ged: Some(g),
                hm_iou: Some(0.5),
                elbo: Some(-3.0),
                kl: Some(0.1),
            }),
        }
    }

    #[test]
    fn trials_rank_by_best_ged_and_failures_come_last() {
        let rows = vec![
            row(0, Some(0.5), TrialState::Finished),
            row(1, None, TrialState::Failed),
            row(2, Some(f64::NAN), TrialState::Finished),
            row(3, Some(0.2), TrialState::Finished),
        ];
        let order: Vec<usize> = ranked(&rows).iter().map(|r| r.index).collect();
        assert_eq!(order, [3, 0, 1, 2]);
    }

    #[test]
    fn a_running_trial_on_another_host_is_reported_running_and_one_here_without_its_lock_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let now = chrono::Utc::now();
        let status = |host: String| Status {
            state: State::Running,
            error: None,
            steps: Some(3),
            total_steps: Some(10),
            attempts: 1,
            wall_s: 0.0,
            started_at: now,
            attempt_started_at: now,
            ended_at: None,
            host,
            pid: 1,
            device: None,
            threads: Some(2),
        };
        assert_eq!(reported_in(dir.path()), TrialState::Pending);
        status("node-17".into()).write(dir.path()).unwrap();
        assert_eq!(reported_in(dir.path()), TrialState::Running);
        // What to run still counts it interrupted: its node may have died.
        assert_eq!(state_in(dir.path()), TrialState::Interrupted);
        status(crate::sys::hostname()).write(dir.path()).unwrap();
        assert_eq!(reported_in(dir.path()), TrialState::Interrupted);
    }

    #[test]
    fn categories_are_distinct_and_numeric_ones_sorted() {
        let values = ["10", "0.1", "1", "0.1"];
        assert_eq!(categories(values.into_iter()), ["0.1", "1", "10"]);
        let names = ["sum", "batch_mean", "sum"];
        assert_eq!(categories(names.into_iter()), ["sum", "batch_mean"]);
    }
}

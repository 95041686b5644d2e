//! How a local sweep looks: one bar per running trial under an overall bar on a terminal,
//! or each trial's lines prefixed with its id.
use super::progress::interval_text;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use probunet::sweep::trial::State;
use probunet::sweep::{Queue, SweepEvent};
use probunet::train::TrainEvent;
use std::collections::HashMap;
use std::sync::Mutex;

/// A running trial's bar and what it has reported.
struct Running {
    bar: Option<ProgressBar>,
    reported: u64,
    last_val: Option<(f64, f64)>,
}

/// Draws a sweep from its events; shared by the sweep's worker threads.
pub struct SweepProgress {
    bars: Option<MultiProgress>,
    overall: ProgressBar,
    state: Mutex<Progress>,
}

#[derive(Default)]
struct Progress {
    queued: usize,
    running: HashMap<usize, Running>,
    steps_left: HashMap<usize, u64>,
    finished: usize,
    failed: usize,
}

fn style(template: &str) -> Option<ProgressStyle> {
    ProgressStyle::with_template(template).ok()
}

/// The line that says what a sweep will run.
pub fn queue_line(q: &Queue) -> String {
    let mut line = format!(
        "sweep {}: {} trials in {}: {} finished",
        q.name,
        q.trials,
        q.folder.display(),
        q.finished
    );
    if q.failed > 0 {
        line.push_str(&format!(
            ", {} failed (--retry-failed runs them again)",
            q.failed
        ));
    }
    if q.busy > 0 {
        line.push_str(&format!(", {} being run by another process", q.busy));
    }
    if q.to_run.is_empty() {
        return format!("{line}; nothing to run");
    }
    let devices = match q.devices.is_empty() {
        true => "as each trial's spec says".to_string(),
        false => q.devices.join(", "),
    };
    format!(
        "{line}, {} to run: {} at once, {} thread(s) each, devices: {devices}",
        q.to_run.len(),
        q.jobs,
        q.threads
    )
}

impl SweepProgress {
    /// Bars on a terminal unless `plain`.
    pub fn new(plain: bool) -> Self {
        use std::io::IsTerminal;
        let plain = plain || !std::io::stderr().is_terminal();
        let bars = (!plain).then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        let overall = ProgressBar::hidden();
        if let Some(style) =
            style("{bar:30} {pos}/{len} trial-steps  {msg}  [{elapsed_precise} < {eta_precise}]")
        {
            overall.set_style(style);
        }
        let overall = match &bars {
            Some(bars) => bars.add(overall),
            None => overall,
        };
        SweepProgress {
            bars,
            overall,
            state: Mutex::new(Progress::default()),
        }
    }

    /// A line that stays: above the bars, or on stderr.
    fn say(&self, line: &str) {
        match &self.bars {
            Some(bars) => {
                let _ = bars.println(line);
            }
            None => eprintln!("{line}"),
        }
    }

    fn update_overall(&self, p: &Progress) {
        self.overall.set_message(format!(
            "{}/{} trials done, {} running, {} failed",
            p.finished,
            p.queued,
            p.running.len(),
            p.failed
        ));
    }

    pub fn observe(&self, event: SweepEvent) {
        let mut p = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            SweepEvent::Queued(q) => {
                println!("{}", queue_line(q));
                p.queued = q.to_run.len();
                p.steps_left = q.steps_left.clone();
                if self.bars.is_some() {
                    self.overall.set_draw_target(ProgressDrawTarget::stderr());
                }
                self.overall.set_length(q.steps_left.values().sum());
            }
            SweepEvent::TrialStarted {
                index,
                id,
                device,
                threads,
                resume_from,
            } => self.started(&mut p, index, id, device, threads, resume_from),
            SweepEvent::TrialLine { id, line, .. } => {
                if self.bars.is_none() {
                    eprintln!("[{id}] {line}");
                }
            }
            SweepEvent::Training { index, event, .. } => self.training(&mut p, index, event),
            SweepEvent::TrialEnded {
                index,
                id,
                state,
                steps,
                error,
            } => self.ended(&mut p, index, id, state, steps, error),
        }
        self.update_overall(&p);
    }

    fn started(
        &self,
        p: &mut Progress,
        index: usize,
        id: &str,
        device: Option<&str>,
        threads: usize,
        resume_from: u64,
    ) {
        let bar = self.bars.as_ref().map(|bars| {
            let left = p.steps_left.get(&index).copied().unwrap_or(0);
            let bar = ProgressBar::new(left + resume_from).with_position(resume_from);
            if let Some(style) = style("  {prefix} {bar:20} {pos}/{len}  {wide_msg}") {
                bar.set_style(style);
            }
            bar.set_prefix(id.to_string());
            bars.insert_before(&self.overall, bar)
        });
        let resuming = match resume_from {
            0 => String::new(),
            step => format!(", resuming from step {step}"),
        };
        let place = device.unwrap_or("its spec's device");
        self.say(&format!(
            "trial {id} started on {place} with {threads} thread(s){resuming}"
        ));
        let running = Running {
            bar,
            reported: resume_from,
            last_val: None,
        };
        p.running.insert(index, running);
    }

    fn training(&self, p: &mut Progress, index: usize, event: &TrainEvent) {
        let Some(run) = p.running.get_mut(&index) else {
            return;
        };
        match event {
            TrainEvent::Step { step, total_steps } => {
                self.overall.inc(step.saturating_sub(run.reported));
                run.reported = run.reported.max(*step);
                if let Some(bar) = &run.bar {
                    bar.set_length(*total_steps);
                    bar.set_position(*step);
                }
            }
            TrainEvent::Interval(i) => {
                if let Some(bar) = &run.bar {
                    bar.set_message(interval_text(i, run.last_val));
                }
            }
            TrainEvent::Validation(v) => run.last_val = Some((v.ged, v.hm_iou)),
            _ => {}
        }
    }

    fn ended(
        &self,
        p: &mut Progress,
        index: usize,
        id: &str,
        state: State,
        steps: Option<u64>,
        error: Option<&str>,
    ) {
        if let Some(Running { bar: Some(bar), .. }) = p.running.remove(&index) {
            bar.finish_and_clear();
            if let Some(bars) = &self.bars {
                bars.remove(&bar);
            }
        }
        match state {
            State::Finished => p.finished += 1,
            State::Failed => p.failed += 1,
            _ => {}
        }
        let what = match (state, error) {
            (State::Finished, _) => format!("finished ({} steps)", steps.unwrap_or(0)),
            (state, Some(error)) => format!("{}: {error}", state.as_str()),
            (state, None) => state.as_str().to_string(),
        };
        self.say(&format!("trial {id} {what}"));
    }

    /// Clears the bars at the end.
    pub fn finish(&self) {
        self.overall.finish_and_clear();
    }
}

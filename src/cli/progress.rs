//! How training looks on a terminal: an indicatif bar with step, loss and ETA, or plain
//! periodic lines (cluster logs, `--plain`), drawn from the trainer's events.
use indicatif::{ProgressBar, ProgressStyle};
use probunet::train::events::Interval;
use probunet::train::{EventSink, SinkError, TrainEvent};
use std::io::IsTerminal;

/// The text after `step S/T` in a progress line: the interval's means and the last
/// validation.
pub fn interval_text(i: &Interval, val: Option<(f64, f64)>) -> String {
    let mut text = format!(
        "epoch {}  loss {:.1}  elbo {:.1}  kl {:.3}  {:.1} img/s",
        i.epoch, i.means.loss, i.means.elbo, i.means.kl, i.images_per_s
    );
    if let Some((ged, hm_iou)) = val {
        text.push_str(&format!("  val GED {ged:.3}  HM-IoU {hm_iou:.3}"));
    }
    text
}

/// The progress of one training run.
pub struct TrainProgress {
    plain: bool,
    /// Whether standard output carries JSON lines, so lines go to standard error.
    stdout_taken: bool,
    bar: Option<ProgressBar>,
    total: u64,
    last_val: Option<(f64, f64)>,
}

impl TrainProgress {
    /// A bar on a terminal unless `plain`; lines otherwise.
    pub fn new(plain: bool, stdout_taken: bool) -> Self {
        TrainProgress {
            plain: plain || !std::io::stderr().is_terminal(),
            stdout_taken,
            bar: None,
            total: 0,
            last_val: None,
        }
    }

    fn start(&mut self, total: u64, step: u64) {
        self.total = total;
        if self.plain {
            return;
        }
        let bar = ProgressBar::new(total).with_position(step);
        if let Ok(style) = ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        ) {
            bar.set_style(style);
        }
        self.bar = Some(bar);
    }

    /// A line that stays (a warning), above the bar if there is one.
    fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => super::line(false, text),
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl EventSink for TrainProgress {
    fn event(&mut self, event: &TrainEvent) -> Result<(), SinkError> {
        match event {
            TrainEvent::StorePrepared { summary } => {
                super::train::say(self.stdout_taken, summary.trim_end())
            }
            TrainEvent::Started {
                run,
                step,
                total_steps,
                resumed,
                changes,
                empty_val_split,
                ..
            } => {
                let line = match resumed {
                    true => format!("resuming {} from step {step}", run.display()),
                    false => format!("run folder: {}", run.display()),
                };
                super::train::say(self.stdout_taken, &line);
                for c in changes {
                    let line = format!("  {} = {} (was {}; {})", c.key, c.now, c.was, c.origin);
                    super::train::say(self.stdout_taken, &line);
                }
                if *empty_val_split {
                    super::train::say(
                        self.stdout_taken,
                        "note: the store's val split is empty, so this run does not validate \
                         (no val GED, no best checkpoint); prepare the store with a val share \
                         (--split 80,10,10) to validate",
                    );
                }
                self.start(*total_steps, *step);
            }
            TrainEvent::Step { step, .. } => {
                if let Some(bar) = &self.bar {
                    bar.set_position(*step);
                }
            }
            TrainEvent::Interval(i) => {
                let text = interval_text(i, self.last_val);
                match &self.bar {
                    Some(bar) => {
                        bar.set_position(i.step);
                        bar.set_message(text);
                    }
                    None => super::line(false, &format!("step {}/{}  {text}", i.step, self.total)),
                }
            }
            TrainEvent::Validation(v) => self.last_val = Some((v.ged, v.hm_iou)),
            TrainEvent::Skipped { step, what } => {
                self.line(&format!("step {step}: non-finite {what}; batch skipped"))
            }
            TrainEvent::Finished(_) | TrainEvent::Failed { .. } => self.finish(),
            TrainEvent::Checkpoint { .. } => {}
        }
        Ok(())
    }
}

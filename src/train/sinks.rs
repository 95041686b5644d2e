//! The sinks that write a run's own logs: metrics.csv (TensorBoard's is in `board`),
//! plus JSON lines for whoever follows the run from outside (a sweep's parent process).
use super::events::{EventSink, Interval, SinkError, TrainEvent, Validation};
use crate::run::{MetricsCsv, MetricsRow, Phase};
use std::io::Write;
use std::path::PathBuf;

/// metrics.csv: a row per log interval and per validation.
pub struct MetricsSink {
    csv: MetricsCsv,
}

impl MetricsSink {
    pub fn new(csv: MetricsCsv) -> Self {
        MetricsSink { csv }
    }
}

fn interval_row(i: &Interval) -> MetricsRow {
    let mut row = MetricsRow::new(i.step, i.epoch, Phase::Train);
    row.loss = Some(i.means.loss);
    row.elbo = Some(i.means.elbo);
    row.kl = Some(i.means.kl);
    row.reconstruction = Some(i.means.reconstruction);
    row.reg = Some(i.means.reg);
    row.grad_norm = Some(i.means.grad_norm);
    row.lr = Some(i.lr);
    row.beta = Some(i.beta);
    row.images_per_s = Some(i.images_per_s);
    row.skipped = i.skipped;
    row
}

fn validation_row(v: &Validation) -> MetricsRow {
    let mut row = MetricsRow::new(v.step, v.epoch, Phase::Val);
    row.elbo = Some(v.elbo);
    row.kl = Some(v.kl);
    row.ged = Some(v.ged);
    row.hm_iou = Some(v.hm_iou);
    row
}

impl EventSink for MetricsSink {
    fn event(&mut self, event: &TrainEvent) -> Result<(), SinkError> {
        let row = match event {
            TrainEvent::Interval(i) => interval_row(i),
            TrainEvent::Validation(v) => validation_row(v),
            _ => return Ok(()),
        };
        self.csv
            .write(&row)
            .map_err(|e| SinkError::new("metrics.csv", e))
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.csv
            .flush()
            .map_err(|e| SinkError::new("metrics.csv", e))
    }
}

/// `curves.png` in the run folder, drawn from metrics.csv when training ends, however
/// it ends, so that an interrupted run has its picture too.
pub struct CurvesSink {
    run: PathBuf,
    ideal_ged: Option<f64>,
}

impl CurvesSink {
    pub fn new(run: PathBuf) -> Self {
        CurvesSink {
            run,
            ideal_ged: None,
        }
    }
}

impl EventSink for CurvesSink {
    fn event(&mut self, event: &TrainEvent) -> Result<(), SinkError> {
        match event {
            TrainEvent::Started { ideal_ged, .. } => self.ideal_ged = *ideal_ged,
            TrainEvent::Finished(_) | TrainEvent::Failed { .. } => {
                crate::run::write_curves(&self.run, self.ideal_ged)
                    .map_err(|e| SinkError::new(crate::run::CURVES_FILE, e))?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// One JSON object per line, flushed per event: how a sweep trial's process reports to
/// its parent. Images are left out.
pub struct JsonLinesSink<W: Write> {
    out: W,
    name: String,
    /// The reader closed its end of a pipe: nothing more is sent.
    reader_gone: bool,
}

impl<W: Write> JsonLinesSink<W> {
    /// `name` says where the lines go, for errors.
    pub fn new(out: W, name: impl Into<String>) -> Self {
        JsonLinesSink {
            out,
            name: name.into(),
            reader_gone: false,
        }
    }
}

impl<W: Write> EventSink for JsonLinesSink<W> {
    /// A reader that went away (a sweep whose process died) does not stop training: the
    /// same events are in metrics.csv and TensorBoard. Any other write error does.
    fn event(&mut self, event: &TrainEvent) -> Result<(), SinkError> {
        if self.reader_gone {
            return Ok(());
        }
        let line = serde_json::to_string(event).map_err(|e| SinkError::new(&self.name, e))?;
        match writeln!(self.out, "{line}").and_then(|()| self.out.flush()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.reader_gone = true;
                Ok(())
            }
            other => other.map_err(|e| SinkError::new(&self.name, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::events::{Outcome, StepStats};

    #[test]
    fn json_lines_round_trip_and_leave_images_out() {
        let mut sink = JsonLinesSink::new(Vec::new(), "test");
        let events = [
            TrainEvent::Step {
                step: 3,
                total_steps: 10,
            },
            TrainEvent::Interval(Interval {
                step: 5,
                total_steps: 10,
                epoch: 0,
                means: StepStats {
                    loss: 1.5,
                    ..StepStats::default()
                },
                lr: 1e-3,
                beta: 1.0,
                images_per_s: 20.0,
                skipped: 0,
            }),
            TrainEvent::Validation(Validation {
                step: 5,
                epoch: 0,
                elbo: -3.0,
                kl: 0.5,
                ged: 0.4,
                hm_iou: 0.6,
                grid: Some(crate::tensorboard::Image::grey(1, 1, vec![0]).unwrap()),
            }),
            TrainEvent::Finished(Outcome {
                run: "runs/x".into(),
                steps: 10,
                val_ged: Some(0.4),
                best_val_ged: Some(0.4),
                hm_iou: Some(0.6),
                ideal_ged: None,
                skipped: 0,
            }),
        ];
        for event in &events {
            sink.event(event).unwrap();
        }
        let text = String::from_utf8(sink.out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with(r#"{"event":"step","#), "{}", lines[0]);
        assert!(!lines[2].contains("grid"), "{}", lines[2]);
        let back: TrainEvent = serde_json::from_str(lines[1]).unwrap();
        assert!(matches!(back, TrainEvent::Interval(i) if i.means.loss == 1.5 && i.step == 5));
        let back: TrainEvent = serde_json::from_str(lines[3]).unwrap();
        assert!(matches!(back, TrainEvent::Finished(o) if o.steps == 10));
    }
}

//! Progress: an indicatif bar on a terminal, plain periodic lines otherwise (cluster logs).
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
}

impl Progress {
    pub fn new(total: u64, start: u64, plain: bool) -> Self {
        let bar = (!plain && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total).with_position(start);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
                )
                .expect("a valid template"),
            );
            bar
        });
        Self { bar, total }
    }

    pub fn tick(&self, step: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(step);
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &self,
        step: u64,
        epoch: u64,
        loss: f64,
        elbo: f64,
        kl: f64,
        images_per_s: Option<f64>,
        val: Option<(f64, f64)>,
    ) {
        let mut msg = format!(
            "epoch {epoch}  loss {loss:.1}  elbo {elbo:.1}  kl {kl:.3}  {:.1} img/s",
            images_per_s.unwrap_or(0.0)
        );
        if let Some((ged, hm_iou)) = val {
            msg.push_str(&format!("  val GED {ged:.3}  HM-IoU {hm_iou:.3}"));
        }
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(msg);
            }
            None => eprintln!("step {step}/{}  {msg}", self.total),
        }
    }

    /// A line that stays (a warning), above the bar if there is one.
    pub fn message(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

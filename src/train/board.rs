//! The run's TensorBoard file, organised the way TensorBoard shows it: scalars grouped by
//! the part of their tag before the `/` (`train/`, `val/`, `perf/`, `hparams/`), the spec
//! as text, a custom-scalars layout that puts val GED beside the ideal model's, and an
//! HParams session for every run, so that plain runs compare as sweep trials do.
use super::events::{EventSink, Interval, SinkError, TrainEvent, Validation};
use crate::config::{Experiment, Schedule};
use crate::tensorboard::{
    EventWriter, HParamDomain, HParamSpec, HParamValue, LayoutChart, SessionStatus,
    TensorboardError,
};
use std::time::SystemTime;

/// Every tag a run writes.
pub mod tags {
    pub const TRAIN_LOSS: &str = "train/loss";
    pub const TRAIN_ELBO: &str = "train/elbo";
    pub const TRAIN_KL: &str = "train/kl";
    pub const TRAIN_RECONSTRUCTION: &str = "train/reconstruction";
    pub const TRAIN_REG: &str = "train/reg";
    pub const TRAIN_GRAD_NORM: &str = "train/grad_norm";
    /// Only when a schedule moves it; a constant rate is in the spec and HParams.
    pub const TRAIN_LEARNING_RATE: &str = "train/learning_rate";
    pub const PERF_IMAGES_PER_SEC: &str = "perf/images_per_sec";
    pub const VAL_ELBO: &str = "val/elbo";
    pub const VAL_KL: &str = "val/kl";
    pub const VAL_GED: &str = "val/ged";
    /// The ideal model's val GED (synthetic data), at every validation so it draws a line.
    pub const VAL_GED_IDEAL: &str = "val/ged_ideal";
    pub const VAL_HM_IOU: &str = "val/hm_iou";
    pub const VAL_SAMPLES: &str = "val/samples";
    /// The lowest val GED so far (validations after step 0), and the HM-IoU there.
    pub const BEST_VAL_GED: &str = "hparams/best_val_ged";
    pub const BEST_VAL_HM_IOU: &str = "hparams/best_val_hm_iou";
    /// The last validation's: HParams shows a metric's last value.
    pub const FINAL_VAL_GED: &str = "hparams/final_val_ged";
    pub const FINAL_VAL_HM_IOU: &str = "hparams/final_val_hm_iou";
    /// The resolved spec, as TOML in a text summary.
    pub const RUN_SPEC: &str = "run/spec";
    /// The metrics the HParams dashboard compares runs by.
    pub const HPARAMS_METRICS: [&str; 4] = [
        BEST_VAL_GED,
        BEST_VAL_HM_IOU,
        FINAL_VAL_GED,
        FINAL_VAL_HM_IOU,
    ];
}

/// A run's HParams session: its hyperparameters and the group it is averaged in.
#[derive(Debug, Clone)]
pub struct HParamsSession {
    pub hparams: Vec<(String, HParamValue)>,
    pub group: String,
    pub started: SystemTime,
}

/// The keys every run records in HParams, in this order.
pub const STANDARD_HPARAMS: [&str; 10] = [
    "run",
    "data",
    "model.beta",
    "model.latent_dim",
    "model.filters",
    "model.reconstruction",
    "train.lr",
    "train.schedule",
    "train.batch",
    "train.seed",
];

/// The standard hyperparameters' types, for an HParams experiment record.
pub fn standard_hparam_specs() -> Vec<HParamSpec> {
    STANDARD_HPARAMS
        .iter()
        .map(|&name| HParamSpec {
            name: name.into(),
            domain: match name {
                "run" | "data" | "model.filters" | "model.reconstruction" | "train.schedule" => {
                    HParamDomain::String
                }
                _ => HParamDomain::Float64,
            },
        })
        .collect()
}

impl HParamsSession {
    /// The standard hyperparameters of `experiment` for the run folder `run`, with
    /// `extra` (a sweep trial's values) replacing or adding keys.
    pub fn of(
        experiment: &Experiment,
        run: &str,
        extra: Vec<(String, HParamValue)>,
        group: String,
    ) -> Self {
        let m = &experiment.model;
        let t = &experiment.train;
        let data = match (&experiment.data.store, &experiment.data.synthetic) {
            (Some(store), _) => store.display().to_string(),
            (None, Some(s)) => format!("synthetic {}px, {} items", s.size, s.items),
            (None, None) => "-".into(),
        };
        let filters = format!("{:?}", m.filters);
        let values: [HParamValue; 10] = [
            run.into(),
            data.into(),
            m.beta.into(),
            m.latent_dim.into(),
            filters.into(),
            m.reconstruction.to_string().into(),
            t.lr.into(),
            schedule_name(&t.schedule).into(),
            t.batch.into(),
            HParamValue::Number(t.seed as f64),
        ];
        let mut hparams: Vec<(String, HParamValue)> = STANDARD_HPARAMS
            .iter()
            .map(|k| k.to_string())
            .zip(values)
            .collect();
        for (key, value) in extra {
            match hparams.iter_mut().find(|(k, _)| *k == key) {
                Some(slot) => slot.1 = value,
                None => hparams.push((key, value)),
            }
        }
        HParamsSession {
            hparams,
            group,
            started: SystemTime::now(),
        }
    }
}

fn schedule_name(schedule: &Schedule) -> &'static str {
    match schedule {
        Schedule::Constant => "constant",
        Schedule::Cosine { .. } => "cosine",
        Schedule::Step { .. } => "step",
    }
}

/// The custom-scalars dashboard's charts: each puts side by side what one wants to compare.
pub fn layout() -> Vec<(&'static str, Vec<LayoutChart>)> {
    let chart = |title: &str, tags: &[&str]| LayoutChart {
        title: title.into(),
        tags: tags.iter().map(|t| format!("^{t}$")).collect(),
    };
    vec![
        (
            "validation",
            vec![
                chart(
                    "val GED and the ideal model's",
                    &[tags::VAL_GED, tags::VAL_GED_IDEAL],
                ),
                chart("HM-IoU", &[tags::VAL_HM_IOU]),
            ],
        ),
        (
            "train against val",
            vec![
                chart("ELBO (train, val)", &[tags::TRAIN_ELBO, tags::VAL_ELBO]),
                chart("KL (train, val)", &[tags::TRAIN_KL, tags::VAL_KL]),
            ],
        ),
    ]
}

/// The run's one TensorBoard event file.
pub struct TensorboardSink {
    writer: EventWriter,
    session: HParamsSession,
    spec: String,
    /// A schedule moves the learning rate, so it is charted.
    lr_varies: bool,
    ideal_ged: Option<f64>,
    best_val_ged: Option<f64>,
}

impl TensorboardSink {
    pub fn new(writer: EventWriter, session: HParamsSession, experiment: &Experiment) -> Self {
        let spec = toml::to_string(experiment).unwrap_or_else(|e| format!("(not shown: {e})"));
        TensorboardSink {
            writer,
            session,
            spec,
            lr_varies: experiment.train.schedule != Schedule::Constant,
            ideal_ged: None,
            best_val_ged: None,
        }
    }

    fn write(&mut self, event: &TrainEvent) -> Result<(), TensorboardError> {
        match event {
            TrainEvent::Started {
                step,
                resumed,
                ideal_ged,
                best_val_ged,
                run,
                ..
            } => {
                (self.ideal_ged, self.best_val_ged) = (*ideal_ged, *best_val_ged);
                if *resumed {
                    let checkpoint = run.join(crate::run::CHECKPOINTS_DIR);
                    let checkpoint = checkpoint.display().to_string();
                    self.writer.add_restart(*step as i64, &checkpoint)?;
                } else {
                    self.start()?;
                }
            }
            TrainEvent::Interval(i) => self.interval(i)?,
            TrainEvent::Validation(v) => self.validation(v)?,
            TrainEvent::Finished(_) => self.end_session(SessionStatus::Success)?,
            TrainEvent::Failed { .. } => self.end_session(SessionStatus::Failure)?,
            _ => {}
        }
        Ok(())
    }

    /// What a new run writes once: its HParams session, the layout and the spec.
    fn start(&mut self) -> Result<(), TensorboardError> {
        let s = &self.session;
        self.writer
            .add_hparams_session_start(&s.hparams, &s.group, s.started)?;
        self.writer.add_custom_scalars_layout(&layout())?;
        let spec = format!("```toml\n{}```", self.spec);
        self.writer.add_text(tags::RUN_SPEC, 0, &spec)
    }

    fn interval(&mut self, i: &Interval) -> Result<(), TensorboardError> {
        let m = &i.means;
        let mut values = vec![
            (tags::TRAIN_LOSS, m.loss),
            (tags::TRAIN_ELBO, m.elbo),
            (tags::TRAIN_KL, m.kl),
            (tags::TRAIN_RECONSTRUCTION, m.reconstruction),
            (tags::TRAIN_REG, m.reg),
            (tags::TRAIN_GRAD_NORM, m.grad_norm),
            (tags::PERF_IMAGES_PER_SEC, i.images_per_s),
        ];
        if self.lr_varies {
            values.push((tags::TRAIN_LEARNING_RATE, i.lr));
        }
        self.writer.add_scalars(i.step as i64, &values)
    }

    fn validation(&mut self, v: &Validation) -> Result<(), TensorboardError> {
        let step = v.step as i64;
        let mut values = vec![
            (tags::VAL_ELBO, v.elbo),
            (tags::VAL_KL, v.kl),
            (tags::VAL_GED, v.ged),
            (tags::VAL_HM_IOU, v.hm_iou),
            (tags::FINAL_VAL_GED, v.ged),
            (tags::FINAL_VAL_HM_IOU, v.hm_iou),
        ];
        values.extend(self.ideal_ged.map(|g| (tags::VAL_GED_IDEAL, g)));
        // Step 0 scores the untrained model: a baseline, never the best.
        let better = v.ged.is_finite() && self.best_val_ged.is_none_or(|b| v.ged < b);
        if v.step > 0 && better {
            self.best_val_ged = Some(v.ged);
            values.extend([
                (tags::BEST_VAL_GED, v.ged),
                (tags::BEST_VAL_HM_IOU, v.hm_iou),
            ]);
        }
        self.writer.add_scalars(step, &values)?;
        if let Some(grid) = &v.grid {
            self.writer.add_image(tags::VAL_SAMPLES, step, grid)?;
        }
        Ok(())
    }

    fn end_session(&mut self, status: SessionStatus) -> Result<(), TensorboardError> {
        self.writer
            .add_hparams_session_end(status, SystemTime::now())?;
        self.writer.flush()
    }
}

impl EventSink for TensorboardSink {
    fn event(&mut self, event: &TrainEvent) -> Result<(), SinkError> {
        self.write(event)
            .map_err(|e| SinkError::new("TensorBoard events", e))
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.writer
            .flush()
            .map_err(|e| SinkError::new("TensorBoard events", e))
    }
}

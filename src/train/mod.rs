//! `probunet train`: the training loop with validation, checkpoints and resume, writing
//! into a run folder ([`crate::run`]) and telling what happens as [`TrainEvent`]s.
//!
//! One step: draw a batch, evaluate the ELBO with z from the posterior, back-propagate,
//! read the loss terms and the gradient norm back in one transfer, and update with Adam
//! unless something is not finite. Randomness is reseeded from (seed, step) at every step,
//! so a run resumed from a checkpoint continues exactly as the uninterrupted run would.
mod adam;
pub mod board;
pub mod events;
pub mod sinks;
mod step;

pub use adam::Adam;
pub use board::{tags, HParamsSession};
pub use events::{EventSink, FnSink, Outcome, SinkError, StepStats, TrainEvent};
pub use sinks::JsonLinesSink;
pub use step::{forward_backward, named_variables};

use crate::config::{Experiment, NanPolicy, Resolved};
use crate::data::loader::Loader;
use crate::data::source::DataSource;
use crate::data::split::SplitName;
use crate::data::store::Store;
use crate::data::DataError;
use crate::device::{describe, DeviceError, Precision};
use crate::metrics::EmptyConvention;
use crate::model::{ModelError, ProbUNet};
use crate::run::{
    data_source, Checkpoint, Checkpoints, Meta, MetricsCsv, OpenInterval, RunDir, RunError,
    RunLock, TrainState,
};
use crate::score::{ScoreError, ValidationPlan};
use crate::seed::{step_seed, STREAM_TRAIN, STREAM_VALIDATION};
use crate::tensorboard::{EventWriter, TensorboardError};
use board::TensorboardSink;
use events::Interval;
use sinks::{CurvesSink, MetricsSink};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{nn, Device};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Score(#[from] ScoreError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Tensorboard(#[from] TensorboardError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("checkpoint {}: {why}", path.display())]
    Checkpoint { path: PathBuf, why: String },
    #[error("{0}")]
    Spec(String),
    #[error("{}", non_finite_advice(*step, what, run, *last_checkpoint))]
    NonFinite {
        step: u64,
        what: String,
        run: PathBuf,
        /// The step of the run's latest checkpoint, which a resume starts from.
        last_checkpoint: Option<u64>,
    },
    #[error("interrupted at step {step}; checkpoint written. Resume with: probunet train --resume {}", run.display())]
    Interrupted { step: u64, run: PathBuf },
}

fn non_finite_advice(step: u64, what: &str, run: &Path, last_checkpoint: Option<u64>) -> String {
    let next = match last_checkpoint {
        Some(at) => format!(
            "The last good checkpoint is step {at}; after changing the spec (e.g. a lower \
             train.lr or a model.log_sigma_clamp), resume from it with \
             `probunet train --resume {}`",
            run.display()
        ),
        None => "It stopped before its first checkpoint: change the spec (e.g. a lower \
                 train.lr or a model.log_sigma_clamp) and start a new run"
            .into(),
    };
    format!("step {step}: non-finite {what}; stopped (policy on_nan = \"stop\"). {next}")
}

/// Options that are about this invocation, not the experiment.
#[derive(Default)]
pub struct TrainOptions {
    /// Set by a Ctrl-C handler; the loop finishes its step, checkpoints and stops.
    pub interrupt: Option<Arc<AtomicBool>>,
    /// Where events go besides the run's own metrics.csv and TensorBoard file.
    pub sinks: Vec<Box<dyn EventSink + Send>>,
    /// A sweep trial's values and group, recorded in HParams beside the standard
    /// hyperparameters every run records.
    pub hparams: Option<HParamsSession>,
}

/// The run's HParams session: the standard hyperparameters, plus a sweep trial's values.
fn hparams_session(
    experiment: &Experiment,
    run: &RunDir,
    trial: Option<HParamsSession>,
) -> HParamsSession {
    let name = run.path.file_name().map_or_else(
        || run.path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let (extra, group, started) = match trial {
        Some(t) => (t.hparams, t.group, Some(t.started)),
        None => (Vec::new(), String::new(), None),
    };
    let mut session = HParamsSession::of(experiment, &name, extra, group);
    session.started = started.unwrap_or(session.started);
    session
}

/// Refuses, before anything is allocated, a training step (on the CPU: a GPU's memory is
/// not the host's) or a validation pass that memory cannot hold on `h` x `w` images.
fn check_memory(experiment: &Experiment, device: Device, h: u64, w: u64) -> Result<(), TrainError> {
    let train = &experiment.train;
    if device == Device::Cpu {
        let batch = train.batch as u64;
        let part = crate::model::parts::part_images(&experiment.model, batch, h, w, device);
        (experiment.model)
            .check_training(batch, part, h, w)
            .map_err(ModelError::from)?;
    }
    let val_batch = validation_batch(train.batch);
    let what = format!(
        "validation with train.val_samples = {} (batches of {val_batch})",
        train.val_samples
    );
    (experiment.model)
        .check_sampling(what, val_batch as u64, train.val_samples as u64, h, w)
        .map_err(ModelError::from)?;
    Ok(())
}

/// Images per validation forward pass: the training batch, at least 8 (the scores do not
/// depend on it).
fn validation_batch(train_batch: usize) -> usize {
    train_batch.max(8)
}

/// The optimiser steps a run of `experiment` takes when its training split holds
/// `train_items` items: `train.steps`, or `train.epochs` full batches per epoch.
pub fn planned_steps(experiment: &Experiment, train_items: usize) -> Option<u64> {
    let train = &experiment.train;
    match (train.steps, train.epochs) {
        (Some(steps), _) => Some(steps),
        (None, Some(epochs)) => Some(epochs * (train_items / train.batch.max(1)) as u64),
        (None, None) => None,
    }
}

/// Trains a new run of `resolved` in `log.runs_dir/<name>-<timestamp>`. Nothing is left
/// behind when setting up fails.
pub fn train(resolved: &Resolved, options: TrainOptions) -> Result<Outcome, TrainError> {
    let experiment = &resolved.experiment;
    let run = RunDir::create(&experiment.log.runs_dir, &experiment.name)?;
    let started = run.lock().map_err(TrainError::from).and_then(|lock| {
        let source = data_source(experiment)?;
        Trainer::start(resolved, run.clone(), lock, source, options)
    });
    match started {
        Ok(mut trainer) => trainer.train_logged(),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&run.path);
            Err(e)
        }
    }
}

/// Trains a new run of `resolved` in the folder of `run` (a sweep's trial folder), whose
/// lock the caller holds.
pub fn train_in(
    run: RunDir,
    lock: RunLock,
    resolved: &Resolved,
    options: TrainOptions,
) -> Result<Outcome, TrainError> {
    let source = data_source(&resolved.experiment)?;
    Trainer::start(resolved, run, lock, source, options)?.train_logged()
}

/// Continues `run` from its latest checkpoint with the spec it was started with; the
/// caller holds its lock.
pub fn resume(
    run: RunDir,
    lock: RunLock,
    resolved: &Resolved,
    options: TrainOptions,
) -> Result<Outcome, TrainError> {
    // What a killed write left before its rename.
    crate::sys::remove_dead_temporaries(&run.path, crate::run::TEMPORARY)
        .map_err(|e| RunError::io(&run.path, e))?;
    let checkpoints = run.checkpoints(resolved.experiment.train.keep_last);
    checkpoints.repair()?;
    let latest = checkpoints
        .latest()?
        .ok_or_else(|| TrainError::Checkpoint {
            path: run.path.clone(),
            why: "the run has no checkpoint to resume from".into(),
        })?;
    let (changes, spec) = respec(&run, resolved, latest.state.step)?;
    let (store, prepared) = run.open_store(&resolved.experiment)?;
    let mut trainer = Trainer::new(resolved, run, lock, store, options)?;
    trainer.prepared = prepared;
    trainer.restore(&latest)?;
    if let Some(spec) = spec {
        trainer
            .run
            .write_atomic(crate::run::SPEC_FILE, spec.as_bytes())?;
    }
    trainer.changes = changes;
    trainer.train_logged()
}

/// What `resolved` changes in `run`'s recorded spec for a resume at `step`, refusing
/// what may not change ([`Resolved::changes_from`]); and, when it changes anything, the
/// spec.toml that records it, which the caller writes once the checkpoint is restored.
fn respec(
    run: &RunDir,
    resolved: &Resolved,
    step: u64,
) -> Result<(Vec<crate::config::Change>, Option<String>), TrainError> {
    let path = run.spec_path();
    let text = std::fs::read_to_string(&path).map_err(|e| RunError::io(&path, e))?;
    let recorded = crate::config::load_recorded(&text, &path)?;
    let changes = resolved.changes_from(&recorded.experiment)?;
    let spec = match changes.is_empty() {
        true => None,
        false => Some(resolved.to_toml_resumed(&text, &changes, step)?),
    };
    Ok((changes, spec))
}

/// Opens the run at `path`, takes its lock and resumes it: `probunet train --resume`.
pub fn resume_path(
    path: &Path,
    resolved: &Resolved,
    options: TrainOptions,
) -> Result<Outcome, TrainError> {
    let run = RunDir::open(path)?;
    let lock = run.lock()?;
    resume(run, lock, resolved, options)
}

/// The sums of one log interval.
struct IntervalSums {
    steps: u64,
    skipped: u64,
    sums: StepStats,
    started: Instant,
}

impl IntervalSums {
    fn new() -> Self {
        IntervalSums {
            steps: 0,
            skipped: 0,
            sums: StepStats::default(),
            started: Instant::now(),
        }
    }

    /// The interval as a checkpoint keeps it; `None` at an interval's start.
    fn open(&self) -> Option<OpenInterval> {
        (self.steps > 0).then(|| OpenInterval {
            steps: self.steps,
            skipped: self.skipped,
            sums: self.sums,
            seconds: self.started.elapsed().as_secs_f64(),
        })
    }

    /// Continues an interval a checkpoint kept.
    fn reopen(open: &OpenInterval) -> Self {
        let now = Instant::now();
        let elapsed = std::time::Duration::try_from_secs_f64(open.seconds).unwrap_or_default();
        IntervalSums {
            steps: open.steps,
            skipped: open.skipped,
            sums: open.sums,
            started: now.checked_sub(elapsed).unwrap_or(now),
        }
    }

    /// Means over the steps that were not skipped.
    fn means(&self) -> StepStats {
        self.sums.divided((self.steps - self.skipped).max(1) as f64)
    }
}

struct Trainer {
    experiment: Experiment,
    run: RunDir,
    _lock: RunLock,
    device: Device,
    store: Store,
    /// What prepare reported when the synthetic store was generated for this run.
    prepared: Option<crate::data::prepare::Summary>,
    vs: nn::VarStore,
    model: ProbUNet,
    adam: Adam,
    loader: Loader,
    checkpoints: Checkpoints,
    sinks: Vec<Box<dyn EventSink + Send>>,
    interrupt: Option<Arc<AtomicBool>>,
    total_steps: u64,
    step: u64,
    resumed: bool,
    /// What the resume changed in the run's spec, for the `Started` event.
    changes: Vec<crate::config::Change>,
    interval: IntervalSums,
    best_val_ged: Option<f64>,
    last_val: Option<(f64, f64)>,
    skipped_total: u64,
}

impl Trainer {
    /// A fresh run: writes its spec and meta.json, then sets the trainer up.
    fn start(
        resolved: &Resolved,
        run: RunDir,
        lock: RunLock,
        source: DataSource,
        options: TrainOptions,
    ) -> Result<Trainer, TrainError> {
        let device = resolved.experiment.train.device.resolve()?;
        let (store, prepared) = source.open()?;
        run.write_atomic(crate::run::SPEC_FILE, resolved.to_toml()?.as_bytes())?;
        run.write_meta(&Meta::now(describe(device), source.dir()))?;
        let mut trainer = Trainer::new(resolved, run, lock, store, options)?;
        trainer.prepared = prepared;
        Ok(trainer)
    }

    fn new(
        resolved: &Resolved,
        run: RunDir,
        lock: RunLock,
        store: Store,
        options: TrainOptions,
    ) -> Result<Trainer, TrainError> {
        let experiment = resolved.experiment.clone();
        let train = &experiment.train;
        let device = train.device.resolve()?;
        if train.precision == Precision::Bf16 && !device.is_cuda() {
            return Err(TrainError::Spec(format!(
                "train.precision = \"bf16\" needs a CUDA device, but train.device resolved to {}",
                describe(device)
            )));
        }
        let shape = store.manifest.shape;
        check_memory(&experiment, device, shape.height as u64, shape.width as u64)?;
        tch::manual_seed(step_seed(train.seed, 0, 0));
        let vs = nn::VarStore::new(device);
        let mut model = ProbUNet::new(&vs.root(), experiment.model.clone())?;
        model.set_precision(train.precision);
        model
            .check_input(&[1, 1, shape.height as i64, shape.width as i64])
            .map_err(|e| TrainError::Spec(format!("{}: {e}", store.dir.display())))?;
        let adam = Adam::new(named_variables(&vs))?;
        let loader = Loader::new(
            &store,
            SplitName::Train,
            train.batch,
            experiment.data.augment,
            train.seed,
            device,
        )?;
        let total_steps = planned_steps(&experiment, store.split(SplitName::Train).len())
            .ok_or_else(|| TrainError::Spec("train: set train.steps or train.epochs".into()))?;
        let checkpoints = run.checkpoints(train.keep_last);
        let session = hparams_session(&experiment, &run, options.hparams);
        let mut sinks: Vec<Box<dyn EventSink + Send>> = vec![Box::new(TensorboardSink::new(
            EventWriter::create(&run.path)?,
            session,
            &experiment,
        ))];
        sinks.extend(options.sinks);
        Ok(Trainer {
            experiment,
            run,
            _lock: lock,
            device,
            store,
            prepared: None,
            vs,
            model,
            adam,
            loader,
            checkpoints,
            sinks,
            interrupt: options.interrupt,
            total_steps,
            step: 0,
            resumed: false,
            changes: Vec::new(),
            interval: IntervalSums::new(),
            best_val_ged: None,
            last_val: None,
            skipped_total: 0,
        })
    }

    /// Continues from a checkpoint: weights, optimiser moments, data position and step.
    /// metrics.csv loses the rows logged after it, and TensorBoard is told to drop the
    /// events (the restart marker of [`TrainEvent::Started`]).
    fn restore(&mut self, ckpt: &Checkpoint) -> Result<(), TrainError> {
        let model_path = ckpt.model_path();
        if let Some(why) = crate::run::shape_mismatch(&self.vs, &model_path)? {
            return Err(TrainError::Checkpoint {
                path: model_path,
                why: format!("does not fit this model: {why}"),
            });
        }
        self.vs
            .load(&model_path)
            .map_err(|e| TrainError::Checkpoint {
                path: model_path.clone(),
                why: format!(
                    "does not fit this model: {}",
                    crate::run::safetensors::read_error(&e)
                ),
            })?;
        crate::run::check_finite(&self.vs, &model_path)?;
        self.adam
            .load_state(&ckpt.optimizer_tensors()?, ckpt.state.optimizer_steps)
            .map_err(|why| TrainError::Checkpoint {
                path: ckpt.dir.clone(),
                why,
            })?;
        self.loader
            .restore(ckpt.state.loader.clone())
            .map_err(|why| TrainError::Checkpoint {
                path: ckpt.dir.join(crate::run::STATE_FILE),
                why,
            })?;
        self.step = ckpt.state.step;
        self.best_val_ged = ckpt.state.best_val_ged;
        self.interval = ckpt
            .state
            .interval
            .as_ref()
            .map_or_else(IntervalSums::new, IntervalSums::reopen);
        self.resumed = true;
        Ok(())
    }

    fn emit(&mut self, event: TrainEvent) -> Result<(), TrainError> {
        for sink in &mut self.sinks {
            sink.event(&event)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), TrainError> {
        for sink in &mut self.sinks {
            sink.flush()?;
        }
        Ok(())
    }

    /// The loop, with a `Failed` event (and the logs flushed) when it stops on an error.
    fn train_logged(&mut self) -> Result<Outcome, TrainError> {
        let csv_path = self.run.metrics_path();
        let csv = match self.resumed {
            true => MetricsCsv::resume(&csv_path, self.step)?,
            false => MetricsCsv::create(&csv_path)?,
        };
        self.sinks.insert(0, Box::new(MetricsSink::new(csv)));
        // After metrics.csv, which it reads once that sink has flushed.
        self.sinks
            .insert(1, Box::new(CurvesSink::new(self.run.path.clone())));
        let result = self.run_steps();
        if let Err(e) = &result {
            let failed = TrainEvent::Failed {
                step: self.step,
                error: e.to_string(),
            };
            for sink in &mut self.sinks {
                let _ = sink.event(&failed);
                let _ = sink.flush();
            }
        }
        result
    }

    fn run_steps(&mut self) -> Result<Outcome, TrainError> {
        let ideal_ged = self.store.manifest.ideal.as_ref().map(|i| i.ged_val);
        if let Some(summary) = self.prepared.take() {
            self.emit(TrainEvent::StorePrepared {
                summary: summary.to_string(),
            })?;
        }
        let changes = std::mem::take(&mut self.changes);
        self.emit(TrainEvent::Started {
            run: self.run.path.clone(),
            step: self.step,
            total_steps: self.total_steps,
            resumed: self.resumed,
            changes,
            empty_val_split: !self.validates(),
            ideal_ged,
            best_val_ged: self.best_val_ged,
        })?;
        if !self.resumed {
            self.interval = IntervalSums::new();
            // The untrained model's scores: where every curve starts from.
            if self.experiment.train.val_every > 0 && self.validates() {
                self.validate()?;
            }
        }
        while self.step < self.total_steps {
            if self.interrupted() {
                self.checkpoint(false, None)?;
                return Err(TrainError::Interrupted {
                    step: self.step,
                    run: self.run.path.clone(),
                });
            }
            self.train_step()?;
            self.after_step()?;
        }
        self.flush()?;
        let outcome = Outcome {
            run: self.run.path.clone(),
            steps: self.step,
            val_ged: self.last_val.map(|v| v.0),
            best_val_ged: self.best_val_ged,
            hm_iou: self.last_val.map(|v| v.1),
            ideal_ged,
            skipped: self.skipped_total,
        };
        self.emit(TrainEvent::Finished(outcome.clone()))?;
        Ok(outcome)
    }

    fn interrupted(&self) -> bool {
        self.interrupt
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::SeqCst))
    }

    /// One optimiser step, or a skipped batch under `on_nan = "skip"`.
    fn train_step(&mut self) -> Result<(), TrainError> {
        let train = &self.experiment.train;
        tch::manual_seed(step_seed(train.seed, self.step, STREAM_TRAIN));
        let lr = train.schedule.lr_at(train.lr, self.step, self.total_steps);
        let on_nan = train.on_nan;
        let batch = self.loader.next_batch()?;
        let (terms, stats) =
            forward_backward(&self.model, &mut self.adam, &batch.images, &batch.masks)?;
        self.interval.steps += 1;
        if stats.is_finite() {
            self.adam.step(lr)?;
            self.interval.sums = self.interval.sums + stats;
            return Ok(());
        }
        let what = step::diagnose(&stats, &terms);
        match on_nan {
            NanPolicy::Stop => Err(self.non_finite(what)),
            NanPolicy::Skip => {
                self.interval.skipped += 1;
                self.skipped_total += 1;
                self.emit(TrainEvent::Skipped {
                    step: self.step,
                    what,
                })
            }
        }
    }

    /// What follows a step: its event, the log interval, validation, checkpoints.
    fn after_step(&mut self) -> Result<(), TrainError> {
        self.step += 1;
        let (step, last) = (self.step, self.step == self.total_steps);
        self.emit(TrainEvent::Step {
            step,
            total_steps: self.total_steps,
        })?;
        let train = &self.experiment.train;
        let every = |n: u64| n > 0 && step % n == 0;
        let (log_now, val_now, ckpt_now) = (
            every(self.experiment.log.every.max(1)) || last,
            every(train.val_every) || last,
            every(train.checkpoint_every) || last,
        );
        if log_now {
            self.log_interval()?;
        }
        let mut val_ged = None;
        if val_now && self.validates() {
            let ged = self.validate()?;
            val_ged = Some(ged);
            if ged.is_finite() && self.best_val_ged.is_none_or(|best| ged < best) {
                self.best_val_ged = Some(ged);
                self.checkpoint(true, Some(ged))?;
            }
        }
        if ckpt_now {
            self.checkpoint(false, val_ged)?;
        }
        Ok(())
    }

    /// Whether there is a val split to validate on: a store prepared without one trains
    /// without validation (the `Started` event says so) rather than logging NaN GEDs.
    fn validates(&self) -> bool {
        !self.store.split(SplitName::Val).is_empty()
    }

    fn log_interval(&mut self) -> Result<(), TrainError> {
        let train = &self.experiment.train;
        let seconds = self.interval.started.elapsed().as_secs_f64();
        let interval = Interval {
            step: self.step,
            total_steps: self.total_steps,
            epoch: self.loader.epoch(),
            means: self.interval.means(),
            // The rate of the step just taken: the schedule at step - 1.
            lr: train
                .schedule
                .lr_at(train.lr, self.step - 1, self.total_steps),
            beta: self.experiment.model.beta,
            images_per_s: (self.interval.steps * train.batch as u64) as f64 / seconds.max(1e-9),
            skipped: self.interval.skipped,
        };
        self.interval = IntervalSums::new();
        self.emit(TrainEvent::Interval(interval))
    }

    /// Scores the validation split with the sampling path that `probunet eval` uses, the
    /// noise seeded from `train.seed`: the val GED of step N is what
    /// `probunet eval --split val --seed <train.seed> --samples <val_samples>` gives for
    /// that step's checkpoint.
    fn validate(&mut self) -> Result<f64, TrainError> {
        let train = &self.experiment.train;
        let plan = ValidationPlan {
            split: SplitName::Val,
            batch: validation_batch(train.batch),
            samples: train.val_samples,
            max_items: train.val_items,
            seed: train.seed,
            convention: EmptyConvention::default(),
        };
        // The ELBO's z from the posterior comes from libtorch's generator: seeded per
        // validation, so the val ELBO does not depend on what ran before it.
        tch::manual_seed(step_seed(train.seed, self.step, STREAM_VALIDATION));
        // Validation allocates other sizes than a training step: hand the blocks each
        // phase keeps for reuse back on the way in and out, so the two never add up.
        crate::memory::empty_cache();
        let val = crate::score::validate(&self.model, &self.store, &plan, self.device);
        crate::memory::empty_cache();
        let val = val?;
        let shown = &val.items[..val.items.len().min(4)];
        let captions: Vec<String> = shown
            .iter()
            .zip(&val.per_image)
            .map(|(&item, m)| {
                let key = &self.store.manifest.keys[item];
                let n = train.val_samples;
                format!(
                    "{key}   GED {:.3}   HM-IoU {:.3}   ({n} samples)",
                    m.ged, m.hm_iou
                )
            })
            .collect();
        let grid = match self.experiment.log.images && !shown.is_empty() {
            true => Some(crate::score::sample_grid(
                &self.model,
                &self.store,
                shown,
                &captions,
                6,
                train.seed,
                self.device,
            )?),
            false => None,
        };
        let (ged, hm_iou) = (val.ged(), val.hm_iou());
        self.last_val = Some((ged, hm_iou));
        self.emit(TrainEvent::Validation(events::Validation {
            step: self.step,
            epoch: self.loader.epoch(),
            elbo: val.elbo,
            kl: val.kl,
            ged,
            hm_iou,
            grid,
        }))?;
        Ok(ged)
    }

    fn state(&self, val_ged: Option<f64>) -> TrainState {
        TrainState {
            step: self.step,
            epoch: self.loader.epoch(),
            loader: self.loader.state().clone(),
            optimizer_steps: self.adam.steps,
            best_val_ged: self.best_val_ged,
            val_ged,
            created_at: chrono::Utc::now(),
            interval: self.interval.open(),
        }
    }

    fn non_finite(&self, what: String) -> TrainError {
        TrainError::NonFinite {
            step: self.step,
            what,
            run: self.run.path.clone(),
            last_checkpoint: self
                .checkpoints
                .steps()
                .ok()
                .and_then(|s| s.last().map(|l| l.0)),
        }
    }

    /// Flushes the logs, then writes a checkpoint of a model known to be finite.
    fn checkpoint(&mut self, best: bool, val_ged: Option<f64>) -> Result<(), TrainError> {
        self.flush()?;
        let params = named_variables(&self.vs);
        if crate::run::first_non_finite(&params)?.is_some() {
            return Err(self.non_finite("weights (refusing to checkpoint them)".into()));
        }
        let path = self.checkpoints.save(
            &params,
            &self.adam.state_tensors(),
            &self.state(val_ged),
            best,
        )?;
        self.emit(TrainEvent::Checkpoint {
            step: self.step,
            path,
            best,
        })
    }
}

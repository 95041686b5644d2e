//! `probunet train`: the training loop with validation, checkpoints, resume, TensorBoard
//! and metrics.csv.
//!
//! One step: draw a batch, evaluate the ELBO with z from the posterior, back-propagate,
//! read the loss terms and the gradient norm back in one transfer, and update with Adam
//! unless something is not finite. Randomness is reseeded from (seed, step) at every step,
//! so a run resumed from a checkpoint continues exactly as the uninterrupted run would.
mod adam;
mod checkpoint;
mod progress;
pub mod run;

pub use adam::Adam;
pub use checkpoint::{shape_mismatch, Checkpoint, Checkpoints, TrainState, MODEL_FILE};
pub use run::{MetricsRow, Phase, RunDir};

use crate::config::{Experiment, NanPolicy, Resolved};
use crate::data::loader::Loader;
use crate::data::prepare::{prepare_synthetic, PrepareOptions};
use crate::data::split::SplitName;
use crate::data::store::Store;
use crate::data::DataError;
use crate::device::{describe, DeviceError, Precision};
use crate::eval::{sample_grid, validate, EvalError};
use crate::metrics::EmptyConvention;
use crate::model::{ModelError, ProbUNet};
use crate::tensorboard::{EventWriter, TensorboardError};
use progress::Progress;
use run::MetricsCsv;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Tensorboard(#[from] TensorboardError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{}: {why}", path.display())]
    Run { path: PathBuf, why: String },
    #[error("checkpoint {}: {why}", path.display())]
    Checkpoint { path: PathBuf, why: String },
    #[error("{0}")]
    Spec(String),
    #[error(
        "step {step}: non-finite {what}; stopped (policy on_nan = \"stop\"). The last good checkpoint is in {}; \
         resume with `probunet train --resume {}` after changing the spec (e.g. a lower train.lr or a \
         model.log_sigma_clamp)", run.display(), run.display()
    )]
    NonFinite {
        step: u64,
        what: String,
        run: PathBuf,
    },
    #[error("interrupted at step {step}; checkpoint written. Resume with: probunet train --resume {}", run.display())]
    Interrupted { step: u64, run: PathBuf },
}

/// How a training run ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub run: PathBuf,
    pub steps: u64,
    pub val_ged: Option<f64>,
    pub best_val_ged: Option<f64>,
    pub hm_iou: Option<f64>,
    /// The ideal-model GED of the synthetic store, when known.
    pub ideal_ged: Option<f64>,
    pub skipped: u64,
}

/// Options that are about this invocation, not the experiment.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Set by a Ctrl-C handler; the loop finishes its step, checkpoints and stops.
    pub interrupt: Option<Arc<AtomicBool>>,
    /// Plain progress lines instead of a bar even on a terminal.
    pub plain_progress: bool,
}

/// The ELBO of one batch with z from the posterior, its gradients, and the logged terms
/// (loss, elbo, kl, reconstruction, reg, gradient norm) read back in one transfer; the
/// caller decides whether to apply the update.
pub fn forward_backward(
    model: &ProbUNet,
    adam: &mut Adam,
    images: &Tensor,
    masks: &Tensor,
) -> Result<(crate::model::ElboTerms, [f64; 6]), TrainError> {
    let terms = model.elbo(images, masks)?;
    adam.zero_grad();
    terms.loss.backward();
    let grad_norm = adam.grad_norm();
    let packed = Tensor::stack(
        &[
            &terms.loss,
            &terms.elbo,
            &terms.kl,
            &terms.reconstruction,
            &terms.reg,
            &grad_norm,
        ]
        .map(|t| t.to_kind(Kind::Double)),
        0,
    );
    let values: Vec<f64> = Vec::try_from(packed.to_device(Device::Cpu))?;
    let values: [f64; 6] = values.try_into().expect("six terms");
    Ok((terms, values))
}

/// A store's variables by name, in name order: what Adam and the checkpoints iterate, so
/// both see the same order on every run.
pub fn named_variables(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// splitmix64 of (seed, step): the libtorch seed of one step.
fn step_seed(seed: u64, step: u64, stream: u64) -> i64 {
    let mut x = seed
        ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ stream.wrapping_mul(0xd1b5_4a32_d192_ed03);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((x ^ (x >> 31)) >> 1) as i64
}

const STREAM_TRAIN: u64 = 1;
const STREAM_VAL: u64 = 2;

/// The store the experiment reads: the named one, or the synthetic dataset generated into
/// `data/synthetic-<config hash>` on first use.
pub fn open_store(experiment: &Experiment) -> Result<Store, TrainError> {
    let dir = match (&experiment.data.store, &experiment.data.synthetic) {
        (Some(store), _) => store.clone(),
        (None, Some(config)) => {
            let json = serde_json::to_vec(config).expect("the config serialises");
            let dir =
                PathBuf::from("data").join(format!("synthetic-{:08x}", crc32c::crc32c(&json)));
            let options = PrepareOptions {
                out: dir.clone(),
                force: false,
                split: Default::default(),
                split_seed: 0,
            };
            if let crate::data::prepare::Outcome::Prepared(summary) =
                prepare_synthetic(config.clone(), &options)?
            {
                println!("{summary}");
            }
            dir
        }
        (None, None) => {
            return Err(TrainError::Spec(
                "data: set data.store or data.synthetic".into(),
            ))
        }
    };
    Ok(Store::open(&dir)?)
}

struct Trainer {
    experiment: Experiment,
    run: RunDir,
    device: Device,
    store: Store,
    vs: nn::VarStore,
    model: ProbUNet,
    adam: Adam,
    loader: Loader,
    checkpoints: Checkpoints,
    events: EventWriter,
    csv: MetricsCsv,
    total_steps: u64,
    step: u64,
    best_val_ged: Option<f64>,
    last_val: Option<(f64, f64)>,
    skipped_total: u64,
}

/// Sums of the logged terms over the current log interval.
#[derive(Default)]
struct Interval {
    steps: u64,
    skipped: u64,
    sums: [f64; 6],
    started: Option<Instant>,
}

impl Trainer {
    fn new(
        resolved: &Resolved,
        run: RunDir,
        resume: Option<Checkpoint>,
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
        let store = open_store(&experiment)?;
        tch::manual_seed(step_seed(train.seed, 0, 0));
        let vs = nn::VarStore::new(device);
        let mut model = ProbUNet::new(&vs.root(), experiment.model.clone())?;
        model.set_precision(train.precision);
        let shape = store.manifest.shape;
        model
            .check_input(&[1, 1, shape.height as i64, shape.width as i64])
            .map_err(|e| TrainError::Spec(format!("{}: {e}", store.dir.display())))?;
        let adam = Adam::new(named_variables(&vs));
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
        let checkpoints = Checkpoints::new(run.checkpoints(), train.keep_last);
        let events = EventWriter::create(&run.path)?;
        let csv = match &resume {
            Some(ckpt) => MetricsCsv::resume(&run.file(run::METRICS_FILE), ckpt.state.step)?,
            None => MetricsCsv::create(&run.file(run::METRICS_FILE))?,
        };
        let mut trainer = Trainer {
            experiment,
            run,
            device,
            store,
            vs,
            model,
            adam,
            loader,
            checkpoints,
            events,
            csv,
            total_steps,
            step: 0,
            best_val_ged: None,
            last_val: None,
            skipped_total: 0,
        };
        if let Some(ckpt) = resume {
            trainer.restore(&ckpt)?;
        }
        Ok(trainer)
    }

    /// Continues from a checkpoint: weights, optimiser moments, data position and step;
    /// TensorBoard is told to drop what the interrupted process logged after it.
    fn restore(&mut self, ckpt: &Checkpoint) -> Result<(), TrainError> {
        if let Some(why) = checkpoint::shape_mismatch(&self.vs, &ckpt.model_path())? {
            return Err(TrainError::Checkpoint {
                path: ckpt.model_path(),
                why: format!("does not fit this model: {why}"),
            });
        }
        self.vs
            .load(ckpt.model_path())
            .map_err(|e| TrainError::Checkpoint {
                path: ckpt.model_path(),
                why: format!("does not fit this model: {e}"),
            })?;
        self.adam
            .load_state(&ckpt.optimizer_tensors()?, ckpt.state.optimizer_steps)
            .map_err(|why| TrainError::Checkpoint {
                path: ckpt.dir.clone(),
                why,
            })?;
        self.loader.restore(ckpt.state.loader.clone());
        self.events
            .add_restart(ckpt.state.step as i64, &ckpt.dir.display().to_string())?;
        self.step = ckpt.state.step;
        self.best_val_ged = ckpt.state.best_val_ged;
        Ok(())
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
        }
    }

    /// Flushes the logs, then writes a checkpoint of a model known to be finite.
    fn checkpoint(&mut self, best: bool, val_ged: Option<f64>) -> Result<(), TrainError> {
        self.csv.flush()?;
        self.events.flush()?;
        let params = named_variables(&self.vs);
        let finite: Vec<Tensor> = params.iter().map(|(_, t)| t.isfinite().all()).collect();
        if !bool::try_from(Tensor::stack(&finite, 0).all())? {
            return Err(TrainError::NonFinite {
                step: self.step,
                what: "weights (refusing to checkpoint them)".into(),
                run: self.run.path.clone(),
            });
        }
        self.checkpoints.save(
            &params,
            &self.adam.state_tensors(),
            &self.state(val_ged),
            best,
        )?;
        Ok(())
    }

    /// Names the term that went non-finite: the first of kl, reconstruction, reg and the
    /// gradients, and whether a sigma overflowed float32.
    fn diagnose(values: &[f64], terms: &crate::model::ElboTerms) -> String {
        let overflow = |name: &str, log_sigma: &Tensor| {
            let max = log_sigma.abs().max().double_value(&[]);
            (!max.is_finite() || max > 88.0)
                .then(|| format!("{name} sigma overflow (max |log sigma| {max:.1})"))
        };
        let mut causes: Vec<String> = [
            ("kl", values[2]),
            ("reconstruction", values[3]),
            ("reg", values[4]),
        ]
        .iter()
        .filter(|(_, v)| !v.is_finite())
        .map(|(name, v)| format!("{name} = {v}"))
        .collect();
        causes.extend(overflow("posterior", &terms.posterior.log_sigma));
        causes.extend(overflow("prior", &terms.prior.log_sigma));
        if causes.is_empty() && !values[5].is_finite() {
            causes.push(format!("gradient norm = {}", values[5]));
        }
        if causes.is_empty() {
            causes.push(format!("loss = {}", values[0]));
        }
        causes.join(", ")
    }

    fn log_interval(
        &mut self,
        interval: &mut Interval,
        lr: f64,
    ) -> Result<Option<f64>, TrainError> {
        let counted = (interval.steps - interval.skipped).max(1) as f64;
        let mean = |i: usize| interval.sums[i] / counted;
        let seconds = interval.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let images_per_s =
            (interval.steps * self.experiment.train.batch as u64) as f64 / seconds.max(1e-9);
        let mut row = MetricsRow::new(self.step, self.loader.epoch(), Phase::Train);
        row.loss = Some(mean(0));
        row.elbo = Some(mean(1));
        row.kl = Some(mean(2));
        row.reconstruction = Some(mean(3));
        row.reg = Some(mean(4));
        row.grad_norm = Some(mean(5));
        row.lr = Some(lr);
        row.beta = Some(self.experiment.model.beta);
        row.images_per_s = Some(images_per_s);
        row.skipped = interval.skipped;
        self.csv.write(&row)?;
        let step = self.step as i64;
        self.events.add_scalars(
            step,
            &[
                ("train_loss", mean(0)),
                ("train_elbo", mean(1)),
                ("train_kl", mean(2)),
                ("rec_loss", mean(3)),
                ("train_reg_loss", mean(4)),
                ("grad_norm", mean(5)),
                ("learning_rate", lr),
                ("beta", self.experiment.model.beta),
                ("images_per_sec", images_per_s),
            ],
        )?;
        *interval = Interval {
            started: Some(Instant::now()),
            ..Interval::default()
        };
        Ok(Some(images_per_s))
    }

    fn validate(&mut self) -> Result<(f64, f64), TrainError> {
        let train = &self.experiment.train;
        tch::manual_seed(step_seed(train.seed, self.step, STREAM_VAL));
        // Validation allocates other sizes than a training step: hand the blocks each
        // phase keeps for reuse back on the way in and out, so the two never add up.
        crate::memory::empty_cache();
        let val = validate(
            &self.model,
            &self.store,
            SplitName::Val,
            train.batch.max(8),
            train.val_samples as i64,
            train.val_items,
            self.device,
            EmptyConvention::default(),
        );
        crate::memory::empty_cache();
        let val = val?;
        let (ged, hm_iou) = (val.ged(), val.hm_iou());
        let mut row = MetricsRow::new(self.step, self.loader.epoch(), Phase::Val);
        row.elbo = Some(val.elbo);
        row.kl = Some(val.kl);
        row.ged = Some(ged);
        row.hm_iou = Some(hm_iou);
        self.csv.write(&row)?;
        let step = self.step as i64;
        self.events.add_scalars(
            step,
            &[
                ("val_elbo", val.elbo),
                ("val_kl", val.kl),
                ("val_ged", ged),
                ("val_hm_iou", hm_iou),
            ],
        )?;
        if self.experiment.log.images {
            let shown = val.items.len().min(4) as i64;
            if shown > 0 {
                let index = Tensor::from_slice(
                    &val.items[..shown as usize]
                        .iter()
                        .map(|&i| i as i64)
                        .collect::<Vec<_>>(),
                );
                let images = self
                    .store
                    .images
                    .index_select(0, &index)
                    .to_device(self.device);
                let masks = self
                    .store
                    .masks
                    .index_select(0, &index)
                    .to_device(self.device);
                let grid = sample_grid(&self.model, &images, &masks, 6)?;
                self.events.add_image("val_samples", step, &grid)?;
            }
        }
        self.last_val = Some((ged, hm_iou));
        Ok((ged, hm_iou))
    }

    fn run(&mut self, options: &TrainOptions) -> Result<Outcome, TrainError> {
        let train = self.experiment.train.clone();
        let log_every = self.experiment.log.every.max(1);
        let mut progress = Progress::new(self.total_steps, self.step, options.plain_progress);
        let mut interval = Interval {
            started: Some(Instant::now()),
            ..Interval::default()
        };
        let ideal_ged = self.store.manifest.ideal.as_ref().map(|i| i.ged_val);
        if self.step == 0 {
            if let Some(ideal) = ideal_ged {
                self.events.add_scalar("val_ged_ideal", ideal, 0)?;
            }
        }
        while self.step < self.total_steps {
            if options
                .interrupt
                .as_ref()
                .is_some_and(|flag| flag.load(Ordering::SeqCst))
            {
                progress.finish();
                self.checkpoint(false, None)?;
                return Err(TrainError::Interrupted {
                    step: self.step,
                    run: self.run.path.clone(),
                });
            }
            tch::manual_seed(step_seed(train.seed, self.step, STREAM_TRAIN));
            let lr = train.schedule.lr_at(train.lr, self.step, self.total_steps);
            let batch = self.loader.next_batch();
            let (terms, values) =
                forward_backward(&self.model, &mut self.adam, &batch.images, &batch.masks)?;
            interval.steps += 1;
            if values.iter().all(|v| v.is_finite()) {
                self.adam.step(lr);
                for (sum, v) in interval.sums.iter_mut().zip(&values) {
                    *sum += v;
                }
            } else {
                let what = Self::diagnose(&values, &terms);
                match train.on_nan {
                    NanPolicy::Stop => {
                        progress.finish();
                        self.csv.flush()?;
                        self.events.flush()?;
                        return Err(TrainError::NonFinite {
                            step: self.step,
                            what,
                            run: self.run.path.clone(),
                        });
                    }
                    NanPolicy::Skip => {
                        progress.message(&format!(
                            "step {}: non-finite {what}; batch skipped",
                            self.step
                        ));
                        interval.skipped += 1;
                        self.skipped_total += 1;
                    }
                }
            }
            self.step += 1;
            let mean_loss = interval.sums[0] / (interval.steps - interval.skipped).max(1) as f64;
            let mean_kl = interval.sums[2] / (interval.steps - interval.skipped).max(1) as f64;
            let mean_elbo = interval.sums[1] / (interval.steps - interval.skipped).max(1) as f64;
            if self.step % log_every == 0 || self.step == self.total_steps {
                let images_per_s = self.log_interval(&mut interval, lr)?;
                progress.update(
                    self.step,
                    self.loader.epoch(),
                    mean_loss,
                    mean_elbo,
                    mean_kl,
                    images_per_s,
                    self.last_val,
                );
            } else {
                progress.tick(self.step);
            }
            let validate_now = (train.val_every > 0 && self.step % train.val_every == 0)
                || self.step == self.total_steps;
            let mut val_ged = None;
            if validate_now {
                let (ged, _) = self.validate()?;
                val_ged = Some(ged);
                if ged.is_finite() && self.best_val_ged.is_none_or(|best| ged < best) {
                    self.best_val_ged = Some(ged);
                    self.checkpoint(true, Some(ged))?;
                }
            }
            if (train.checkpoint_every > 0 && self.step % train.checkpoint_every == 0)
                || self.step == self.total_steps
            {
                self.checkpoint(false, val_ged)?;
            }
        }
        progress.finish();
        self.csv.flush()?;
        self.events.flush()?;
        Ok(Outcome {
            run: self.run.path.clone(),
            steps: self.step,
            val_ged: self.last_val.map(|v| v.0),
            best_val_ged: self.best_val_ged,
            hm_iou: self.last_val.map(|v| v.1),
            ideal_ged,
            skipped: self.skipped_total,
        })
    }
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

/// Trains a new run of `resolved` in `log.runs_dir`.
pub fn train(resolved: &Resolved, options: &TrainOptions) -> Result<Outcome, TrainError> {
    let device = resolved.experiment.train.device.resolve()?;
    let run = RunDir::create(&resolved.experiment.log.runs_dir, &resolved.experiment.name)?;
    start(resolved, options, run, device, true)
}

/// Trains a new run of `resolved` in the folder `dir` rather than a fresh
/// `log.runs_dir/<name>-<timestamp>`: how a sweep runs each trial in
/// `runs/<sweep>/<trial-id>/`. The folder is created if missing and must not hold a run
/// yet (continue one with [`resume`]); other files in it are left alone, and so is the
/// folder when setting up fails.
pub fn train_in(
    dir: &Path,
    resolved: &Resolved,
    options: &TrainOptions,
) -> Result<Outcome, TrainError> {
    let device = resolved.experiment.train.device.resolve()?;
    std::fs::create_dir_all(dir).map_err(|e| TrainError::Run {
        path: dir.to_path_buf(),
        why: e.to_string(),
    })?;
    if dir.join(run::SPEC_FILE).exists() {
        return Err(TrainError::Run {
            path: dir.to_path_buf(),
            why: format!(
                "already holds a run ({} exists); resume it instead",
                run::SPEC_FILE
            ),
        });
    }
    let run = RunDir {
        path: dir.to_path_buf(),
    };
    start(resolved, options, run, device, false)
}

fn start(
    resolved: &Resolved,
    options: &TrainOptions,
    run: RunDir,
    device: Device,
    remove_on_failure: bool,
) -> Result<Outcome, TrainError> {
    let started = (|| {
        run.write_atomic(run::SPEC_FILE, resolved.to_toml()?.as_bytes())?;
        let meta = serde_json::json!({
            "probunet_version": env!("CARGO_PKG_VERSION"),
            "git_commit": option_env!("PROBUNET_GIT_COMMIT"),
            "started_at": chrono::Utc::now(),
            "command": std::env::args().collect::<Vec<_>>(),
            "device": describe(device),
            "libtorch": "2.11.0",
        });
        run.write_atomic(
            run::META_FILE,
            &serde_json::to_vec_pretty(&meta).expect("json"),
        )?;
        Trainer::new(resolved, run.clone(), None)
    })();
    let mut trainer = match started {
        Ok(trainer) => trainer,
        Err(e) => {
            // Nothing was trained: leave no run folder behind.
            if remove_on_failure {
                let _ = std::fs::remove_dir_all(&run.path);
            }
            return Err(e);
        }
    };
    println!("run folder: {}", run.path.display());
    trainer.run(options)
}

/// Continues the run in `run_dir` from its latest checkpoint, with the spec it was
/// started with.
pub fn resume(
    run_dir: &Path,
    resolved: &Resolved,
    options: &TrainOptions,
) -> Result<Outcome, TrainError> {
    let run = RunDir::open(run_dir)?;
    let checkpoints = Checkpoints::new(run.checkpoints(), resolved.experiment.train.keep_last);
    let latest = checkpoints.latest()?.ok_or_else(|| TrainError::Run {
        path: run.path.clone(),
        why: "has no checkpoint to resume from".into(),
    })?;
    println!(
        "resuming {} from step {}",
        run.path.display(),
        latest.state.step
    );
    let mut trainer = Trainer::new(resolved, run, Some(latest))?;
    trainer.run(options)
}

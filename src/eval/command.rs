//! `probunet eval RUN`: a run's checkpoint on a split of its store, at one or more sample
//! counts. Each image's samples come from its own seeded noise ([`item_noise`]), so the
//! results do not depend on the batch size or the order, and the first 16 of 100 samples
//! are the samples of an evaluation at 16: one sampling pass at the largest count serves
//! every count.
//!
//! Written to `RUN/eval/`, each file atomically (temporary name, then rename):
//! `<split>-<n>.json` (aggregates under both conventions, and what produced them),
//! `<split>-<n>.csv` (one row per image), `<split>-<n>-{best,median,worst}.png` (figures
//! of the images with the lowest, median and highest GED), and the same summaries and
//! figures as TensorBoard events.
use super::ideal::IdealModel;
use super::report::{self, CsvRow, EvalReport, ReportContext, Summaries};
use super::EvalError;
use crate::config::{self, Experiment};
use crate::data::loader::in_order;
use crate::data::split::SplitName;
use crate::data::store::Store;
use crate::device::{describe, DeviceSpec};
use crate::metrics::{EmptyConvention, ImageScores, Summary};
use crate::model::{ModelError, ProbUNet};
use crate::run::{check_finite, shape_mismatch, write_atomic, Checkpoint, RunDir, MODEL_FILE};
use crate::score::{probabilities, sample_items, BatchCounts, FigureRow};
use crate::tensorboard::EventWriter;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;
use tch::{nn, Device, Tensor};

/// The sample counts evaluated unless asked otherwise (Kohl et al. report 16 and 100).
pub const DEFAULT_SAMPLES: [usize; 2] = [16, 100];
/// Samples shown in each figure.
const FIGURE_SAMPLES: i64 = 8;
/// Bootstrap resamples of the mean, for the 95% intervals.
pub const DEFAULT_BOOTSTRAP: usize = 10_000;
/// Fewer resamples leave the 2.5% tails of a 95% interval empty.
pub const MIN_BOOTSTRAP: usize = 40;
/// Beyond this many resamples an interval moves by less than its rounding, and the
/// resamples' means would take memory and minutes for nothing.
pub const MAX_BOOTSTRAP: usize = 1_000_000;

/// Which checkpoint of the run to evaluate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CheckpointChoice {
    /// `checkpoints/best`, the lowest validation GED (the last one if there is no best).
    #[default]
    Best,
    /// The newest `checkpoints/step-N`.
    Last,
    /// `checkpoints/step-N` of this step (`step-200` or `200`).
    Step(u64),
    /// A checkpoint folder, or a `model.safetensors` file.
    Path(PathBuf),
}

impl FromStr for CheckpointChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" => Err("expected best, last or a checkpoint path".into()),
            "best" => Ok(Self::Best),
            "last" | "latest" => Ok(Self::Last),
            other => {
                let digits = other.strip_prefix("step-").unwrap_or(other);
                match digits.parse::<u64>() {
                    Ok(step) if !digits.starts_with('+') => Ok(Self::Step(step)),
                    _ => Ok(Self::Path(PathBuf::from(other))),
                }
            }
        }
    }
}

impl fmt::Display for CheckpointChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Best => f.write_str("best"),
            Self::Last => f.write_str("last"),
            Self::Step(step) => write!(f, "step-{step}"),
            Self::Path(path) => write!(f, "{}", path.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub run: PathBuf,
    pub split: SplitName,
    /// Sample counts to evaluate; one output set each.
    pub samples: Vec<usize>,
    pub checkpoint: CheckpointChoice,
    pub device: DeviceSpec,
    /// Images per forward pass.
    pub batch: usize,
    /// Seed of the sampling noise and of the bootstrap.
    pub seed: u64,
    /// A store to read instead of the run's own (same shape and annotators).
    pub store: Option<PathBuf>,
    /// Bootstrap resamples for the intervals.
    pub bootstrap: usize,
    /// Decode the prior's mean for every sample (z = mu) instead of drawing z: the
    /// model's one most likely mask per image, as a deterministic U-Net gives.
    pub deterministic: bool,
}

impl EvalOptions {
    /// The defaults: the test split, 16 and 100 samples, the best checkpoint.
    pub fn new(run: impl Into<PathBuf>) -> Self {
        Self {
            run: run.into(),
            split: SplitName::Test,
            samples: DEFAULT_SAMPLES.to_vec(),
            checkpoint: CheckpointChoice::Best,
            device: DeviceSpec::Auto,
            batch: 4,
            seed: 0,
            store: None,
            bootstrap: DEFAULT_BOOTSTRAP,
            deterministic: false,
        }
    }
}

/// The results at one sample count.
#[derive(Debug, Clone)]
pub struct SampleReport {
    pub samples: usize,
    pub summaries: Summaries,
    /// The ideal model's, scored the same way (on a synthetic store).
    pub ideal: Option<Summaries>,
    pub json: PathBuf,
    pub csv: PathBuf,
    pub figures: Vec<PathBuf>,
}

impl SampleReport {
    pub fn summary(&self, convention: EmptyConvention, metric: &str) -> Option<&Summary> {
        report::find_summary(&self.summaries, convention, metric)
    }

    /// The ideal model's summary of `metric`, on a synthetic store.
    pub fn ideal_summary(&self, convention: EmptyConvention, metric: &str) -> Option<&Summary> {
        report::find_summary(self.ideal.as_ref()?, convention, metric)
    }
}

#[derive(Debug, Clone)]
pub struct EvalOutcome {
    pub run: PathBuf,
    /// The checkpoint folder (or model file) evaluated, and its training step if known.
    pub checkpoint: PathBuf,
    pub step: Option<u64>,
    pub split: SplitName,
    pub items: usize,
    pub device: String,
    pub seconds: f64,
    pub reports: Vec<SampleReport>,
    /// The TensorBoard event file written.
    pub events: PathBuf,
    /// What the user should know, e.g. a fallback from `best` to the last checkpoint.
    pub notes: Vec<String>,
    /// The synthetic store's ideal-model GED for this split, with its sample count.
    pub ideal_ged: Option<(f64, usize)>,
}

/// A checkpoint picked for evaluation.
struct Chosen {
    /// What to report: the checkpoint folder, or the model file given.
    label: PathBuf,
    model: PathBuf,
    step: Option<u64>,
    note: Option<String>,
}

/// The model of the checkpoint folder `dir` of `run`, with its step where it says one.
fn from_dir(run: &RunDir, dir: &Path, note: Option<String>) -> Result<Chosen, EvalError> {
    let model = dir.join(MODEL_FILE);
    if !model.is_file() {
        return Err(EvalError::NoCheckpoint {
            run: run.path.clone(),
            why: format!(": {} has no {MODEL_FILE}", dir.display()),
        });
    }
    Ok(Chosen {
        label: dir.to_path_buf(),
        model,
        step: Checkpoint::open(dir).ok().map(|c| c.state.step),
        note,
    })
}

/// The run's newest step checkpoint.
fn latest(run: &RunDir, note: Option<String>) -> Result<Chosen, EvalError> {
    let checkpoints = run.checkpoints(1);
    match checkpoints.steps()?.last() {
        Some((_, dir)) => from_dir(run, dir, note),
        None => Err(EvalError::NoCheckpoint {
            run: run.path.clone(),
            why: format!(
                ": {} holds no best or step-N checkpoint (did training stop before its \
                 first checkpoint?); pass --checkpoint PATH to evaluate one from elsewhere",
                checkpoints.root().display()
            ),
        }),
    }
}

/// `best`; the newest step checkpoint where validation never wrote one, but a `best`
/// that is there and damaged is said to be.
fn best(run: &RunDir) -> Result<Chosen, EvalError> {
    let checkpoints = run.checkpoints(1);
    let best = checkpoints.best_dir();
    if best.join(MODEL_FILE).is_file() {
        from_dir(run, &best, None)
    } else if best.symlink_metadata().is_ok() {
        Err(EvalError::NoCheckpoint {
            run: run.path.clone(),
            why: format!(
                ": {} is damaged (no {MODEL_FILE} in it); pass --checkpoint last or step-N to \
                 evaluate another",
                best.display()
            ),
        })
    } else {
        latest(
            run,
            Some(format!(
                "no best checkpoint in {} (validation never gave a finite GED); evaluating \
                 the last one",
                checkpoints.root().display()
            )),
        )
    }
}

fn choose_checkpoint(run: &RunDir, choice: &CheckpointChoice) -> Result<Chosen, EvalError> {
    let checkpoints = run.checkpoints(1);
    match choice {
        CheckpointChoice::Best => best(run),
        CheckpointChoice::Last => latest(run, None),
        CheckpointChoice::Step(step) => {
            let steps = checkpoints.steps()?;
            match steps.iter().find(|(s, _)| s == step) {
                Some((_, dir)) => from_dir(run, dir, None),
                None => {
                    let kept: Vec<String> = steps.iter().map(|(s, _)| s.to_string()).collect();
                    Err(EvalError::Options(format!(
                        "--checkpoint step-{step}: {} keeps no checkpoint of step {step}; it \
                         keeps steps [{}] (train.keep_last) and best",
                        checkpoints.root().display(),
                        kept.join(", ")
                    )))
                }
            }
        }
        CheckpointChoice::Path(path) if path.is_dir() => from_dir(run, path, None),
        CheckpointChoice::Path(path) if path.is_file() => Ok(Chosen {
            label: path.clone(),
            model: path.clone(),
            step: path
                .parent()
                .and_then(|dir| Checkpoint::open(dir).ok())
                .map(|c| c.state.step),
            note: None,
        }),
        CheckpointChoice::Path(path) => Err(EvalError::Options(format!(
            "--checkpoint {}: no such file or folder (expected best, last, a checkpoint \
             folder or a {MODEL_FILE} file)",
            path.display()
        ))),
    }
}

fn split_sizes(store: &Store) -> String {
    SplitName::ALL
        .iter()
        .map(|&part| format!("{part} {}", store.split(part).len()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How far an evaluation has got: images scored of the split's, at the largest count.
#[derive(Debug, Clone, Copy)]
pub struct EvalProgress {
    pub split: SplitName,
    pub done: usize,
    pub total: usize,
    pub samples: usize,
    pub seconds: f64,
}

/// A run's model with a checkpoint's weights: what eval scores and predict samples.
pub struct Trained {
    pub run: RunDir,
    pub experiment: Experiment,
    chosen: Chosen,
    pub device: Device,
    pub model: ProbUNet,
    /// Owns the model's variables.
    vs: nn::VarStore,
}

impl Trained {
    /// The checkpoint folder, or the model file given.
    pub fn checkpoint(&self) -> &Path {
        &self.chosen.label
    }

    pub fn step(&self) -> Option<u64> {
        self.chosen.step
    }

    /// Why another checkpoint than the one asked for was loaded, if one was.
    pub fn note(&self) -> Option<&str> {
        self.chosen.note.as_deref()
    }

    /// The model's variables by name, sorted.
    pub fn variables(&self) -> Vec<(String, Tensor)> {
        let mut variables: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        variables
    }
}

/// What is evaluated: the trained model and the store.
struct Loaded {
    trained: Trained,
    store: Store,
}

/// The sample counts asked for, sorted and distinct, all positive.
fn sample_counts(options: &EvalOptions) -> Result<Vec<usize>, EvalError> {
    let mut samples = options.samples.clone();
    samples.sort_unstable();
    samples.dedup();
    if samples.first().is_none_or(|&n| n == 0) {
        return Err(EvalError::Options(format!(
            "--samples must be positive counts, got {:?}",
            options.samples
        )));
    }
    if options.batch == 0 {
        return Err(EvalError::Options("--batch must be positive".into()));
    }
    if options.bootstrap < MIN_BOOTSTRAP {
        return Err(EvalError::Options(format!(
            "--bootstrap {}: a 95% percentile interval needs at least {MIN_BOOTSTRAP} \
             resamples (1 in 40 on each side)",
            options.bootstrap
        )));
    }
    if options.bootstrap > MAX_BOOTSTRAP {
        return Err(EvalError::Options(format!(
            "--bootstrap {}: at most {MAX_BOOTSTRAP} resamples",
            options.bootstrap
        )));
    }
    Ok(samples)
}

/// Refuses a `--samples` and `--batch` that memory cannot hold, before sampling.
fn check_room(loaded: &Loaded, options: &EvalOptions, samples: &[usize]) -> Result<(), EvalError> {
    let most = samples.last().copied().unwrap_or(1);
    let shape = loaded.store.manifest.shape;
    let what = format!("eval --samples {most} with --batch {}", options.batch);
    let (h, w) = (shape.height as u64, shape.width as u64);
    (loaded.trained.experiment.model)
        .check_sampling(what, options.batch as u64, most as u64, h, w)
        .map_err(ModelError::from)?;
    Ok(())
}

/// A run whose recorded store is gone can still be scored on a copy of it.
fn point_at_store_flag(error: crate::run::RunError) -> EvalError {
    match error {
        crate::run::RunError::Data(crate::data::DataError::Store { path, why }) => {
            EvalError::Options(format!(
                "the run's store {}: {why}; or evaluate on a copy of it with --store DIR",
                path.display()
            ))
        }
        other => other.into(),
    }
}

/// The model of the run folder `run` with the weights of `checkpoint`, on `device`.
pub fn load_trained(
    run: &Path,
    checkpoint: &CheckpointChoice,
    device: &crate::device::DeviceSpec,
) -> Result<Trained, EvalError> {
    let run = RunDir::open(run)?;
    let spec = run.spec_path();
    let experiment = config::load(&spec, &[], &[])?.experiment;
    let chosen = choose_checkpoint(&run, checkpoint)?;
    let device = device.resolve()?;
    let mut vs = nn::VarStore::new(device);
    let model = ProbUNet::new(&vs.root(), experiment.model.clone())?;
    if let Some(why) = shape_mismatch(&vs, &chosen.model)? {
        return Err(EvalError::CheckpointMismatch {
            checkpoint: chosen.label,
            spec,
            filters: experiment.model.filters.clone(),
            latent_dim: experiment.model.latent_dim,
            fcomb_convs: experiment.model.fcomb_convs,
            why,
        });
    }
    vs.load(&chosen.model).map_err(|e| EvalError::Io {
        path: chosen.model.clone(),
        why: crate::run::safetensors::read_error(&e),
    })?;
    check_finite(&vs, &chosen.model)?;
    crate::model::freeze(&vs)?;
    Ok(Trained {
        run,
        experiment,
        chosen,
        device,
        model,
        vs,
    })
}

/// The run's model with the chosen checkpoint's weights, and the store to score.
fn load(options: &EvalOptions) -> Result<Loaded, EvalError> {
    let trained = load_trained(&options.run, &options.checkpoint, &options.device)?;
    let store = match &options.store {
        Some(dir) => Store::open(dir)?,
        None => {
            trained
                .run
                .open_store(&trained.experiment)
                .map_err(point_at_store_flag)?
                .0
        }
    };
    let shape = store.manifest.shape;
    trained
        .model
        .check_input(&[1, 1, shape.height as i64, shape.width as i64])
        .map_err(|e| EvalError::Options(format!("{}: {e}", store.dir.display())))?;
    Ok(Loaded { trained, store })
}

/// One model's scores of every image of the split at every count.
struct Counted {
    /// Per count, per image.
    scores: Vec<Vec<ImageScores>>,
    /// Per count, per image: the fraction of samples that are empty.
    empty_samples: Vec<Vec<f64>>,
}

impl Counted {
    fn new(counts: usize, items: usize) -> Self {
        Counted {
            scores: vec![Vec::with_capacity(items); counts],
            empty_samples: vec![Vec::with_capacity(items); counts],
        }
    }

    fn extend(&mut self, counts: &BatchCounts) -> Result<(), EvalError> {
        for (all, batch) in self.scores.iter_mut().zip(counts.scores()?) {
            all.extend(batch);
        }
        for (all, batch) in self.empty_samples.iter_mut().zip(counts.empty_samples()) {
            all.extend(batch);
        }
        Ok(())
    }
}

/// The scores of every image of the split at every count.
struct Scored {
    items: Vec<usize>,
    model: Counted,
    /// The ideal model's, on a synthetic store.
    ideal: Option<Counted>,
    empty_annotations: Vec<u32>,
}

/// `[b, samples, H, W]` probabilities of `items`: seeded draws of z, or with
/// `--deterministic` the prior's mean for every sample.
fn model_samples(
    loaded: &Loaded,
    options: &EvalOptions,
    images: &Tensor,
    items: &[usize],
    samples: usize,
) -> Result<Tensor, EvalError> {
    let model = &loaded.trained.model;
    if !options.deterministic {
        return Ok(sample_items(model, images, items, samples, options.seed)?);
    }
    let latent = loaded.trained.experiment.model.latent_dim;
    let shape = [items.len() as i64, samples as i64, latent];
    let eps = Tensor::f_zeros(shape, (tch::Kind::Float, loaded.trained.device))?;
    Ok(probabilities(model, images, &eps)?)
}

/// One sampling pass at the largest count; every count is scored on its prefix.
fn score_split(
    loaded: &Loaded,
    options: &EvalOptions,
    samples: &[usize],
    progress: &mut dyn FnMut(EvalProgress),
) -> Result<Scored, EvalError> {
    let (store, split) = (&loaded.store, options.split);
    let items = store.split(split).to_vec();
    if items.is_empty() {
        return Err(EvalError::EmptySplit {
            store: store.dir.clone(),
            split,
            sizes: split_sizes(store),
        });
    }
    let started = Instant::now();
    let big_n = samples[samples.len() - 1];
    let device = loaded.trained.device;
    let ideal_model = IdealModel::of(store);
    let mut model = Counted::new(samples.len(), items.len());
    let mut ideal = (ideal_model.as_ref()).map(|_| Counted::new(samples.len(), items.len()));
    let mut empty_annotations: Vec<u32> = Vec::with_capacity(items.len());
    let (mut done, mut next_report) = (0, 0);
    for batch in in_order(store, split, options.batch, device) {
        let (idx, images, masks) = batch?;
        let probs = model_samples(loaded, options, &images, &idx, big_n)?;
        let counts = BatchCounts::compute(&masks, &probs, samples)?;
        model.extend(&counts)?;
        empty_annotations.extend(counts.empty_annotations());
        if let (Some(ideal_model), Some(ideal)) = (&ideal_model, &mut ideal) {
            let probs = ideal_model.samples(&idx, big_n, device)?;
            ideal.extend(&BatchCounts::compute(&masks, &probs, samples)?)?;
        }
        done += idx.len();
        if done >= next_report || done == items.len() {
            progress(EvalProgress {
                split,
                done,
                total: items.len(),
                samples: big_n,
                seconds: started.elapsed().as_secs_f64(),
            });
            next_report = done + items.len().div_ceil(10);
        }
    }
    Ok(Scored {
        items,
        model,
        ideal,
        empty_annotations,
    })
}

/// The synthetic store's ideal-model GED for `split`, with its sample count.
fn ideal_ged(store: &Store, split: SplitName) -> Option<(f64, usize)> {
    let ideal = store.manifest.ideal.as_ref()?;
    let ged = match split {
        SplitName::Val => ideal.ged_val,
        SplitName::Test => ideal.ged_test,
        SplitName::Train => return None,
    };
    Some((ged, ideal.samples))
}

fn report_context<'a>(
    loaded: &'a Loaded,
    options: &EvalOptions,
    items: usize,
    notes: &'a [String],
) -> ReportContext<'a> {
    let (store, shape) = (&loaded.store, loaded.store.manifest.shape);
    ReportContext {
        run: loaded.trained.run.path.clone(),
        split: options.split.to_string(),
        items,
        checkpoint: report::CheckpointRecord {
            choice: options.checkpoint.to_string(),
            path: loaded.trained.chosen.label.clone(),
            model: loaded.trained.chosen.model.clone(),
            step: loaded.trained.chosen.step,
        },
        seed: options.seed,
        deterministic: options.deterministic,
        bootstrap: options.bootstrap,
        store: report::StoreRecord {
            path: store.dir.clone(),
            name: store.manifest.name.clone(),
            annotators: shape.annotators,
            height: shape.height,
            width: shape.width,
        },
        ideal_reference: ideal_ged(store, options.split).map(|(ged, samples)| {
            report::IdealRecord {
                ged,
                samples,
                convention: store.manifest.ideal.as_ref().map(|i| i.convention.clone()),
            }
        }),
        model: &loaded.trained.experiment.model,
        device: describe(loaded.trained.device),
        notes,
    }
}

/// Where one evaluation writes: `RUN/eval/` and its TensorBoard file.
struct Output {
    dir: PathBuf,
    events: EventWriter,
    /// The step TensorBoard shows the results at: the checkpoint's.
    step: i64,
}

/// Figures of the best, median and worst images by GED at `n` samples, written as PNG
/// and to TensorBoard: the figures' paths and the report's examples.
fn write_figures(
    loaded: &Loaded,
    options: &EvalOptions,
    name: &str,
    n: usize,
    items: &[usize],
    (geds, hm_ious): (&[f64], &[f64]),
    out: &mut Output,
) -> Result<(Vec<PathBuf>, BTreeMap<&'static str, report::Example>), EvalError> {
    let store = &loaded.store;
    let (mut figures, mut examples) = (Vec::new(), BTreeMap::new());
    for (which, position) in report::examples(geds).into_iter().flatten() {
        let item = items[position];
        let index = Tensor::f_from_slice(&[item as i64])?;
        let image = store
            .images
            .f_index_select(0, &index)?
            .f_to_device(loaded.trained.device)?;
        let probs = model_samples(loaded, options, &image, &[item], n)?;
        let caption = format!(
            "{}   GED {:.3}   HM-IoU {:.3}   ({which} of {} by GED, {n} samples)",
            store.manifest.keys[item], geds[position], hm_ious[position], options.split
        );
        let row = FigureRow {
            caption,
            image: image.f_get(0)?,
            masks: store.masks.f_get(item as i64)?,
            probs: probs.f_get(0)?,
        };
        let picture = crate::score::figure(&[row], FIGURE_SAMPLES, true)?;
        let path = out.dir.join(format!("{name}-{which}.png"));
        write_atomic(&path, &picture.to_png()?)?;
        out.events
            .add_image(&format!("eval/{name}/{which}"), out.step, &picture)?;
        figures.push(path);
        let example = report::Example {
            item,
            key: store.manifest.keys[item].clone(),
            ged: geds[position],
            figure: format!("{name}-{which}.png"),
        };
        examples.insert(which, example);
    }
    Ok((figures, examples))
}

/// One CSV row per image at the count in `position`, with the ideal model's beside it.
fn csv_rows(store: &Store, scored: &Scored, position: usize) -> Vec<CsvRow> {
    let manifest = &store.manifest;
    fn row(counted: &Counted, position: usize, i: usize) -> report::ImageRow<'_> {
        report::ImageRow {
            scores: &counted.scores[position][i],
            empty_samples: counted.empty_samples[position][i],
        }
    }
    (scored.items.iter().enumerate())
        .map(|(i, &item)| {
            let (key, patient) = (manifest.keys[item].clone(), manifest.patients[item].clone());
            let ideal = scored.ideal.as_ref().map(|ideal| row(ideal, position, i));
            let empty = scored.empty_annotations[i];
            let model = row(&scored.model, position, i);
            CsvRow::new((item, key, patient), empty, model, ideal)
        })
        .collect()
}

/// Everything written for one sample count: JSON, CSV, figures, TensorBoard scalars.
fn write_count(
    loaded: &Loaded,
    options: &EvalOptions,
    context: &ReportContext,
    (position, n): (usize, usize),
    scored: &Scored,
    out: &mut Output,
) -> Result<SampleReport, EvalError> {
    let name = format!("{}-{n}", options.split);
    let scores = &scored.model.scores[position];
    let rows = csv_rows(&loaded.store, scored, position);
    let (resamples, seed) = (options.bootstrap, options.seed);
    let summaries = report::summarise(scores, resamples, seed);
    let annotators = loaded.store.manifest.shape.annotators.max(1) as f64;
    let empty = report::EmptyMasks {
        samples: Summary::from_values(&scored.model.empty_samples[position], resamples, seed),
        annotations: Summary::from_values(
            &(scored.empty_annotations.iter())
                .map(|&e| f64::from(e) / annotators)
                .collect::<Vec<_>>(),
            resamples,
            seed,
        ),
    };
    let ideal = scored.ideal.as_ref().map(|ideal| report::IdealScores {
        summaries: report::summarise(&ideal.scores[position], resamples, seed),
        empty_samples: Summary::from_values(&ideal.empty_samples[position], resamples, seed),
    });
    let geds: Vec<f64> = scores.iter().map(|s| s.phiseg.ged).collect();
    let hm_ious: Vec<f64> = scores.iter().map(|s| s.phiseg.hm_iou).collect();
    let scores_of = (geds.as_slice(), hm_ious.as_slice());
    let (figures, examples) =
        write_figures(loaded, options, &name, n, &scored.items, scores_of, out)?;
    let json = out.dir.join(format!("{name}.json"));
    let report = EvalReport::new(context, n, &summaries, examples, empty, ideal.as_ref());
    crate::run::write_json(&json, &report)?;
    let csv = out.dir.join(format!("{name}.csv"));
    let bytes = report::csv_bytes(&rows).map_err(|e| EvalError::Io {
        path: csv.clone(),
        why: e.to_string(),
    })?;
    write_atomic(&csv, &bytes)?;
    let ideal_summaries = ideal.as_ref().map(|i| &i.summaries);
    let table = report::markdown(&name, &summaries, ideal_summaries);
    out.events
        .add_text(&format!("eval/{name}/summary"), out.step, &table)?;
    Ok(SampleReport {
        samples: n,
        summaries,
        ideal: ideal.map(|i| i.summaries),
        json,
        csv,
        figures,
    })
}

/// Evaluates a run as `options` say and writes the results into `RUN/eval/`, telling
/// `progress` how far the sampling pass has got.
pub fn evaluate(
    options: &EvalOptions,
    progress: &mut dyn FnMut(EvalProgress),
) -> Result<EvalOutcome, EvalError> {
    let started = Instant::now();
    let samples = sample_counts(options)?;
    let loaded = load(options)?;
    check_room(&loaded, options, &samples)?;
    let scored = score_split(&loaded, options, &samples, progress)?;
    let dir = loaded.trained.run.eval_dir();
    std::fs::create_dir_all(&dir).map_err(|e| EvalError::Io {
        path: dir.clone(),
        why: e.to_string(),
    })?;
    let mut out = Output {
        events: EventWriter::create(&dir)?,
        dir,
        step: loaded.trained.chosen.step.unwrap_or(0) as i64,
    };
    let mut notes: Vec<String> = loaded.trained.chosen.note.iter().cloned().collect();
    if let Some(dir) = &options.store {
        notes.push(format!("store {} instead of the run's own", dir.display()));
    }
    let context = report_context(&loaded, options, scored.items.len(), &notes);
    let mut reports = Vec::with_capacity(samples.len());
    for (position, &n) in samples.iter().enumerate() {
        reports.push(write_count(
            &loaded,
            options,
            &context,
            (position, n),
            &scored,
            &mut out,
        )?);
    }
    out.events.flush()?;
    Ok(EvalOutcome {
        run: loaded.trained.run.path.clone(),
        checkpoint: loaded.trained.chosen.label.clone(),
        step: loaded.trained.chosen.step,
        split: options.split,
        items: scored.items.len(),
        device: describe(loaded.trained.device),
        seconds: started.elapsed().as_secs_f64(),
        reports,
        events: out.events.path().to_path_buf(),
        notes,
        ideal_ged: ideal_ged(&loaded.store, options.split),
    })
}

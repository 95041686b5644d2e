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
use super::batch::{batch_noise, BatchCounts};
use super::report::{self, CsvRow, FigureRow, Summaries, CONVENTIONS};
use super::EvalError;
use crate::config;
use crate::data::loader::in_order;
use crate::data::split::SplitName;
use crate::data::store::Store;
use crate::device::{describe, DeviceSpec};
use crate::metrics::{EmptyConvention, ImageScores, Summary};
use crate::model::ProbUNet;
use crate::tensorboard::EventWriter;
use crate::train::run::{write_atomic, RunDir, SPEC_FILE};
use crate::train::{open_store, shape_mismatch, Checkpoint, Checkpoints, MODEL_FILE};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;
use tch::{nn, Tensor};

/// The sample counts evaluated unless asked otherwise (Kohl et al. report 16 and 100).
pub const DEFAULT_SAMPLES: [usize; 2] = [16, 100];
/// Samples shown in each figure.
const FIGURE_SAMPLES: i64 = 8;
/// Bootstrap resamples of the mean, for the 95% intervals.
pub const DEFAULT_BOOTSTRAP: usize = 10_000;

/// Which checkpoint of the run to evaluate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum CheckpointChoice {
    /// `checkpoints/best`, the lowest validation GED (the last one if there is no best).
    #[default]
    Best,
    /// The newest `checkpoints/step-N`.
    Last,
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
            path => Ok(Self::Path(PathBuf::from(path))),
        }
    }
}

impl fmt::Display for CheckpointChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Best => f.write_str("best"),
            Self::Last => f.write_str("last"),
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
    /// Progress lines on stderr.
    pub progress: bool,
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
            progress: false,
        }
    }
}

/// The results at one sample count.
#[derive(Debug, Clone)]
pub struct SampleReport {
    pub samples: usize,
    pub summaries: Summaries,
    pub json: PathBuf,
    pub csv: PathBuf,
    pub figures: Vec<PathBuf>,
}

impl SampleReport {
    pub fn summary(&self, convention: EmptyConvention, metric: &str) -> Option<&Summary> {
        self.summaries
            .iter()
            .find(|(c, _)| *c == convention)?
            .1
            .iter()
            .find(|(name, _)| *name == metric)
            .map(|(_, summary)| summary)
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

fn choose_checkpoint(run: &RunDir, choice: &CheckpointChoice) -> Result<Chosen, EvalError> {
    let checkpoints = Checkpoints::new(run.checkpoints(), 1);
    let from_dir = |dir: &Path, note: Option<String>| -> Result<Chosen, EvalError> {
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
    };
    let latest = |note: Option<String>| -> Result<Chosen, EvalError> {
        match checkpoints.steps()?.last() {
            Some((_, dir)) => from_dir(dir, note),
            None => Err(EvalError::NoCheckpoint {
                run: run.path.clone(),
                why: format!(
                    ": {} holds no best or step-N checkpoint (did training stop before its \
                     first checkpoint?); pass --checkpoint PATH to evaluate one from elsewhere",
                    run.checkpoints().display()
                ),
            }),
        }
    };
    match choice {
        CheckpointChoice::Best => {
            let best = checkpoints.best_dir();
            if best.join(MODEL_FILE).is_file() {
                from_dir(&best, None)
            } else {
                latest(Some(format!(
                    "no best checkpoint in {} (validation never gave a finite GED); \
                     evaluating the last one",
                    run.checkpoints().display()
                )))
            }
        }
        CheckpointChoice::Last => latest(None),
        CheckpointChoice::Path(path) if path.is_dir() => from_dir(path, None),
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

/// `[b, n, H, W]` foreground probabilities of the given noise.
pub(super) fn probabilities(
    model: &ProbUNet,
    images: &Tensor,
    eps: &Tensor,
) -> Result<Tensor, EvalError> {
    let logits = tch::no_grad(|| model.sample_with_noise(images, eps))?;
    Ok(logits.select(2, 0).sigmoid())
}

fn split_sizes(store: &Store) -> String {
    SplitName::ALL
        .iter()
        .map(|&part| format!("{part} {}", store.split(part).len()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Evaluates a run as `options` say and writes the results into `RUN/eval/`.
pub fn evaluate(options: &EvalOptions) -> Result<EvalOutcome, EvalError> {
    let started = Instant::now();
    let mut samples = options.samples.clone();
    samples.sort_unstable();
    samples.dedup();
    if samples.is_empty() || samples[0] == 0 {
        return Err(EvalError::Options(format!(
            "--samples must be positive counts, got {:?}",
            options.samples
        )));
    }
    if options.batch == 0 {
        return Err(EvalError::Options("--batch must be positive".into()));
    }
    let run = RunDir::open(&options.run)?;
    let spec = run.file(SPEC_FILE);
    let experiment = config::load(&spec, &[], &[])?.experiment;
    let chosen = choose_checkpoint(&run, &options.checkpoint)?;
    let device = options.device.resolve()?;

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
        why: e.to_string(),
    })?;
    vs.freeze();

    let store = match &options.store {
        Some(dir) => Store::open(dir)?,
        None => open_store(&experiment)?,
    };
    let shape = store.manifest.shape;
    model
        .check_input(&[1, 1, shape.height as i64, shape.width as i64])
        .map_err(|e| EvalError::Options(format!("{}: {e}", store.dir.display())))?;
    let split = options.split;
    let items = store.split(split).to_vec();
    if items.is_empty() {
        return Err(EvalError::EmptySplit {
            store: store.dir.clone(),
            split,
            sizes: split_sizes(&store),
        });
    }

    // One sampling pass at the largest count; every count is scored on its prefix.
    let big_n = *samples.last().expect("not empty");
    let latent = experiment.model.latent_dim as usize;
    let mut scores: Vec<Vec<ImageScores>> = vec![Vec::with_capacity(items.len()); samples.len()];
    let mut empty_annotations: Vec<u32> = Vec::with_capacity(items.len());
    let mut done = 0;
    let mut next_report = 0;
    for (idx, images, masks) in in_order(&store, split, options.batch, device) {
        let eps = batch_noise(options.seed, &idx, big_n, latent);
        let probs = probabilities(&model, &images, &eps)?;
        let counts = BatchCounts::compute(&masks, &probs, &samples)?;
        for (all, batch) in scores.iter_mut().zip(counts.scores()?) {
            all.extend(batch);
        }
        empty_annotations.extend(counts.empty_annotations());
        done += idx.len();
        if options.progress && (done >= next_report || done == items.len()) {
            let seconds = started.elapsed().as_secs_f64();
            eprintln!(
                "eval {split}: {done}/{} images ({:.1} images/s at {big_n} samples)",
                items.len(),
                done as f64 / seconds.max(1e-9)
            );
            next_report = done + items.len().div_ceil(10);
        }
    }

    let eval_dir = run.path.join("eval");
    std::fs::create_dir_all(&eval_dir).map_err(|e| EvalError::Io {
        path: eval_dir.clone(),
        why: e.to_string(),
    })?;
    let mut events = EventWriter::create(&eval_dir)?;
    let step = chosen.step.unwrap_or(0) as i64;
    let ideal_ged = store.manifest.ideal.as_ref().and_then(|ideal| {
        let ged = match split {
            SplitName::Val => ideal.ged_val,
            SplitName::Test => ideal.ged_test,
            SplitName::Train => return None,
        };
        Some((ged, ideal.samples))
    });
    let mut notes: Vec<String> = chosen.note.iter().cloned().collect();
    if let Some(dir) = &options.store {
        notes.push(format!("store {} instead of the run's own", dir.display()));
    }
    let mut reports = Vec::with_capacity(samples.len());
    for (&n, scores) in samples.iter().zip(&scores) {
        let name = format!("{split}-{n}");
        let rows: Vec<CsvRow> = items
            .iter()
            .zip(scores)
            .zip(&empty_annotations)
            .map(|((&item, s), &empty)| {
                CsvRow::new(
                    item,
                    store.manifest.keys[item].clone(),
                    store.manifest.patients[item].clone(),
                    empty,
                    s,
                )
            })
            .collect();
        let summaries = report::summarise(scores, options.bootstrap, options.seed);

        let geds: Vec<f64> = scores.iter().map(|s| s.phiseg.ged).collect();
        let mut figures = Vec::new();
        let mut examples = serde_json::Map::new();
        for (which, position) in report::examples(&geds).into_iter().flatten() {
            let item = items[position];
            let index = Tensor::from_slice(&[item as i64]);
            let image = store.images.index_select(0, &index).to_device(device);
            let eps = batch_noise(options.seed, &[item], n, latent);
            let probs = probabilities(&model, &image, &eps)?;
            let row = FigureRow {
                image: image.get(0),
                masks: store.masks.get(item as i64),
                probs: probs.get(0),
            };
            let picture = report::figure(&[row], FIGURE_SAMPLES, true)?;
            let path = eval_dir.join(format!("{name}-{which}.png"));
            write_atomic(&path, &picture.to_png()?)?;
            events.add_image(&format!("{name}/{which}"), step, &picture)?;
            figures.push(path);
            examples.insert(
                which.into(),
                serde_json::json!({
                    "item": item,
                    "key": store.manifest.keys[item],
                    "ged": geds[position],
                    "figure": format!("{name}-{which}.png"),
                }),
            );
        }

        let metrics: serde_json::Map<String, serde_json::Value> = summaries
            .iter()
            .map(|(convention, per_metric)| {
                let values: serde_json::Map<String, serde_json::Value> = per_metric
                    .iter()
                    .map(|(metric, summary)| {
                        (
                            (*metric).into(),
                            serde_json::to_value(summary).expect("json"),
                        )
                    })
                    .collect();
                (convention.as_str().into(), values.into())
            })
            .collect();
        let json = serde_json::json!({
            "run": run.path,
            "split": split.to_string(),
            "samples": n,
            "items": items.len(),
            "checkpoint": {
                "choice": options.checkpoint.to_string(),
                "path": chosen.label,
                "model": chosen.model,
                "step": chosen.step,
            },
            "seed": options.seed,
            "noise": "per image: PCG64 seeded from (seed, store item index), Box-Muller; \
                      the first n samples of a larger count are the samples at n",
            "conventions": {
                "default": EmptyConvention::default().as_str(),
                "computed": CONVENTIONS.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
                "phiseg": "IoU of two empty masks is 1 (distance 0)",
                "kohl-nan": "IoU of two empty masks is NaN; means over pairs skip NaN",
            },
            "bootstrap": {
                "resamples": options.bootstrap,
                "seed": options.seed,
                "interval": 0.95,
                "method": "percentile bootstrap of the mean over images (NaN skipped)",
            },
            "metrics": metrics,
            "examples": examples,
            "store": {
                "path": store.dir,
                "name": store.manifest.name,
                "annotators": shape.annotators,
                "height": shape.height,
                "width": shape.width,
            },
            "ideal_reference": ideal_ged.map(|(ged, samples)| serde_json::json!({
                "ged": ged,
                "samples": samples,
                "convention": store.manifest.ideal.as_ref().map(|i| i.convention.clone()),
            })),
            "model": experiment.model,
            "device": describe(device),
            "probunet_version": env!("CARGO_PKG_VERSION"),
            "created_at": chrono::Utc::now(),
            "notes": notes,
        });
        let json_path = eval_dir.join(format!("{name}.json"));
        let csv_path = eval_dir.join(format!("{name}.csv"));
        write_atomic(
            &json_path,
            &serde_json::to_vec_pretty(&json).expect("the report serialises"),
        )?;
        let csv = report::csv_bytes(&rows).map_err(|e| EvalError::Io {
            path: csv_path.clone(),
            why: e.to_string(),
        })?;
        write_atomic(&csv_path, &csv)?;
        // Tags `<split>-<n>/<metric>` (PHiSeg) and `.../<metric>_kohl_nan`; a NaN mean (no
        // image defines the metric) is left out.
        let scalars: Vec<(String, f64)> = summaries
            .iter()
            .flat_map(|(convention, per_metric)| {
                let name = &name;
                per_metric
                    .iter()
                    .filter(|(_, summary)| !summary.mean.is_nan())
                    .map(move |(metric, summary)| {
                        let suffix = match convention {
                            EmptyConvention::PhiSeg => String::new(),
                            other => format!("_{}", other.as_str().replace('-', "_")),
                        };
                        (format!("{name}/{metric}{suffix}"), summary.mean)
                    })
            })
            .collect();
        events.add_scalars(step, &scalars)?;
        reports.push(SampleReport {
            samples: n,
            summaries,
            json: json_path,
            csv: csv_path,
            figures,
        });
    }
    events.flush()?;
    Ok(EvalOutcome {
        run: run.path.clone(),
        checkpoint: chosen.label,
        step: chosen.step,
        split,
        items: items.len(),
        device: describe(device),
        seconds: started.elapsed().as_secs_f64(),
        reports,
        events: events.path().to_path_buf(),
        notes,
        ideal_ged,
    })
}

//! `probunet predict RUN INPUT...`: a trained run's samples for new images (or its own
//! store's), written per image as masks, mean and uncertainty maps, `.npy` arrays and a
//! labelled overview, with `index.json` and `index.csv` for the whole call.
//!
//! Each image's noise is keyed by its position among the inputs (or its store index for
//! `store:SPLIT`, so those samples are eval's), never by its batch: results do not depend
//! on `--batch`. An image that cannot be read or sized, or that memory cannot hold at
//! `--samples`, is reported by name and the others still go through.
pub mod input;
pub mod npy;
pub mod output;

use crate::device::DeviceSpec;
use crate::eval::{load_trained, CheckpointChoice, EvalError, Trained};
use crate::score::{batch_noise, probabilities, FigureRow};
use input::{InputImage, Source};
pub use output::{Formats, ImageRecord};
use serde::Serialize;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

pub const INDEX_JSON: &str = "index.json";
pub const INDEX_CSV: &str = "index.csv";
/// Samples shown in the overview figure; all of them are in the files.
const OVERVIEW_SAMPLES: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    /// Boxed: the run and checkpoint errors are large and rare.
    #[error(transparent)]
    Eval(Box<EvalError>),
    #[error(transparent)]
    Run(#[from] crate::run::RunError),
    #[error(transparent)]
    Score(#[from] crate::score::ScoreError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error("{0}")]
    Options(String),
}

impl From<EvalError> for PredictError {
    fn from(e: EvalError) -> Self {
        PredictError::Eval(Box::new(e))
    }
}

#[derive(Debug, Clone)]
pub struct PredictOptions {
    pub run: PathBuf,
    pub inputs: Vec<String>,
    pub samples: usize,
    /// Default: `RUN/predict`.
    pub out: Option<PathBuf>,
    pub checkpoint: CheckpointChoice,
    pub device: DeviceSpec,
    pub batch: usize,
    pub seed: u64,
    pub formats: Formats,
    /// Pad an image whose size the model cannot take (zeros, bottom and right) to the next
    /// size it can, and crop the outputs back.
    pub pad: bool,
}

/// How far predict has got.
#[derive(Debug, Clone)]
pub enum PredictEvent {
    Started {
        images: usize,
        checkpoint: PathBuf,
    },
    Written {
        done: usize,
        total: usize,
        record: ImageRecord,
    },
    Failed {
        done: usize,
        total: usize,
        input: String,
        why: String,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub input: String,
    pub error: String,
}

/// `index.json`: the call and a record per image.
#[derive(Debug, Clone, Serialize)]
pub struct Index {
    pub kind: &'static str,
    pub run: PathBuf,
    pub checkpoint: PathBuf,
    pub step: Option<u64>,
    pub seed: u64,
    pub samples: usize,
    pub images: Vec<ImageRecord>,
    pub failed: Vec<Failure>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

const INDEX_KIND: &str = "probunet predict";

pub fn predict(
    options: &PredictOptions,
    observe: &mut dyn FnMut(&PredictEvent),
) -> Result<(PathBuf, Index), PredictError> {
    check(options)?;
    let trained = load_trained(&options.run, &options.checkpoint, &options.device)?;
    let out = options
        .out
        .clone()
        .unwrap_or_else(|| trained.run.path.join("predict"));
    // index.json's paths then hold from any working folder.
    let out = std::path::absolute(&out).unwrap_or(out);
    refuse_foreign_index(&out)?;
    let wants_store = options.inputs.iter().any(|i| i.starts_with("store:"));
    let store = match wants_store {
        true => Some(trained.run.open_store(&trained.experiment)?.0),
        false => None,
    };
    let sources = input::expand(&options.inputs, store.as_ref()).map_err(PredictError::Options)?;
    std::fs::create_dir_all(&out).map_err(|e| crate::run::RunError::io(&out, e))?;
    // What a killed predict left half-written (see output::write_image).
    crate::sys::remove_dead_temporaries(&out, output::PARTIAL)
        .map_err(|e| crate::run::RunError::io(&out, e))?;
    observe(&PredictEvent::Started {
        images: sources.len(),
        checkpoint: trained.checkpoint().to_path_buf(),
    });
    let mut index = Index {
        kind: INDEX_KIND,
        run: trained.run.path.clone(),
        checkpoint: trained.checkpoint().to_path_buf(),
        step: trained.step(),
        seed: options.seed,
        samples: options.samples,
        images: Vec::new(),
        failed: Vec::new(),
        created_at: chrono::Utc::now(),
    };
    let mut names = Names::default();
    for (start, chunk) in (0..sources.len())
        .step_by(options.batch)
        .map(|s| (s, &sources[s..(s + options.batch).min(sources.len())]))
    {
        let decoded: Vec<Result<InputImage, (String, String)>> = chunk
            .iter()
            .enumerate()
            .map(|(k, source)| {
                input::decode(source, start + k, store.as_ref())
                    .map_err(|why| (describe(source), why))
            })
            .collect();
        let results = predict_chunk(&trained, options, decoded)?;
        for result in results {
            let done = index.images.len() + index.failed.len() + 1;
            let total = sources.len();
            match result.and_then(|(image, probs)| write(&out, &mut names, options, &image, &probs))
            {
                Ok(record) => {
                    observe(&PredictEvent::Written {
                        done,
                        total,
                        record: record.clone(),
                    });
                    index.images.push(record);
                }
                Err((input, why)) => {
                    observe(&PredictEvent::Failed {
                        done,
                        total,
                        input: input.clone(),
                        why: why.clone(),
                    });
                    index.failed.push(Failure { input, error: why });
                }
            }
        }
    }
    write_index(&out, &index)?;
    Ok((out, index))
}

fn check(options: &PredictOptions) -> Result<(), PredictError> {
    let bad = |what: &str| Err(PredictError::Options(what.into()));
    match () {
        _ if options.samples == 0 => bad("--samples must be at least 1"),
        _ if options.batch == 0 => bad("--batch must be at least 1"),
        _ if !options.formats.png && !options.formats.npy => bad("--format needs png, npy or both"),
        _ if options.inputs.is_empty() => {
            bad("give at least one INPUT: an image, a folder or store:SPLIT")
        }
        _ => Ok(()),
    }
}

/// An `--out` that is a file, or an `index.json` or `index.csv` in it that predict did not
/// write, is not replaced: predict's `index.csv` always has its `index.json` beside it.
fn refuse_foreign_index(out: &Path) -> Result<(), PredictError> {
    if out.exists() && !out.is_dir() {
        let why = format!("--out {}: is a file, not a folder", out.display());
        return Err(PredictError::Options(why));
    }
    let (json, csv) = (out.join(INDEX_JSON), out.join(INDEX_CSV));
    let ours = match std::fs::read_to_string(&json) {
        Ok(text) => {
            serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|v| v["kind"] == INDEX_KIND)
        }
        Err(_) => !csv.exists(),
    };
    match ours {
        true => Ok(()),
        false => Err(PredictError::Options(format!(
            "{} exists and was not written by probunet predict; choose another --out",
            if json.exists() { &json } else { &csv }.display()
        ))),
    }
}

fn describe(source: &Source) -> String {
    match source {
        Source::File(path) => path.display().to_string(),
        Source::Store { split, item } => format!("store:{split} item {item}"),
    }
}

type Predicted = Result<(InputImage, Vec<f32>), (String, String)>;
/// Images of one (padded) size, with their positions in the chunk.
type SizeGroup = ((usize, usize), Vec<(usize, InputImage)>);

/// Samples every decoded image of a chunk, grouped by size: `[n, H, W]` probabilities each.
fn predict_chunk(
    trained: &Trained,
    options: &PredictOptions,
    decoded: Vec<Result<InputImage, (String, String)>>,
) -> Result<Vec<Predicted>, PredictError> {
    let divisor = trained.experiment.model.size_divisor() as usize;
    let mut results: Vec<Option<Predicted>> = Vec::with_capacity(decoded.len());
    let mut groups: Vec<SizeGroup> = Vec::new();
    for (k, d) in decoded.into_iter().enumerate() {
        results.push(None);
        let image = match d.and_then(|i| fit(i, divisor, options.pad)) {
            Ok(image) => image,
            Err(e) => {
                results[k] = Some(Err(e));
                continue;
            }
        };
        let size = padded(image.height, image.width, divisor);
        match groups.iter_mut().find(|(s, _)| *s == size) {
            Some((_, members)) => members.push((k, image)),
            None => groups.push((size, vec![(k, image)])),
        }
    }
    for ((h, w), members) in groups {
        // A group memory cannot hold is sampled image by image; an image it cannot hold
        // alone is reported by name, as an unreadable one is.
        let batches = match room(trained, options, h, w, members.len()) {
            Ok(()) => vec![members],
            Err(_) => members.into_iter().map(|m| vec![m]).collect(),
        };
        for batch in batches {
            if let Err(why) = room(trained, options, h, w, batch.len()) {
                for (k, image) in batch {
                    results[k] = Some(Err((image.source, why.clone())));
                }
                continue;
            }
            let probs = sample_group(trained, options, h, w, &batch)?;
            for ((k, image), p) in batch.into_iter().zip(probs) {
                results[k] = Some(Ok((image, p)));
            }
        }
    }
    Ok(results.into_iter().flatten().collect())
}

/// Whether memory holds `options.samples` samples of `images` images of `h` x `w`.
fn room(
    trained: &Trained,
    options: &PredictOptions,
    h: usize,
    w: usize,
    images: usize,
) -> Result<(), String> {
    let what = match images {
        1 => format!("is {w}x{h} pixels: --samples {} of it", options.samples),
        _ => format!(
            "--samples {} of {images} images of {w}x{h}",
            options.samples
        ),
    };
    (trained.experiment.model)
        .check_sampling(
            what,
            images as u64,
            options.samples as u64,
            h as u64,
            w as u64,
        )
        .map_err(|e| e.to_string())
}

/// The image if the model takes its size, or with `--pad` anyway; otherwise why not.
fn fit(image: InputImage, divisor: usize, pad: bool) -> Result<InputImage, (String, String)> {
    if pad || (image.height.is_multiple_of(divisor) && image.width.is_multiple_of(divisor)) {
        return Ok(image);
    }
    let (h, w) = padded(image.height, image.width, divisor);
    Err((
        image.source.clone(),
        format!(
            "is {}x{} pixels; this model takes sides that are multiples of {divisor} \
             (pass --pad to pad it to {h}x{w} and crop the outputs back)",
            image.height, image.width
        ),
    ))
}

fn padded(h: usize, w: usize, divisor: usize) -> (usize, usize) {
    (h.next_multiple_of(divisor), w.next_multiple_of(divisor))
}

/// The samples of same-sized (after padding) images, cropped back to each one's size.
fn sample_group(
    trained: &Trained,
    options: &PredictOptions,
    h: usize,
    w: usize,
    members: &[(usize, InputImage)],
) -> Result<Vec<Vec<f32>>, PredictError> {
    let mut batch = vec![0f32; members.len() * h * w];
    for (b, (_, image)) in members.iter().enumerate() {
        for r in 0..image.height {
            let to = b * h * w + r * w;
            batch[to..to + image.width]
                .copy_from_slice(&image.pixels[r * image.width..(r + 1) * image.width]);
        }
    }
    let images = Tensor::f_from_slice(&batch)?
        .f_view([members.len() as i64, 1, h as i64, w as i64])?
        .f_to_device(trained.device)?;
    let items: Vec<usize> = members.iter().map(|(_, i)| i.item).collect();
    let latent = trained.experiment.model.latent_dim as usize;
    let eps =
        batch_noise(options.seed, &items, options.samples, latent)?.f_to_device(trained.device)?;
    let probs = probabilities(&trained.model, &images, &eps)?
        .f_to_device(tch::Device::Cpu)?
        .f_to_kind(Kind::Float)?;
    members
        .iter()
        .enumerate()
        .map(|(b, (_, image))| {
            let crop = probs
                .f_get(b as i64)?
                .f_narrow(1, 0, image.height as i64)?
                .f_narrow(2, 0, image.width as i64)?
                .f_contiguous()?
                .f_reshape([-1])?;
            Ok(Vec::<f32>::try_from(crop)?)
        })
        .collect()
}

/// Output folder names, made unique within a call (`name`, `name-2`, ...).
#[derive(Default)]
struct Names(std::collections::HashSet<String>);

impl Names {
    fn unique(&mut self, name: &str) -> String {
        let clean: String = name
            .chars()
            .map(|c| {
                if c.is_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let clean = match clean.trim_start_matches('.') {
            // A name of dots only would be the output folder itself, or its parent.
            "" => "image".to_string(),
            kept => kept.to_string(),
        };
        let mut candidate = clean.clone();
        let mut k = 2;
        while !self.0.insert(candidate.clone()) {
            candidate = format!("{clean}-{k}");
            k += 1;
        }
        candidate
    }
}

fn write(
    out: &Path,
    names: &mut Names,
    options: &PredictOptions,
    image: &InputImage,
    probs: &[f32],
) -> Result<ImageRecord, (String, String)> {
    let fail = |why: String| (image.source.clone(), why);
    let samples = output::Samples {
        n: options.samples,
        height: image.height,
        width: image.width,
        probs,
    };
    let (mean, _) = samples.mean_and_variance();
    let foreground = mean.iter().filter(|&&m| m > 0.5).count() as f64 / mean.len().max(1) as f64;
    let agreement = samples.mean_pairwise_iou();
    let record = ImageRecord {
        input: image.source.clone(),
        output: PathBuf::new(),
        height: image.height,
        width: image.width,
        samples: options.samples,
        foreground_fraction: foreground,
        mean_pairwise_iou: agreement,
    };
    let overview =
        overview(image, probs, options.samples, &record).map_err(|e| fail(e.to_string()))?;
    let name = names.unique(&image.name);
    output::write_image(out, &name, &samples, options.formats, &overview, record).map_err(fail)
}

fn overview(
    image: &InputImage,
    probs: &[f32],
    n: usize,
    record: &ImageRecord,
) -> Result<crate::tensorboard::Image, crate::score::ScoreError> {
    let (h, w) = (image.height as i64, image.width as i64);
    let row = FigureRow {
        caption: format!(
            "{}   foreground {:.1}%   mean IoU between samples {:.3}   ({n} samples)",
            image.source,
            100.0 * record.foreground_fraction,
            record.mean_pairwise_iou
        ),
        image: Tensor::f_from_slice(&image.pixels)?.f_view([1, h, w])?,
        masks: Tensor::f_zeros([0, h, w], (Kind::Uint8, tch::Device::Cpu))?,
        probs: Tensor::f_from_slice(probs)?.f_view([n as i64, h, w])?,
    };
    crate::score::figure(&[row], OVERVIEW_SAMPLES as i64, true)
}

fn write_index(out: &Path, index: &Index) -> Result<(), PredictError> {
    crate::run::write_json(&out.join(INDEX_JSON), index)?;
    let mut csv = csv::Writer::from_writer(Vec::new());
    let header = [
        "input",
        "output",
        "height",
        "width",
        "samples",
        "foreground_fraction",
        "mean_pairwise_iou",
        "error",
    ];
    let io = |e: csv::Error| crate::run::RunError::Corrupt {
        path: out.join(INDEX_CSV),
        why: e.to_string(),
    };
    csv.write_record(header).map_err(io)?;
    for r in &index.images {
        let row = [
            r.input.clone(),
            r.output.display().to_string(),
            r.height.to_string(),
            r.width.to_string(),
            r.samples.to_string(),
            format!("{:.6}", r.foreground_fraction),
            format!("{:.6}", r.mean_pairwise_iou),
            String::new(),
        ];
        csv.write_record(row).map_err(io)?;
    }
    for f in &index.failed {
        let mut row = vec![f.input.clone()];
        row.extend(std::iter::repeat_n(String::new(), 6));
        row.push(f.error.clone());
        csv.write_record(row).map_err(io)?;
    }
    let bytes = csv.into_inner().map_err(|e| io(e.into_error().into()))?;
    crate::run::write_atomic(&out.join(INDEX_CSV), &bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Names;

    #[test]
    fn output_names_are_safe_folder_names_and_unique() {
        let mut names = Names::default();
        assert_eq!(names.unique("case 1/a.png"), "case_1_a.png");
        assert_eq!(names.unique("case_1_a.png"), "case_1_a.png-2");
        assert_eq!(names.unique(".hidden"), "hidden");
        assert_eq!(names.unique(".."), "image");
        assert_eq!(names.unique("..."), "image-2");
    }
}

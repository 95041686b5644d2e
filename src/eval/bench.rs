//! `probunet bench-eval`: evaluation throughput, in images per second at a given sample
//! count, of probunet next to the PyTorch implementation of the same model
//! (`scripts/bench_eval.py` with `scripts/torch_probunet.py`) doing the same work per
//! batch, as `probunet eval` does it: prior and U-Net once per image, fcomb once per
//! sample, every pairwise IoU count, NCC and the mean prediction on the device, then GED,
//! HM-IoU and diversity under both conventions on the host.
//!
//! Each run measures probunet in a fresh child process (`bench-eval --one`), which also
//! exports its freshly initialised weights, the synthetic images and masks and every
//! image's noise; the PyTorch side then runs on exactly those inputs, so both score the
//! same samples (their mean GEDs agree). The two sides alternate, `--repeats` times, so
//! that load from other processes hits both alike; the table shows the best of each.
use super::EvalError;
use crate::bench::{last_json_line, peak_mib, python, repo};
use crate::data::synthetic::{Synthetic, SyntheticConfig};
use crate::device::{describe, DeviceSpec};
use crate::memory::budget::{product, Need};
use crate::metrics::ImageScores;
use crate::model::{ModelConfig, ModelError, ProbUNet};
use crate::score::{batch_noise, probabilities, BatchCounts};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::process::Command;
use std::time::Instant;
use tch::{nn, Device, Tensor};

/// What [`race`] measures: the seed's model (or `filters`) on synthetic images.
#[derive(Debug, Clone)]
pub struct BenchEvalOptions {
    /// Images timed, after one untimed warm-up batch.
    pub images: usize,
    /// Height and width of the synthetic images.
    pub size: usize,
    /// Samples per image.
    pub samples: usize,
    /// Images per forward pass.
    pub batch: usize,
    pub device: DeviceSpec,
    /// The model's filters per level; `None` for the seed's.
    pub filters: Option<Vec<i64>>,
    pub latent_dim: i64,
    /// Seed of the weights, the images and the noise.
    pub seed: u64,
    /// Runs of each side, alternating.
    pub repeats: usize,
    /// Skip the PyTorch side.
    pub no_torch: bool,
}

/// What one side measured; `scripts/bench_eval.py` prints the same fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    pub implementation: String,
    pub device: String,
    pub images: usize,
    pub samples: usize,
    pub batch: usize,
    pub size: usize,
    pub seconds: f64,
    /// Sampling and the device-side counts, until the counts are on the host.
    pub device_seconds: f64,
    /// GED, HM-IoU and diversity from the counts.
    pub host_seconds: f64,
    pub images_per_s: f64,
    /// Means over the timed images (PHiSeg convention): both sides must agree.
    pub mean_ged: f64,
    pub mean_hm_iou: f64,
    pub mean_diversity: f64,
    /// Peak resident set on the CPU, MiB; absent on CUDA.
    pub peak_mib: Option<f64>,
}

/// Annotators of each synthetic image.
const ANNOTATORS: usize = 4;

impl BenchEvalOptions {
    fn model(&self) -> ModelConfig {
        let defaults = ModelConfig::default();
        ModelConfig {
            filters: self.filters.clone().unwrap_or(defaults.filters.clone()),
            latent_dim: self.latent_dim,
            ..defaults
        }
    }

    /// Refuses flags the measurement cannot take before anything is allocated: counts of
    /// zero, a model the flags cannot build, a `--size` the model's levels cannot halve,
    /// and images, weights or samples memory cannot hold, each by the flags that ask.
    pub fn check(&self) -> Result<(), EvalError> {
        if self.images == 0 || self.batch == 0 || self.samples == 0 {
            return Err(EvalError::Options(
                "--images, --batch and --samples must be positive".into(),
            ));
        }
        let config = self.model();
        config.validate().map_err(name_flag)?;
        let divisor = config.size_divisor() as usize;
        if self.size == 0 || !self.size.is_multiple_of(divisor) {
            return Err(EvalError::Options(format!(
                "--size must be a positive multiple of {divisor} for {} model levels, got {}",
                config.filters.len(),
                self.size
            )));
        }
        let filters: Vec<String> = config.filters.iter().map(i64::to_string).collect();
        let what = format!(
            "bench-eval --filters {} --latent-dim {}",
            filters.join(","),
            config.latent_dim
        );
        Need::new(what, config.parameter_count().saturating_mul(4))
            .fits_memory()
            .map_err(ModelError::from)?;
        let (batch, side) = (self.batch as u64, self.size as u64);
        let items = (self.images as u64).saturating_add(batch);
        // Each item's image (a float) and masks (a byte per annotator) per pixel, three
        // times over: the items, their concatenation and the tensors made from it.
        let per_pixel = 3 * (4 + ANNOTATORS as u64);
        let what = format!(
            "bench-eval --images {} --batch {batch} --size {side}",
            self.images
        );
        Need::new(what, product(&[items, side, side, per_pixel]))
            .fits_memory()
            .map_err(ModelError::from)?;
        let what = format!(
            "bench-eval --samples {} at --batch {batch} --size {side}",
            self.samples
        );
        (config.check_sampling(what, batch.min(items), self.samples as u64, side, side))
            .map_err(ModelError::from)?;
        Ok(())
    }
}

/// A model setting refused under the flag that set it.
fn name_flag(error: ModelError) -> EvalError {
    match error {
        ModelError::Config {
            key: key @ ("filters" | "latent_dim"),
            why,
        } => EvalError::Options(format!("--{}: {why}", key.replace('_', "-"))),
        other => other.into(),
    }
}

fn mean(scores: &[ImageScores], f: impl Fn(&ImageScores) -> f64) -> f64 {
    scores.iter().map(f).sum::<f64>() / scores.len().max(1) as f64
}

/// Measures probunet in this process: one untimed warm-up batch, then `images` images.
pub fn measure(
    options: &BenchEvalOptions,
    export: Option<&Path>,
) -> Result<BenchReport, EvalError> {
    options.check()?;
    let device = options.device.resolve()?;
    let config = options.model();
    tch::manual_seed(options.seed as i64);
    let vs = nn::VarStore::new(device);
    let model = ProbUNet::new(&vs.root(), config.clone())?;
    crate::model::freeze(&vs)?;
    let total = options.images + options.batch;
    let data = Synthetic::new(SyntheticConfig {
        items: total,
        size: options.size,
        annotators: ANNOTATORS,
        seed: options.seed,
    });
    let items: Vec<_> = (0..total).map(|i| data.item(i)).collect();
    let side = options.size as i64;
    let images: Vec<f32> = items.iter().flat_map(|i| i.image.iter().copied()).collect();
    let images = Tensor::f_from_slice(&images)?.f_view([total as i64, 1, side, side])?;
    let masks: Vec<u8> = items.iter().flat_map(|i| i.masks.iter().copied()).collect();
    let masks =
        Tensor::f_from_slice(&masks)?.f_view([total as i64, ANNOTATORS as i64, side, side])?;
    let latent = config.latent_dim as usize;
    if let Some(dir) = export {
        export_inputs(dir, options, &vs, &config, &images, &masks)?;
    }

    let mut scores = Vec::with_capacity(options.images);
    let (mut device_seconds, mut host_seconds) = (0.0, 0.0);
    for start in (0..total).step_by(options.batch) {
        let len = options.batch.min(total - start);
        let t0 = Instant::now();
        let indices: Vec<usize> = (start..start + len).collect();
        let slice = |t: &Tensor| t.f_narrow(0, start as i64, len as i64)?.f_to_device(device);
        let (batch_images, batch_masks) = (slice(&images)?, slice(&masks)?);
        let eps = batch_noise(options.seed, &indices, options.samples, latent)?;
        let probs = probabilities(&model, &batch_images, &eps)?;
        let counts = BatchCounts::compute(&batch_masks, &probs, &[options.samples])?;
        let t1 = Instant::now();
        let batch_scores = counts.scores()?;
        let t2 = Instant::now();
        if start >= options.batch {
            device_seconds += (t1 - t0).as_secs_f64();
            host_seconds += (t2 - t1).as_secs_f64();
            scores.extend_from_slice(&batch_scores[0]);
        }
    }
    let seconds = device_seconds + host_seconds;
    Ok(BenchReport {
        implementation: "probunet".into(),
        device: describe(device),
        images: options.images,
        samples: options.samples,
        batch: options.batch,
        size: options.size,
        seconds,
        device_seconds,
        host_seconds,
        images_per_s: options.images as f64 / seconds.max(1e-12),
        mean_ged: mean(&scores, |s| s.phiseg.ged),
        mean_hm_iou: mean(&scores, |s| s.phiseg.hm_iou),
        mean_diversity: mean(&scores, |s| s.phiseg.diversity),
        peak_mib: peak_mib(device).0,
    })
}

/// Writes what the PyTorch side needs to score the same samples: the weights, the model's
/// config, and the images, masks and every image's noise.
fn export_inputs(
    dir: &Path,
    options: &BenchEvalOptions,
    vs: &nn::VarStore,
    config: &ModelConfig,
    images: &Tensor,
    masks: &Tensor,
) -> Result<(), EvalError> {
    let io = |e: &dyn std::fmt::Display| EvalError::Io {
        path: dir.to_path_buf(),
        why: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| io(&e))?;
    vs.save(dir.join("weights.safetensors"))
        .map_err(|e| io(&e))?;
    let all: Vec<usize> = (0..images.size()[0] as usize).collect();
    let noise = batch_noise(
        options.seed,
        &all,
        options.samples,
        config.latent_dim as usize,
    )?;
    Tensor::write_safetensors(
        &[("images", images), ("masks", masks), ("noise", &noise)],
        dir.join("data.safetensors"),
    )?;
    let json = serde_json::to_vec_pretty(config).map_err(|e| io(&e))?;
    std::fs::write(dir.join("model.json"), json).map_err(|e| io(&e))?;
    Ok(())
}

/// Every run of [`race`], in the order they ran.
#[derive(Debug, Clone)]
pub struct Race {
    pub runs: Vec<BenchReport>,
}

impl Race {
    /// The fastest run of `implementation` ("probunet" or "pytorch").
    pub fn best(&self, implementation: &str) -> Option<&BenchReport> {
        self.runs
            .iter()
            .filter(|r| r.implementation == implementation)
            .max_by(|a, b| a.images_per_s.total_cmp(&b.images_per_s))
    }

    /// An error unless the best runs of both sides agree on the mean GED, as they do when
    /// they scored the same samples (which a throughput comparison relies on).
    pub fn check_same_samples(&self) -> Result<()> {
        if let (Some(ours), Some(theirs)) = (self.best("probunet"), self.best("pytorch")) {
            let gap = (ours.mean_ged - theirs.mean_ged).abs();
            if gap > 1e-3 {
                bail!(
                    "the mean GEDs differ by {gap:.2e}: the two sides did not score the same samples"
                );
            }
        }
        Ok(())
    }
}

/// Runs both sides `repeats` times, alternating, telling `each` every run as it ends.
/// probunet runs as `bench-eval --one` of this binary, exporting its inputs to a scratch
/// folder that the PyTorch side reads.
pub fn race(options: &BenchEvalOptions, mut each: impl FnMut(&BenchReport)) -> Result<Race> {
    if options.repeats == 0 {
        bail!("--repeats must be positive");
    }
    options.check()?;
    let device = match options.device.resolve()? {
        Device::Cuda(n) => format!("cuda:{n}"),
        _ => "cpu".into(),
    };
    let export = std::env::temp_dir().join(format!("probunet-bench-eval-{}", std::process::id()));
    let result = (|| -> Result<Vec<BenchReport>> {
        let mut runs = Vec::new();
        for _ in 0..options.repeats {
            let ours = run_ours(options, &device, &export)?;
            each(&ours);
            runs.push(ours);
            if !options.no_torch {
                let theirs = Command::new(python())
                    .arg(repo().join("scripts/bench_eval.py"))
                    .arg("--export")
                    .arg(&export)
                    .args(["--samples", &options.samples.to_string()])
                    .args(["--batch", &options.batch.to_string()])
                    .args(["--device", &device])
                    .output()?;
                let theirs: BenchReport = last_json_line(theirs, "scripts/bench_eval.py")?;
                each(&theirs);
                runs.push(theirs);
            }
        }
        Ok(runs)
    })();
    let _ = std::fs::remove_dir_all(&export);
    Ok(Race { runs: result? })
}

/// One probunet run, in a fresh process that exports its inputs to `export`.
fn run_ours(options: &BenchEvalOptions, device: &str, export: &Path) -> Result<BenchReport> {
    let mut ours = Command::new(std::env::current_exe()?);
    ours.args(["bench-eval", "--one", "--device", device])
        .arg("--export")
        .arg(export)
        .args(["--images", &options.images.to_string()])
        .args(["--size", &options.size.to_string()])
        .args(["--samples", &options.samples.to_string()])
        .args(["--batch", &options.batch.to_string()])
        .args(["--latent-dim", &options.latent_dim.to_string()])
        .args(["--seed", &options.seed.to_string()]);
    if let Some(filters) = &options.filters {
        let list: Vec<String> = filters.iter().map(i64::to_string).collect();
        ours.args(["--filters", &list.join(",")]);
    }
    last_json_line(ours.output()?, "probunet bench-eval --one")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_measurement_runs_and_exports_its_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let options = BenchEvalOptions {
            images: 3,
            size: 16,
            samples: 5,
            batch: 2,
            device: DeviceSpec::Cpu,
            filters: Some(vec![4, 8]),
            latent_dim: 2,
            seed: 1,
            repeats: 1,
            no_torch: true,
        };
        let report = measure(&options, Some(dir.path())).unwrap();
        assert_eq!((report.images, report.samples), (3, 5));
        assert!(
            report.images_per_s > 0.0 && report.mean_ged.is_finite(),
            "{report:?}"
        );
        let data: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(dir.path().join("data.safetensors"))
                .unwrap()
                .into_iter()
                .collect();
        // Three timed images after a warm-up batch of two.
        assert_eq!(data["images"].size(), [5, 1, 16, 16]);
        assert_eq!(data["masks"].size(), [5, 4, 16, 16]);
        assert_eq!(data["noise"].size(), [5, 5, 2]);
        assert!(dir.path().join("weights.safetensors").is_file());
        let model: ModelConfig =
            serde_json::from_slice(&std::fs::read(dir.path().join("model.json")).unwrap()).unwrap();
        assert_eq!(model.filters, [4, 8]);
    }
}

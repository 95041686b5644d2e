//! `probunet bench-eval`: evaluation throughput, in images per second at a given sample
//! count, for the work `probunet eval` does per batch: prior and U-Net once per image,
//! fcomb once per sample, every pairwise IoU count, NCC and the mean prediction on the
//! device, then GED, HM-IoU and diversity under both conventions on the host.
//!
//! The model is freshly initialised (seeded) and the images come from the synthetic
//! generator, so no run is needed. `--export DIR` writes the weights, images, masks and
//! noise, from which `scripts/bench_eval.py` times the PyTorch implementation doing the
//! same work on the same inputs.
use super::batch::{batch_noise, BatchCounts};
use super::command::probabilities;
use super::EvalError;
use crate::data::synthetic::{Synthetic, SyntheticConfig};
use crate::device::{describe, DeviceSpec};
use crate::metrics::ImageScores;
use crate::model::{ModelConfig, ProbUNet};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;
use tch::{nn, Tensor};

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Images timed (after one untimed warm-up batch).
    pub images: usize,
    /// Height and width of the synthetic images.
    pub size: usize,
    pub samples: usize,
    pub batch: usize,
    pub device: DeviceSpec,
    pub model: ModelConfig,
    pub seed: u64,
    /// Where to write `weights.safetensors`, `data.safetensors` and `model.json`.
    pub export: Option<PathBuf>,
}

/// Timings of one benchmark; `device_seconds` runs until the counts are on the host.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub implementation: String,
    pub device: String,
    pub images: usize,
    pub samples: usize,
    pub batch: usize,
    pub size: usize,
    pub seconds: f64,
    pub device_seconds: f64,
    pub host_seconds: f64,
    pub images_per_s: f64,
    /// Means over the timed images (PHiSeg convention), to show the work was real and
    /// to compare with the PyTorch run on the same inputs.
    pub mean_ged: f64,
    pub mean_hm_iou: f64,
    pub mean_diversity: f64,
}

fn mean(scores: &[ImageScores], f: impl Fn(&ImageScores) -> f64) -> f64 {
    scores.iter().map(f).sum::<f64>() / scores.len().max(1) as f64
}

pub fn bench(options: &BenchOptions) -> Result<BenchReport, EvalError> {
    let o = options;
    if o.images == 0 || o.batch == 0 || o.samples == 0 {
        return Err(EvalError::Options(
            "--images, --batch and --samples must be positive".into(),
        ));
    }
    let device = o.device.resolve()?;
    tch::manual_seed(o.seed as i64);
    let mut vs = nn::VarStore::new(device);
    let model = ProbUNet::new(&vs.root(), o.model.clone())?;
    vs.freeze();
    // One warm-up batch in front of the timed images.
    let total = o.images + o.batch;
    let data = Synthetic::new(SyntheticConfig {
        items: total,
        size: o.size,
        annotators: 4,
        seed: o.seed,
    });
    let items: Vec<_> = (0..total).map(|i| data.item(i)).collect();
    let side = o.size as i64;
    let images = Tensor::from_slice(
        &items
            .iter()
            .flat_map(|i| i.image.clone())
            .collect::<Vec<_>>(),
    )
    .view([total as i64, 1, side, side]);
    let masks = Tensor::from_slice(
        &items
            .iter()
            .flat_map(|i| i.masks.clone())
            .collect::<Vec<_>>(),
    )
    .view([total as i64, 4, side, side]);
    model.check_image(&images.narrow(0, 0, 1))?;
    let latent = o.model.latent_dim as usize;
    if let Some(dir) = &o.export {
        let io = |e: &dyn std::fmt::Display| EvalError::Io {
            path: dir.clone(),
            why: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| io(&e))?;
        vs.save(dir.join("weights.safetensors"))
            .map_err(|e| io(&e))?;
        let indices: Vec<usize> = (0..total).collect();
        let noise = batch_noise(o.seed, &indices, o.samples, latent);
        Tensor::write_safetensors(
            &[("images", &images), ("masks", &masks), ("noise", &noise)],
            dir.join("data.safetensors"),
        )?;
        let json = serde_json::to_vec_pretty(&o.model).expect("the config serialises");
        std::fs::write(dir.join("model.json"), json).map_err(|e| io(&e))?;
    }

    let mut scores = Vec::with_capacity(o.images);
    let (mut device_seconds, mut host_seconds) = (0.0, 0.0);
    for start in (0..total).step_by(o.batch) {
        let len = o.batch.min(total - start);
        let timed = start >= o.batch;
        let t0 = Instant::now();
        let indices: Vec<usize> = (start..start + len).collect();
        let batch_images = images.narrow(0, start as i64, len as i64).to_device(device);
        let batch_masks = masks.narrow(0, start as i64, len as i64).to_device(device);
        let eps = batch_noise(o.seed, &indices, o.samples, latent);
        let probs = probabilities(&model, &batch_images, &eps)?;
        let counts = BatchCounts::compute(&batch_masks, &probs, &[o.samples])?;
        let t1 = Instant::now();
        let batch_scores = counts.scores()?;
        let t2 = Instant::now();
        if timed {
            device_seconds += (t1 - t0).as_secs_f64();
            host_seconds += (t2 - t1).as_secs_f64();
            scores.extend_from_slice(&batch_scores[0]);
        }
    }
    let seconds = device_seconds + host_seconds;
    Ok(BenchReport {
        implementation: "probunet (Rust, tch)".into(),
        device: describe(device),
        images: o.images,
        samples: o.samples,
        batch: o.batch,
        size: o.size,
        seconds,
        device_seconds,
        host_seconds,
        images_per_s: o.images as f64 / seconds.max(1e-12),
        mean_ged: mean(&scores, |s| s.phiseg.ged),
        mean_hm_iou: mean(&scores, |s| s.phiseg.hm_iou),
        mean_diversity: mean(&scores, |s| s.phiseg.diversity),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_benchmark_runs_and_exports_its_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let report = bench(&BenchOptions {
            images: 3,
            size: 16,
            samples: 5,
            batch: 2,
            device: DeviceSpec::Cpu,
            model: ModelConfig {
                filters: vec![4, 8],
                ..ModelConfig::default()
            },
            seed: 1,
            export: Some(dir.path().to_path_buf()),
        })
        .unwrap();
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
        assert!(dir.path().join("model.json").is_file());
    }
}

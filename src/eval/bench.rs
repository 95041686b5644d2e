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
use crate::score::{batch_noise, probabilities, BatchCounts};
use super::EvalError;
use crate::bench::{last_json_line, peak_mib, python, repo};
use crate::data::synthetic::{Synthetic, SyntheticConfig};
use crate::device::{describe, DeviceSpec};
use crate::metrics::ImageScores;
use crate::model::{ModelConfig, ProbUNet};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use tch::{nn, Device, Tensor};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchEvalArgs {
    /// Images timed, after one untimed warm-up batch.
    #[arg(long, default_value_t = 16)]
    pub images: usize,
    /// Height and width of the synthetic images.
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// Samples per image.
    #[arg(long, default_value_t = 100)]
    pub samples: usize,
    /// Images per forward pass.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// The model's filters per level [default: the seed's 32,64,128,192].
    #[arg(long, value_delimiter = ',')]
    pub filters: Option<Vec<i64>>,
    #[arg(long, default_value_t = 2)]
    pub latent_dim: i64,
    /// Seed of the weights, the images and the noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Runs of each side, alternating.
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
    /// Skip the PyTorch side.
    #[arg(long)]
    pub no_torch: bool,
    /// Print every run as a JSON line instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Measure probunet once in this process, export its inputs to --export and print
    /// the result as JSON; the parent runs each probunet measurement this way.
    #[arg(long, hide = true)]
    pub one: bool,
    #[arg(long, hide = true, requires = "one")]
    pub export: Option<PathBuf>,
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

impl BenchEvalArgs {
    fn model(&self) -> ModelConfig {
        let defaults = ModelConfig::default();
        ModelConfig {
            filters: self.filters.clone().unwrap_or(defaults.filters.clone()),
            latent_dim: self.latent_dim,
            ..defaults
        }
    }
}

fn mean(scores: &[ImageScores], f: impl Fn(&ImageScores) -> f64) -> f64 {
    scores.iter().map(f).sum::<f64>() / scores.len().max(1) as f64
}

/// Measures probunet in this process: one untimed warm-up batch, then `images` images.
pub fn measure(args: &BenchEvalArgs, export: Option<&Path>) -> Result<BenchReport, EvalError> {
    if args.images == 0 || args.batch == 0 || args.samples == 0 {
        return Err(EvalError::Options(
            "--images, --batch and --samples must be positive".into(),
        ));
    }
    let device = args.device.resolve()?;
    let config = args.model();
    tch::manual_seed(args.seed as i64);
    let mut vs = nn::VarStore::new(device);
    let model = ProbUNet::new(&vs.root(), config.clone())?;
    vs.freeze();
    let total = args.images + args.batch;
    let data = Synthetic::new(SyntheticConfig {
        items: total,
        size: args.size,
        annotators: 4,
        seed: args.seed,
    });
    let items: Vec<_> = (0..total).map(|i| data.item(i)).collect();
    let side = args.size as i64;
    let images: Vec<f32> = items.iter().flat_map(|i| i.image.iter().copied()).collect();
    let images = Tensor::from_slice(&images).view([total as i64, 1, side, side]);
    let masks: Vec<u8> = items.iter().flat_map(|i| i.masks.iter().copied()).collect();
    let masks = Tensor::from_slice(&masks).view([total as i64, 4, side, side]);
    model.check_image(&images.narrow(0, 0, 1))?;
    let latent = config.latent_dim as usize;
    if let Some(dir) = export {
        let io = |e: &dyn std::fmt::Display| EvalError::Io {
            path: dir.to_path_buf(),
            why: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| io(&e))?;
        vs.save(dir.join("weights.safetensors"))
            .map_err(|e| io(&e))?;
        let all: Vec<usize> = (0..total).collect();
        let noise = batch_noise(args.seed, &all, args.samples, latent);
        Tensor::write_safetensors(
            &[("images", &images), ("masks", &masks), ("noise", &noise)],
            dir.join("data.safetensors"),
        )?;
        let json = serde_json::to_vec_pretty(&config).expect("the config serialises");
        std::fs::write(dir.join("model.json"), json).map_err(|e| io(&e))?;
    }

    let mut scores = Vec::with_capacity(args.images);
    let (mut device_seconds, mut host_seconds) = (0.0, 0.0);
    for start in (0..total).step_by(args.batch) {
        let len = args.batch.min(total - start);
        let t0 = Instant::now();
        let indices: Vec<usize> = (start..start + len).collect();
        let batch_images = images.narrow(0, start as i64, len as i64).to_device(device);
        let batch_masks = masks.narrow(0, start as i64, len as i64).to_device(device);
        let eps = batch_noise(args.seed, &indices, args.samples, latent);
        let probs = probabilities(&model, &batch_images, &eps)?;
        let counts = BatchCounts::compute(&batch_masks, &probs, &[args.samples])?;
        let t1 = Instant::now();
        let batch_scores = counts.scores()?;
        let t2 = Instant::now();
        if start >= args.batch {
            device_seconds += (t1 - t0).as_secs_f64();
            host_seconds += (t2 - t1).as_secs_f64();
            scores.extend_from_slice(&batch_scores[0]);
        }
    }
    let seconds = device_seconds + host_seconds;
    Ok(BenchReport {
        implementation: "probunet".into(),
        device: describe(device),
        images: args.images,
        samples: args.samples,
        batch: args.batch,
        size: args.size,
        seconds,
        device_seconds,
        host_seconds,
        images_per_s: args.images as f64 / seconds.max(1e-12),
        mean_ged: mean(&scores, |s| s.phiseg.ged),
        mean_hm_iou: mean(&scores, |s| s.phiseg.hm_iou),
        mean_diversity: mean(&scores, |s| s.phiseg.diversity),
        peak_mib: peak_mib(device).0,
    })
}

/// Runs both sides `repeats` times, alternating, and prints every run and the best of
/// each side.
pub fn run(args: &BenchEvalArgs) -> Result<()> {
    if args.one {
        let report = measure(args, args.export.as_deref())?;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    if args.repeats == 0 {
        bail!("--repeats must be positive");
    }
    let device = match args.device.resolve()? {
        Device::Cuda(n) => format!("cuda:{n}"),
        _ => "cpu".into(),
    };
    let export = std::env::temp_dir().join(format!("probunet-bench-eval-{}", std::process::id()));
    let result = (|| -> Result<Vec<BenchReport>> {
        let exe = std::env::current_exe()?;
        let mut rows = Vec::new();
        for _ in 0..args.repeats {
            let mut ours = Command::new(&exe);
            ours.args(["bench-eval", "--one", "--device", &device])
                .arg("--export")
                .arg(&export)
                .args(["--images", &args.images.to_string()])
                .args(["--size", &args.size.to_string()])
                .args(["--samples", &args.samples.to_string()])
                .args(["--batch", &args.batch.to_string()])
                .args(["--latent-dim", &args.latent_dim.to_string()])
                .args(["--seed", &args.seed.to_string()]);
            if let Some(filters) = &args.filters {
                let list: Vec<String> = filters.iter().map(i64::to_string).collect();
                ours.args(["--filters", &list.join(",")]);
            }
            let ours: BenchReport = last_json_line(ours.output()?, "probunet bench-eval --one")?;
            report_line(args, &ours);
            rows.push(ours);
            if !args.no_torch {
                let theirs = Command::new(python())
                    .arg(repo().join("scripts/bench_eval.py"))
                    .arg("--export")
                    .arg(&export)
                    .args(["--samples", &args.samples.to_string()])
                    .args(["--batch", &args.batch.to_string()])
                    .args(["--device", &device])
                    .output()?;
                let theirs: BenchReport = last_json_line(theirs, "scripts/bench_eval.py")?;
                report_line(args, &theirs);
                rows.push(theirs);
            }
        }
        Ok(rows)
    })();
    let _ = std::fs::remove_dir_all(&export);
    let rows = result?;
    if args.json {
        return Ok(());
    }
    let best = |name: &str| {
        rows.iter()
            .filter(|r| r.implementation == name)
            .max_by(|a, b| a.images_per_s.total_cmp(&b.images_per_s))
    };
    println!(
        "\neval throughput at {} samples per image: {} synthetic {}x{} images, batch {}, best of {}",
        args.samples, args.images, args.size, args.size, args.batch, args.repeats
    );
    println!(
        "{:<10} {:<18} {:>9} {:>10} {:>8} {:>9} {:>10} {:>10}",
        "impl", "device", "images/s", "device s", "host s", "peak MiB", "mean GED", "diversity"
    );
    let ours = best("probunet").expect("probunet ran");
    let theirs = best("pytorch");
    for r in std::iter::once(ours).chain(theirs) {
        println!(
            "{:<10} {:<18} {:>9.3} {:>10.2} {:>8.2} {:>9} {:>10.6} {:>10.6}",
            r.implementation,
            r.device,
            r.images_per_s,
            r.device_seconds,
            r.host_seconds,
            r.peak_mib.map_or("-".into(), |m| format!("{m:.0}")),
            r.mean_ged,
            r.mean_diversity
        );
    }
    if let Some(theirs) = theirs {
        println!(
            "probunet / PyTorch: {:.2}x images/s",
            ours.images_per_s / theirs.images_per_s
        );
        let gap = (ours.mean_ged - theirs.mean_ged).abs();
        if gap > 1e-3 {
            bail!(
                "the mean GEDs differ by {gap:.2e}: the two sides did not score the same samples"
            );
        }
    }
    Ok(())
}

fn report_line(args: &BenchEvalArgs, r: &BenchReport) {
    if args.json {
        println!("{}", serde_json::to_string(r).expect("a report serialises"));
    } else {
        println!(
            "{:<9} {:8.3} images/s ({:.2} s sampling and device metrics, {:.2} s host metrics; \
             mean GED {:.6}, diversity {:.6})",
            r.implementation,
            r.images_per_s,
            r.device_seconds,
            r.host_seconds,
            r.mean_ged,
            r.mean_diversity
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchEvalArgs,
    }

    #[test]
    fn a_tiny_measurement_runs_and_exports_its_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let args = Cli::parse_from([
            "x",
            "--images",
            "3",
            "--size",
            "16",
            "--samples",
            "5",
            "--batch",
            "2",
            "--device",
            "cpu",
            "--filters",
            "4,8",
            "--seed",
            "1",
        ])
        .args;
        let report = measure(&args, Some(dir.path())).unwrap();
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

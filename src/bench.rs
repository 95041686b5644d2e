//! `probunet bench`: training and sampling throughput of probunet next to the PyTorch
//! implementation of the same model (scripts/bench_torch.py), setting by setting, on one
//! machine in one invocation. Each setting runs in a fresh child process on both sides, so
//! peak memory is that setting's own.
use crate::device::{describe, DeviceSpec, Precision};
use crate::model::{ModelConfig, ProbUNet};
use crate::train::{forward_backward, named_variables, Adam};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

/// What [`race`] measures, setting by setting: every batch size at every precision.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub batches: Vec<i64>,
    pub precisions: Vec<Precision>,
    pub device: DeviceSpec,
    /// Timed training steps per setting, after `warmup` untimed ones.
    pub steps: usize,
    pub warmup: usize,
    /// Prior samples per image in the sampling measurement.
    pub samples: i64,
    /// Also race PyTorch with torch.compile.
    pub compile: bool,
    /// Skip the PyTorch side.
    pub no_torch: bool,
    /// Times each setting is raced, the sides alternating within each round.
    pub rounds: usize,
    /// Every measured row is appended here as a JSON line.
    pub out: PathBuf,
}

/// One measured setting, as both sides print it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    #[serde(rename = "impl")]
    pub implementation: String,
    pub batch: i64,
    pub precision: String,
    pub device: String,
    pub train_images_per_s: f64,
    pub ms_per_step: f64,
    pub samples_per_s: f64,
    /// Peak resident set (CPU) or peak CUDA allocation, MiB; absent where unknown.
    pub peak_mib: Option<f64>,
    pub peak_kind: String,
    pub threads: i64,
    /// The CPU's vector ISA as the implementation uses it (AVX2, AVX512, ...).
    #[serde(default)]
    pub cpu: Option<String>,
    /// probunet's activation layouts (`model::layout`); PyTorch's sides run NCHW.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<String>,
}

fn sync(device: Device) {
    if let Device::Cuda(n) = device {
        tch::Cuda::synchronize(n as i64);
    }
}

/// This process's peak memory on `device`, MiB, and what was measured: the peak CUDA
/// allocation of libtorch's caching allocator, or the peak resident set.
pub(crate) fn peak_mib(device: Device) -> (Option<f64>, &'static str) {
    match device {
        Device::Cuda(n) => (
            crate::memory::cuda_peak_allocated(n).map(|b| b as f64 / (1 << 20) as f64),
            "cuda_max_allocated",
        ),
        _ => (peak_rss_mib(), "rss"),
    }
}

/// Peak resident set of this process, MiB (Linux).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The median of `values` (sorted in place); 0 for none. A step that another process on a
/// shared machine slowed moves a mean, not a median.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => 0.5 * (values[n / 2 - 1] + values[n / 2]),
    }
}

/// The median seconds of `reps` calls of `f`, each timed to the device's completion.
fn median_seconds<T>(reps: usize, device: Device, mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    let mut seconds = Vec::new();
    for _ in 0..reps {
        let start = Instant::now();
        f()?;
        sync(device);
        seconds.push(start.elapsed().as_secs_f64());
    }
    Ok(median(&mut seconds))
}

/// Each implementation's median over the rounds of each setting, in the order the rows
/// first appear: every figure is the median of that figure across the rounds.
pub fn medians(rows: &[Measurement]) -> Vec<Measurement> {
    let key = |r: &Measurement| (r.implementation.clone(), r.batch, r.precision.clone());
    let mut keys = Vec::new();
    for k in rows.iter().map(key) {
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .filter_map(|k| {
            let group: Vec<&Measurement> = rows.iter().filter(|r| key(r) == k).collect();
            let of = |f: &dyn Fn(&Measurement) -> f64| {
                median(&mut group.iter().map(|r| f(r)).collect::<Vec<_>>())
            };
            let mut peaks: Vec<f64> = group.iter().filter_map(|r| r.peak_mib).collect();
            let first = *group.first()?;
            Some(Measurement {
                train_images_per_s: of(&|r| r.train_images_per_s),
                ms_per_step: of(&|r| r.ms_per_step),
                samples_per_s: of(&|r| r.samples_per_s),
                peak_mib: (!peaks.is_empty()).then(|| median(&mut peaks)),
                ..first.clone()
            })
        })
        .collect()
}

/// Height and width of the random images every setting trains and samples on.
const SIDE: i64 = 128;

/// Refuses a setting that memory cannot hold before anything is allocated: training at
/// `batch` (on the CPU; a GPU's memory is not the host's) and `samples` samples of each
/// image, each named by the flags that asked for it.
pub fn check_room(batch: i64, samples: i64, device: Device) -> Result<()> {
    let config = ModelConfig::default();
    let side = SIDE as u64;
    let (batch, samples) = (batch.max(0) as u64, samples.max(0) as u64);
    if !device.is_cuda() {
        let part = crate::model::parts::part_images(&config, batch, side, side, device);
        config
            .check_training(batch, part, side, side)
            .with_context(|| format!("bench --batches {batch}"))?;
    }
    let what = format!("bench --samples {samples} at --batches {batch}");
    config.check_sampling(what, batch, samples, side, side)?;
    Ok(())
}

/// Measures one setting in this process: training and sampling times are the medians of
/// the timed steps and sampling passes.
pub fn measure(
    batch: i64,
    precision: Precision,
    device: Device,
    options: &BenchOptions,
) -> Result<Measurement> {
    check_room(batch, options.samples, device)?;
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let mut model = ProbUNet::new(&vs.root(), ModelConfig::default())?;
    model.set_precision(precision);
    let mut adam = Adam::new(named_variables(&vs))?;
    let image = Tensor::f_rand([batch, 1, SIDE, SIDE], (Kind::Float, device))?;
    let mask = Tensor::f_rand([batch, 1, SIDE, SIDE], (Kind::Float, device))?
        .f_gt(0.5)?
        .f_to_kind(Kind::Float)?;
    let mut train_step = || -> Result<()> {
        let (_, values) = forward_backward(&model, &mut adam, &image, &mask)?;
        if !values.loss.is_finite() {
            bail!("non-finite loss while benchmarking");
        }
        adam.step(1e-4)?;
        Ok(())
    };
    for _ in 0..options.warmup {
        train_step()?;
    }
    sync(device);
    let train_s = median_seconds(options.steps.max(1), device, train_step)?;

    let sample = || -> Result<i64> {
        let logits = tch::no_grad(|| model.sample(&image, options.samples))?;
        Ok(logits
            .f_sigmoid()?
            .f_gt(0.5)?
            .f_sum(Kind::Int64)?
            .f_int64_value(&[])?)
    };
    sample()?;
    sync(device);
    let sample_s = median_seconds((options.steps / 2).max(1), device, sample)?;
    let (peak_mib, peak_kind) = peak_mib(device);
    Ok(Measurement {
        implementation: "probunet".into(),
        batch,
        precision: precision.to_string(),
        device: describe(device),
        train_images_per_s: batch as f64 / train_s,
        ms_per_step: 1e3 * train_s,
        samples_per_s: (batch * options.samples) as f64 / sample_s,
        peak_mib,
        peak_kind: peak_kind.into(),
        threads: tch::get_num_threads() as i64,
        cpu: Some(crate::sys::cpu_capability()),
        layout: Some(model.layouts(device).to_string()),
    })
}

/// The checkout this binary was built from.
const BUILT_IN: &str = env!("CARGO_MANIFEST_DIR");

/// The checkout whose `scripts/` hold the PyTorch side: `$PROBUNET_REPO`, else the working
/// directory when it is a checkout (a binary carried to another machine, run from a copy
/// of the tree there), else the one this binary was built from.
pub(crate) fn repo() -> PathBuf {
    if let Some(dir) = std::env::var_os("PROBUNET_REPO") {
        return PathBuf::from(dir);
    }
    match std::env::current_dir() {
        Ok(dir) if dir.join("scripts/torch_probunet.py").is_file() => dir,
        _ => PathBuf::from(BUILT_IN),
    }
}

/// `$PROBUNET_PYTHON`, else the checkout's `.venv`.
pub(crate) fn python() -> PathBuf {
    std::env::var_os("PROBUNET_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"))
}

/// The last line of a child's stdout that is a JSON object, as `T`; a failed child is an
/// error with its stderr.
pub(crate) fn last_json_line<T: serde::de::DeserializeOwned>(
    output: std::process::Output,
    what: &str,
) -> Result<T> {
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("{what} printed no result"))?;
    serde_json::from_str(line).with_context(|| format!("{what} printed {line:?}"))
}

/// What [`race`] tells as it goes.
#[derive(Debug)]
pub enum Progress<'a> {
    /// This precision needs a CUDA device, which `device` is not; its settings were skipped.
    Skipped {
        precision: Precision,
        device: Device,
    },
    /// One setting measured on both sides: probunet's row first, then PyTorch's (eager,
    /// then compiled).
    Measured(&'a [Measurement]),
}

/// Measures every setting on both sides `options.rounds` times, each in a fresh child
/// process, appending each row to `options.out` and telling `progress` after each round;
/// returns every row. A setting memory cannot hold is refused before any is measured.
pub fn race(
    options: &BenchOptions,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<Vec<Measurement>> {
    let device = options.device.resolve()?;
    for &batch in &options.batches {
        check_room(batch, options.samples, device)?;
    }
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&options.out)
        .with_context(|| format!("opening {}", options.out.display()))?;
    let mut all = Vec::new();
    for &precision in &options.precisions {
        if precision == Precision::Bf16 && !device.is_cuda() {
            progress(Progress::Skipped { precision, device });
            continue;
        }
        for &batch in &options.batches {
            for _ in 0..options.rounds.max(1) {
                let rows = setting(options, batch, precision, device)?;
                for row in &rows {
                    let mut line = serde_json::to_value(row)?;
                    line["date"] = serde_json::json!(chrono::Utc::now().to_rfc3339());
                    writeln!(out, "{line}")?;
                }
                progress(Progress::Measured(&rows));
                all.extend(rows);
            }
        }
    }
    Ok(all)
}

/// One setting: probunet (`bench --one`), then PyTorch unless skipped.
fn setting(
    options: &BenchOptions,
    batch: i64,
    precision: Precision,
    device: Device,
) -> Result<Vec<Measurement>> {
    let torch_device = match device {
        Device::Cuda(n) => format!("cuda:{n}"),
        _ => "cpu".into(),
    };
    let common = [
        "--steps".to_string(),
        options.steps.to_string(),
        "--warmup".into(),
        options.warmup.to_string(),
        "--samples".into(),
        options.samples.to_string(),
    ];
    let ours = Command::new(std::env::current_exe()?)
        .args([
            "bench",
            "--one",
            "--device",
            &torch_device,
            "--batches",
            &batch.to_string(),
        ])
        .args(["--precisions", &precision.to_string()])
        .args(&common)
        .output()?;
    let mut rows = vec![last_json_line(ours, "probunet bench --one")?];
    if options.no_torch {
        return Ok(rows);
    }
    let variants: &[bool] = if options.compile {
        &[false, true]
    } else {
        &[false]
    };
    for &compile in variants {
        let mut cmd = Command::new(python());
        cmd.arg(repo().join("scripts/bench_torch.py"))
            .args([
                "--batch",
                &batch.to_string(),
                "--precision",
                &precision.to_string(),
            ])
            .args(["--device", &torch_device])
            .args(&common);
        if compile {
            cmd.arg("--compile");
        }
        rows.push(last_json_line(cmd.output()?, "scripts/bench_torch.py")?);
    }
    if let Some(port) = seed_port() {
        let mut cmd = Command::new(python());
        cmd.arg(repo().join("scripts/bench_torch.py"))
            .args(["--batch", &batch.to_string()])
            .args(["--precision", &precision.to_string()])
            .args(["--device", &torch_device])
            .args(&common)
            .arg("--port")
            .arg(&port);
        rows.push(last_json_line(
            cmd.output()?,
            "scripts/bench_torch.py --port",
        )?);
    }
    Ok(rows)
}

/// The widely used PyTorch port's folder: `$PROBUNET_SEED_PORT`, else `../shared/seed-port`
/// beside the checkout, where it holds `probabilistic_unet.py`.
pub fn seed_port() -> Option<PathBuf> {
    let dir = std::env::var_os("PROBUNET_SEED_PORT")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/seed-port"));
    dir.join("probabilistic_unet.py").is_file().then_some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(implementation: &str, batch: i64, ms: f64, peak: Option<f64>) -> Measurement {
        Measurement {
            implementation: implementation.into(),
            batch,
            precision: "fp32".into(),
            device: "cpu".into(),
            train_images_per_s: batch as f64 * 1e3 / ms,
            ms_per_step: ms,
            samples_per_s: 1e4 / ms,
            peak_mib: peak,
            peak_kind: "rss".into(),
            threads: 2,
            cpu: Some("AVX2".into()),
            layout: None,
        }
    }

    #[test]
    fn medians_are_per_side_and_setting_in_first_seen_order() {
        let rows = [
            row("probunet", 5, 100.0, Some(10.0)),
            row("seed-port", 5, 300.0, Some(30.0)),
            row("probunet", 5, 900.0, Some(12.0)),
            row("seed-port", 5, 200.0, None),
            row("probunet", 5, 120.0, Some(11.0)),
            row("seed-port", 5, 250.0, Some(20.0)),
            row("probunet", 32, 400.0, None),
        ];
        let m = medians(&rows);
        let got: Vec<(&str, i64, f64, Option<f64>)> = m
            .iter()
            .map(|r| {
                (
                    r.implementation.as_str(),
                    r.batch,
                    r.ms_per_step,
                    r.peak_mib,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("probunet", 5, 120.0, Some(11.0)),
                ("seed-port", 5, 250.0, Some(25.0)),
                ("probunet", 32, 400.0, None),
            ]
        );
        assert_eq!(m[0].samples_per_s, 1e4 / 120.0);
        assert_eq!(median(&mut []), 0.0);
    }
}

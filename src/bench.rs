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

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Batch sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "5,32,128")]
    pub batches: Vec<i64>,
    /// Precisions, comma separated (bf16 only on CUDA).
    #[arg(long, value_delimiter = ',', default_value = "fp32,bf16")]
    pub precisions: Vec<Precision>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// Timed training steps per setting (after the warm-up).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Prior samples per image in the sampling measurement.
    #[arg(long, default_value_t = 16)]
    pub samples: i64,
    /// Also race PyTorch with torch.compile.
    #[arg(long)]
    pub compile: bool,
    /// Skip the PyTorch side.
    #[arg(long)]
    pub no_torch: bool,
    /// JSON lines are appended here.
    #[arg(long, default_value = "bench.jsonl")]
    pub out: PathBuf,
    /// Measure one setting (the first batch and precision) in this process and print it
    /// as JSON; the parent runs each setting this way.
    #[arg(long, hide = true)]
    pub one: bool,
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

/// Measures one setting in this process.
pub fn measure(
    batch: i64,
    precision: Precision,
    device: Device,
    args: &BenchArgs,
) -> Result<Measurement> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(device);
    let mut model = ProbUNet::new(&vs.root(), ModelConfig::default())?;
    model.set_precision(precision);
    let mut adam = Adam::new(named_variables(&vs));
    let image = Tensor::rand([batch, 1, 128, 128], (Kind::Float, device));
    let mask = Tensor::rand([batch, 1, 128, 128], (Kind::Float, device))
        .gt(0.5)
        .to_kind(Kind::Float);
    let mut train_step = || -> Result<()> {
        let (_, values) = forward_backward(&model, &mut adam, &image, &mask)?;
        if !values.loss.is_finite() {
            bail!("non-finite loss while benchmarking");
        }
        adam.step(1e-4);
        Ok(())
    };
    for _ in 0..args.warmup {
        train_step()?;
    }
    sync(device);
    let start = Instant::now();
    for _ in 0..args.steps {
        train_step()?;
    }
    sync(device);
    let train_s = start.elapsed().as_secs_f64() / args.steps.max(1) as f64;

    let sample = || -> Result<i64> {
        let logits = tch::no_grad(|| model.sample(&image, args.samples))?;
        Ok(logits.sigmoid().gt(0.5).sum(Kind::Int64).int64_value(&[]))
    };
    sample()?;
    sync(device);
    let reps = (args.steps / 2).max(1);
    let start = Instant::now();
    for _ in 0..reps {
        sample()?;
    }
    sync(device);
    let sample_s = start.elapsed().as_secs_f64() / reps as f64;
    let (peak_mib, peak_kind) = peak_mib(device);
    Ok(Measurement {
        implementation: "probunet".into(),
        batch,
        precision: precision.to_string(),
        device: describe(device),
        train_images_per_s: batch as f64 / train_s,
        ms_per_step: 1e3 * train_s,
        samples_per_s: (batch * args.samples) as f64 / sample_s,
        peak_mib,
        peak_kind: peak_kind.into(),
        threads: tch::get_num_threads() as i64,
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

/// Runs every setting on both sides and prints the table.
pub fn run(args: &BenchArgs) -> Result<()> {
    let device = args.device.resolve()?;
    if args.one {
        let m = measure(args.batches[0], args.precisions[0], device, args)?;
        println!("{}", serde_json::to_string(&m)?);
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let torch_device = match device {
        Device::Cuda(n) => format!("cuda:{n}"),
        _ => "cpu".into(),
    };
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.out)
        .with_context(|| format!("opening {}", args.out.display()))?;
    println!(
        "{:<18} {:>5} {:>5} {:>10} {:>10} {:>11} {:>10} {:>8} {:>8} {:>8}",
        "impl",
        "batch",
        "prec",
        "train im/s",
        "ms/step",
        "samples/s",
        "peak MiB",
        "train x",
        "sample x",
        "mem x"
    );
    for &precision in &args.precisions {
        if precision == Precision::Bf16 && !device.is_cuda() {
            println!(
                "(bf16 skipped: it needs a CUDA device, this is {})",
                describe(device)
            );
            continue;
        }
        for &batch in &args.batches {
            let common = [
                "--steps".to_string(),
                args.steps.to_string(),
                "--warmup".into(),
                args.warmup.to_string(),
                "--samples".into(),
                args.samples.to_string(),
            ];
            let ours = Command::new(&exe)
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
            let ours: Measurement = last_json_line(ours, "probunet bench --one")?;
            let mut rows = vec![ours.clone()];
            if !args.no_torch {
                let variants: &[bool] = if args.compile {
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
            }
            for row in &rows {
                let ratio = |a: f64, b: f64| {
                    if row.implementation == "probunet" {
                        String::from("-")
                    } else {
                        format!("{:.2}", a / b)
                    }
                };
                let mem = match (ours.peak_mib, row.peak_mib) {
                    (Some(a), Some(b)) if row.implementation != "probunet" => {
                        format!("{:.2}", a / b)
                    }
                    _ => "-".into(),
                };
                println!(
                    "{:<18} {:>5} {:>5} {:>10.1} {:>10.1} {:>11.1} {:>10} {:>8} {:>8} {:>8}",
                    row.implementation,
                    row.batch,
                    row.precision,
                    row.train_images_per_s,
                    row.ms_per_step,
                    row.samples_per_s,
                    row.peak_mib.map_or("-".into(), |p| format!("{p:.0}")),
                    ratio(ours.train_images_per_s, row.train_images_per_s),
                    ratio(ours.samples_per_s, row.samples_per_s),
                    mem,
                );
                let mut line = serde_json::to_value(row)?;
                line["date"] = serde_json::json!(chrono::Utc::now().to_rfc3339());
                writeln!(out, "{line}")?;
            }
        }
    }
    println!("ratios are probunet / that row (x > 1: probunet faster; mem x < 1: probunet smaller); JSON lines in {}", args.out.display());
    Ok(())
}

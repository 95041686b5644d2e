//! `probunet bench`: the table of [`probunet::bench::race`], a row per implementation and
//! setting with probunet's speed and memory ratios; and `bench --one`, the child process
//! that measures one setting.
use anyhow::Result;
use probunet::bench::{self, BenchOptions, Measurement, Progress};
use probunet::device::{describe, DeviceSpec, Precision};
use std::path::PathBuf;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Batch sizes, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "5,32,128",
        value_parser = positive
    )]
    batches: Vec<i64>,
    /// Precisions, comma separated (bf16 only on CUDA).
    #[arg(long, value_delimiter = ',', default_value = "fp32,bf16")]
    precisions: Vec<Precision>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: DeviceSpec,
    /// Timed training steps per setting (after the warm-up).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=10_000))]
    steps: u16,
    /// Untimed training steps per setting before the timed ones, which would otherwise
    /// pay for allocation and kernel selection.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(0..=1_000))]
    warmup: u16,
    /// Prior samples per image in the sampling measurement.
    #[arg(long, default_value_t = 16, value_parser = positive)]
    samples: i64,
    /// Also race PyTorch with torch.compile.
    #[arg(long)]
    compile: bool,
    /// Skip the PyTorch side.
    #[arg(long)]
    no_torch: bool,
    /// Race each setting this many times, the sides alternating within each round, and
    /// end with each side's median over the rounds: on a shared machine one round's
    /// ratios move with whatever else runs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=100))]
    rounds: u16,
    /// JSON lines are appended here.
    #[arg(long, default_value = "bench.jsonl")]
    out: PathBuf,
    /// Measure one setting (the first batch and precision) in this process and print it
    /// as JSON; the parent runs each setting this way, so peak memory is that setting's.
    #[arg(long, hide = true)]
    one: bool,
}

/// A count of at least one; how large one memory holds is checked before it is allocated.
fn positive(text: &str) -> Result<i64, String> {
    match text.parse::<i64>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("must be at least 1".into()),
        Err(e) => Err(e.to_string()),
    }
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let options = BenchOptions {
        batches: args.batches.clone(),
        precisions: args.precisions.clone(),
        device: args.device,
        steps: args.steps.into(),
        warmup: args.warmup.into(),
        samples: args.samples,
        compile: args.compile,
        no_torch: args.no_torch,
        rounds: args.rounds.into(),
        out: args.out.clone(),
    };
    if args.one {
        let device = args.device.resolve()?;
        let m = bench::measure(args.batches[0], args.precisions[0], device, &options)?;
        println!("{}", serde_json::to_string(&m)?);
        return Ok(());
    }
    // The header waits for the first result, so that a device or file error comes alone.
    let mut header = true;
    let rows = bench::race(&options, |progress| {
        if std::mem::take(&mut header) {
            print_header();
        }
        match progress {
            Progress::Skipped { precision, device } => println!(
                "({precision} skipped: it needs a CUDA device, this is {})",
                describe(device)
            ),
            Progress::Measured(rows) => rows.iter().for_each(|row| print_row(&rows[0], row)),
        }
    })?;
    if args.rounds > 1 {
        println!("median of {} rounds:", args.rounds);
        print_header();
        let medians = bench::medians(&rows);
        for row in &medians {
            if let Some(ours) = medians.iter().find(|m| {
                m.implementation == "probunet"
                    && (m.batch, &m.precision) == (row.batch, &row.precision)
            }) {
                print_row(ours, row);
            }
        }
    }
    let mut isas: Vec<String> = rows
        .iter()
        .map(|r| format!("{} {}", r.implementation, r.cpu.as_deref().unwrap_or("?")))
        .collect();
    isas.sort();
    isas.dedup();
    if !isas.is_empty() {
        println!("CPU vector ISA in use: {}", isas.join(", "));
    }
    if let Some(layout) = rows.iter().find_map(|r| r.layout.as_deref()) {
        println!(
            "probunet's activation layout: {layout} (PROBUNET_CPU_LAYOUT changes it on the CPU)"
        );
    }
    println!("ratios are probunet / that row (x > 1: probunet faster; mem x < 1: probunet smaller); JSON lines in {}", args.out.display());
    Ok(())
}

fn print_header() {
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
}

/// A row with probunet's speed and memory over its own (`-` on probunet's own row).
fn print_row(ours: &Measurement, row: &Measurement) {
    let theirs = row.implementation != "probunet";
    let ratio = |a: f64, b: f64| {
        if theirs {
            format!("{:.2}", a / b)
        } else {
            String::from("-")
        }
    };
    let mem = match (ours.peak_mib, row.peak_mib) {
        (Some(a), Some(b)) if theirs => format!("{:.2}", a / b),
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
}

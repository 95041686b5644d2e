//! `probunet bench-eval`: a line per run of [`probunet::eval::bench::race`] (or a JSON
//! line, `--json`), then the best of each side; and `bench-eval --one`, the child process
//! that measures probunet once.
use anyhow::Result;
use probunet::device::DeviceSpec;
use probunet::eval::bench::{self, BenchEvalOptions, BenchReport, Race};
use std::path::PathBuf;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchEvalArgs {
    /// Images timed, after one untimed warm-up batch.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=10_000))]
    images: u16,
    /// Height and width of the synthetic images.
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Samples per image.
    #[arg(long, default_value_t = 100)]
    samples: usize,
    /// Images per forward pass.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: DeviceSpec,
    /// The model's filters per level [default: the seed's 32,64,128,192].
    #[arg(long, value_delimiter = ',')]
    filters: Option<Vec<i64>>,
    /// Latent dimensions of the model.
    #[arg(long, default_value_t = 2)]
    latent_dim: i64,
    /// Seed of the weights, the images and the noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Runs of each side, alternating, so that load from other processes hits both alike.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=100))]
    repeats: u16,
    /// Skip the PyTorch side.
    #[arg(long)]
    no_torch: bool,
    /// Print every run as a JSON line instead of the table.
    #[arg(long)]
    json: bool,
    /// Measure probunet once in this process, export its inputs to --export and print
    /// the result as JSON; the parent runs each probunet measurement this way.
    #[arg(long, hide = true)]
    one: bool,
    /// The folder --one exports its weights, images, masks and noise to.
    #[arg(long, hide = true, requires = "one")]
    export: Option<PathBuf>,
}

pub fn run(args: &BenchEvalArgs) -> Result<()> {
    let options = BenchEvalOptions {
        images: args.images.into(),
        size: args.size,
        samples: args.samples,
        batch: args.batch,
        device: args.device,
        filters: args.filters.clone(),
        latent_dim: args.latent_dim,
        seed: args.seed,
        repeats: args.repeats.into(),
        no_torch: args.no_torch,
    };
    if args.one {
        let report = bench::measure(&options, args.export.as_deref())?;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let race = bench::race(&options, |run| print_run(args.json, run))?;
    if args.json {
        return Ok(());
    }
    print_best(args, &race);
    race.check_same_samples()
}

fn print_run(json: bool, r: &BenchReport) {
    if json {
        #[expect(clippy::expect_used, reason = "a report of strings and numbers")]
        let line = serde_json::to_string(r).expect("a report serialises");
        println!("{line}");
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

/// The best run of each side, and probunet's speed over PyTorch's.
fn print_best(args: &BenchEvalArgs, race: &Race) {
    println!(
        "\neval throughput at {} samples per image: {} synthetic {}x{} images, batch {}, best of {}",
        args.samples, args.images, args.size, args.size, args.batch, args.repeats
    );
    println!(
        "{:<10} {:<18} {:>9} {:>10} {:>8} {:>9} {:>10} {:>10}",
        "impl", "device", "images/s", "device s", "host s", "peak MiB", "mean GED", "diversity"
    );
    let Some(ours) = race.best("probunet") else {
        return;
    };
    let theirs = race.best("pytorch");
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
    }
}

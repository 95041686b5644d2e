//! `probunet eval`: a run's metrics at each sample count, as a table with 95% intervals.
use super::trained::TrainedArgs;
use anyhow::{Context, Result};
use probunet::data::split::SplitName;
use probunet::eval::report::{find_summary, Summaries};
use probunet::eval::{self as evaluation, EvalOptions, EvalOutcome};
use probunet::metrics::EmptyConvention;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    trained: TrainedArgs,
    /// The split of the run's store to evaluate: train, val or test.
    #[arg(long, default_value = "test")]
    split: SplitName,
    /// Samples per image; one set of results each (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "16,100")]
    samples: Vec<usize>,
    /// Images per forward pass (memory grows with batch x samples).
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Seed of the sampling noise and of the bootstrap.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Evaluate on this store instead of the run's own.
    #[arg(long)]
    store: Option<PathBuf>,
    /// Bootstrap resamples for the 95% intervals.
    #[arg(long, default_value_t = probunet::eval::command::DEFAULT_BOOTSTRAP)]
    bootstrap: usize,
    /// Decode the prior's mean for every sample instead of drawing z: the one most likely
    /// mask per image, as a deterministic U-Net predicts (a baseline's readout).
    #[arg(long)]
    deterministic: bool,
}

/// A sweep folder is not a run: name its trials, which are.
fn refuse_sweep_folder(folder: &std::path::Path) -> Result<()> {
    if !folder.join(probunet::sweep::plan::PLAN_FILE).is_file() {
        return Ok(());
    }
    let mut trials: Vec<String> = std::fs::read_dir(folder)
        .with_context(|| folder.display().to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(probunet::run::SPEC_FILE).is_file())
        .map(|p| p.display().to_string())
        .collect();
    trials.sort();
    anyhow::bail!(
        "{} is a sweep folder, not a run: evaluate one of its trials ({}), or compare them \
         with `probunet runs {}`",
        folder.display(),
        if trials.is_empty() {
            "none has started".into()
        } else {
            trials.join(", ")
        },
        folder
            .parent()
            .map_or(".".into(), |p| p.display().to_string())
    )
}

pub fn run(args: EvalArgs) -> Result<()> {
    refuse_sweep_folder(&args.trained.run)?;
    let options = EvalOptions {
        run: args.trained.run,
        split: args.split,
        samples: args.samples,
        checkpoint: args.trained.checkpoint,
        device: args.trained.device,
        batch: args.batch,
        seed: args.seed,
        store: args.store,
        bootstrap: args.bootstrap,
        deterministic: args.deterministic,
    };
    let outcome = evaluation::evaluate(&options, &mut |p| {
        eprintln!(
            "eval {}: {}/{} images ({:.1} images/s at {} samples)",
            p.split,
            p.done,
            p.total,
            p.done as f64 / p.seconds.max(1e-9),
            p.samples
        )
    })?;
    print_outcome(&outcome);
    Ok(())
}

fn print_outcome(outcome: &EvalOutcome) {
    for note in &outcome.notes {
        println!("note: {note}");
    }
    let step = outcome
        .step
        .map(|s| format!(" (step {s})"))
        .unwrap_or_default();
    println!(
        "{} images of the {} split, checkpoint {}{step}, on {}, in {:.1} s",
        outcome.items,
        outcome.split,
        outcome.checkpoint.display(),
        outcome.device,
        outcome.seconds
    );
    print_table(outcome);
    if outcome.reports.iter().any(|r| r.ideal.is_some()) {
        println!("ideal: the true readers' fresh draws as samples, scored the same way");
    } else if let Some((ged, samples)) = outcome.ideal_ged {
        println!("ideal-model GED of this synthetic split: {ged:.4} (at {samples} samples)");
    }
    if let Some(first) = outcome.reports.first() {
        let folder = first.json.parent().unwrap_or(&outcome.run);
        println!(
            "wrote {}/{}-<n>.json, .csv and best/median/worst .png; view them with: tensorboard --logdir {}",
            folder.display(),
            outcome.split,
            folder.display()
        );
    }
}

/// A row per sample count: GED under both empty-mask conventions with its interval, then
/// the other metrics' means (PHiSeg convention); on a synthetic store, the ideal model's
/// row follows each.
fn print_table(outcome: &EvalOutcome) {
    println!(
        "{:>9}  {:<26} {:<26} {:>8} {:>9} {:>8} {:>10}",
        "samples",
        "GED (phiseg) [95% CI]",
        "GED (kohl-nan) [95% CI]",
        "HM-IoU",
        "diversity",
        "NCC",
        "mean-pred"
    );
    for report in &outcome.reports {
        print_row(&report.samples.to_string(), &report.summaries);
        if let Some(ideal) = &report.ideal {
            print_row(&format!("{} ideal", report.samples), ideal);
        }
    }
}

fn print_row(label: &str, summaries: &Summaries) {
    let cell = |convention, metric| {
        find_summary(summaries, convention, metric)
            .map(|s| format!("{:.4} [{:.4}, {:.4}]", s.mean, s.ci_low, s.ci_high))
            .unwrap_or_default()
    };
    let mean = |metric| {
        find_summary(summaries, EmptyConvention::PhiSeg, metric).map_or(f64::NAN, |s| s.mean)
    };
    println!(
        "{:>9}  {:<26} {:<26} {:>8.4} {:>9.4} {:>8.4} {:>10.4}",
        label,
        cell(EmptyConvention::PhiSeg, "ged"),
        cell(EmptyConvention::KohlNan, "ged"),
        mean("hm_iou"),
        mean("diversity"),
        mean("ncc"),
        mean("mean_pred_iou"),
    );
}

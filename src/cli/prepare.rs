//! `probunet prepare`: a pickle (or the synthetic generator) into a dataset store.
use anyhow::Result;
use probunet::data::prepare::{self as prep, Outcome, PrepareOptions};
use probunet::data::split::SplitFractions;
use probunet::data::synthetic::SyntheticConfig;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct PrepareArgs {
    /// The pickle file, or a folder whose *.pickle files are merged.
    #[arg(required_unless_present = "synthetic")]
    input: Option<PathBuf>,
    /// Generate the built-in synthetic ambiguous dataset instead of reading a pickle.
    #[arg(long, conflicts_with = "input")]
    synthetic: bool,
    /// The store folder [default: data/<input stem>, or data/synthetic].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Rebuild even if the store already exists.
    #[arg(long)]
    force: bool,
    /// Masks per item that the pickle must hold.
    #[arg(long, default_value_t = 4)]
    annotators: usize,
    /// Percentages of patients for train, val and test.
    #[arg(long, default_value = "80,10,10")]
    split: SplitFractions,
    /// Seed of the patient-level split.
    #[arg(long, default_value_t = 0)]
    split_seed: u64,
    /// Synthetic: number of items.
    #[arg(long, default_value_t = SyntheticConfig::default().items, requires = "synthetic")]
    items: usize,
    /// Synthetic: image height and width (a multiple of 8).
    #[arg(long, default_value_t = SyntheticConfig::default().size, requires = "synthetic")]
    size: usize,
    /// Synthetic: generator seed.
    #[arg(long, default_value_t = 0, requires = "synthetic")]
    seed: u64,
}

/// The store folder: `--out`, else `data/<input stem>`, or `data/synthetic`.
fn store_folder(args: &PrepareArgs) -> Result<PathBuf> {
    Ok(match (&args.out, &args.input) {
        (Some(out), _) => out.clone(),
        (None, Some(input)) => {
            let stem = input
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            anyhow::ensure!(
                !stem.is_empty(),
                "cannot name a store after {}: pass --out",
                input.display()
            );
            PathBuf::from("data").join(stem)
        }
        (None, None) => PathBuf::from("data/synthetic"),
    })
}

pub fn run(args: PrepareArgs) -> Result<()> {
    let options = PrepareOptions {
        out: store_folder(&args)?,
        force: args.force,
        split: args.split,
        split_seed: args.split_seed,
    };
    let outcome = match &args.input {
        Some(input) => prep::prepare_pickle(input, args.annotators, &options)?,
        None => {
            let config = SyntheticConfig {
                items: args.items,
                size: args.size,
                annotators: args.annotators,
                seed: args.seed,
            };
            prep::prepare_synthetic(config, &options)?
        }
    };
    match outcome {
        Outcome::Prepared(summary) => println!("{summary}"),
        Outcome::AlreadyPrepared(dir) => {
            println!(
                "{} is already prepared from this input; nothing to do (--force rebuilds it)",
                dir.display()
            )
        }
    }
    Ok(())
}

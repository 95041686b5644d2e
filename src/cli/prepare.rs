//! `probunet prepare`: a pickle, your own PNGs (a folder layout or a CSV), or the
//! synthetic generator into a dataset store.
use anyhow::Result;
use probunet::data::images::Missing;
use probunet::data::prepare::{self as prep, Outcome, PrepareOptions};
use probunet::data::split::SplitFractions;
use probunet::data::synthetic::SyntheticConfig;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct PrepareArgs {
    /// The pickle file, or a folder whose *.pickle files are merged; or your own data: a
    /// folder with images/<id>.png and masks/<annotator>/<id>.png, or a CSV
    /// (image,mask_0,...,mask_k[,patient], paths relative to it).
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
    /// Your own data: the patient of each image from its id (file stem), the regex's first
    /// group or its whole match; without it (and a CSV patient column) each image is its own
    /// patient.
    #[arg(long, conflicts_with = "synthetic")]
    patient_regex: Option<String>,
    /// Your own data: a missing mask is an error (`error`) or an all-background mask (`empty`).
    #[arg(
        long,
        value_enum,
        default_value = "error",
        conflicts_with = "synthetic"
    )]
    missing: MissingArg,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MissingArg {
    Error,
    Empty,
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
        Some(input) if prep::is_images_input(input) => {
            let images = prep::ImagesInput {
                path: input.clone(),
                patient_regex: args.patient_regex.clone(),
                missing: match args.missing {
                    MissingArg::Error => Missing::Error,
                    MissingArg::Empty => Missing::Empty,
                },
            };
            prep::prepare_images(&images, &options)?
        }
        Some(input) => prep::prepare_pickle(input, args.annotators, &options)?,
        None => {
            let config = SyntheticConfig {
                items: args.items,
                size: args.size,
                annotators: args.annotators,
                seed: args.seed,
            };
            let asked = format!(
                "prepare --synthetic --items {} --size {} --annotators {}",
                args.items, args.size, args.annotators
            );
            prep::prepare_synthetic(config, &options).map_err(|e| e.asked_by(&asked))?
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

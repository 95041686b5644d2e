//! `probunet predict`: a trained run's samples for new images, a line per image.
use super::trained::TrainedArgs;
use anyhow::Result;
use probunet::predict::{self, Formats, PredictEvent, PredictOptions};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct PredictArgs {
    #[command(flatten)]
    trained: TrainedArgs,
    /// Images: PNG (8- or 16-bit grey) or .npy files, folders of them, or store:SPLIT for
    /// a split of the run's own store.
    #[arg(required = true)]
    inputs: Vec<String>,
    /// Samples per image.
    #[arg(long, default_value_t = 16)]
    samples: usize,
    /// Where to write (default: RUN/predict); one folder per image, plus index.json/.csv.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Images per forward pass (memory grows with batch x samples); results do not depend on it.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Seed of the sampling noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Files besides the overview: png (masks, mean, variance), npy (float32 arrays), or both.
    #[arg(long, value_delimiter = ',', default_value = "png,npy")]
    format: Vec<Format>,
    /// Pad an image whose sides the model cannot take (with zeros) and crop the outputs back.
    #[arg(long)]
    pad: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Png,
    Npy,
}

pub fn run(args: PredictArgs) -> Result<()> {
    let options = PredictOptions {
        run: args.trained.run,
        inputs: args.inputs,
        samples: args.samples,
        out: args.out,
        checkpoint: args.trained.checkpoint,
        device: args.trained.device,
        batch: args.batch,
        seed: args.seed,
        formats: Formats {
            png: args.format.contains(&Format::Png),
            npy: args.format.contains(&Format::Npy),
        },
        pad: args.pad,
    };
    let (out, index) = predict::predict(&options, &mut |event| match event {
        PredictEvent::Started { images, checkpoint } => {
            eprintln!("predicting {images} image(s) with {}", checkpoint.display());
        }
        PredictEvent::Written {
            done,
            total,
            record,
        } => super::line(
            true,
            &format!(
                "[{done}/{total}] {} -> {}  foreground {:.1}%  mean IoU between samples {:.3}",
                record.input,
                record.output.display(),
                100.0 * record.foreground_fraction,
                record.mean_pairwise_iou
            ),
        ),
        PredictEvent::Failed {
            done,
            total,
            input,
            why,
        } => {
            eprintln!("[{done}/{total}] {input}: {why}");
        }
    })?;
    super::line(
        true,
        &format!(
            "wrote {} image(s) into {} (index.json, index.csv)",
            index.images.len(),
            out.display()
        ),
    );
    if !index.failed.is_empty() {
        anyhow::bail!(
            "{} of {} input(s) could not be predicted (listed above and in {})",
            index.failed.len(),
            index.failed.len() + index.images.len(),
            out.join(predict::INDEX_JSON).display()
        );
    }
    Ok(())
}

//! `probunet doctor`: what a user runs first on a new machine. It shows whether libtorch
//! sees CUDA, builds the seed's model and checks its parameter counts, and times a few
//! training steps on random data, so a broken install shows up before a long run.
use crate::device::{describe, DeviceSpec};
use crate::model::{ModelConfig, ProbUNet};
use crate::train::{forward_backward, named_variables, Adam};
use anyhow::{Context, Result};
use std::time::Instant;
use tch::{nn, Cuda, Kind, Tensor};

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// Training steps to time (0 skips the timing).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Batch size of the timed steps (the seed trains with 5).
    #[arg(long, default_value_t = 5)]
    pub batch: i64,
    /// Latent dimensions of the model that is built.
    #[arg(long, default_value_t = 2)]
    pub latent_dim: i64,
}

pub fn run(args: &DoctorArgs) -> Result<()> {
    println!("probunet {}", env!("CARGO_PKG_VERSION"));
    println!(
        "libtorch: CUDA available: {}, CUDA devices: {}, cuDNN: {}",
        Cuda::is_available(),
        Cuda::device_count(),
        Cuda::cudnn_is_available()
    );
    let device = args.device.resolve()?;
    println!("device: {}", describe(device));
    println!(
        "CPU allocator: {}",
        match crate::memory::installed() {
            Some(crate::memory::CpuAllocator::Caching { limit_bytes }) => format!(
                "probunet's caching allocator, keeping up to {} MiB of freed blocks \
                 (PROBUNET_CPU_ALLOCATOR=system for libtorch's own)",
                limit_bytes >> 20
            ),
            Some(crate::memory::CpuAllocator::System) | None => "libtorch's own".into(),
        }
    );

    let vs = nn::VarStore::new(device);
    let config = ModelConfig {
        latent_dim: args.latent_dim,
        ..ModelConfig::default()
    };
    let model = ProbUNet::new(&vs.root(), config).context("building the model")?;
    let counts = model.parameter_counts();
    println!(
        "model (latent_dim {}): U-Net {}, prior {}, posterior {}, fcomb {}, total {} parameters",
        args.latent_dim,
        counts.unet,
        counts.prior,
        counts.posterior,
        counts.fcomb,
        counts.total()
    );
    if args.steps == 0 {
        return Ok(());
    }
    anyhow::ensure!(
        args.batch > 0,
        "--batch must be positive, got {}",
        args.batch
    );
    // The trainer's own step (its Adam, its loss read-back), so the timing is training's.
    let mut adam = Adam::new(named_variables(&vs));
    let image = Tensor::rand([args.batch, 1, 128, 128], (Kind::Float, device));
    let mask = image.gt(0.5).to_kind(Kind::Float);
    let mut times = Vec::with_capacity(args.steps);
    let mut loss = f64::NAN;
    for _ in 0..args.steps {
        let start = Instant::now();
        let (_, values) = forward_backward(&model, &mut adam, &image, &mask)?;
        adam.step(1e-4);
        loss = values.loss;
        times.push(start.elapsed().as_secs_f64());
    }
    anyhow::ensure!(
        loss.is_finite(),
        "the training step gave a non-finite loss ({loss})"
    );
    // The first step pays for allocation and kernel selection; report the rest when there is one.
    let steady = if times.len() > 1 {
        &times[1..]
    } else {
        &times[..]
    };
    let ms = 1e3 * steady.iter().sum::<f64>() / steady.len() as f64;
    println!(
        "training step at batch {} on 128x128: {ms:.1} ms/step, {:.1} images/s (last loss {loss:.1})",
        args.batch,
        1e3 * args.batch as f64 / ms
    );
    Ok(())
}

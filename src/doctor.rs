//! `probunet doctor`: what a user runs first on a new machine. It shows whether libtorch
//! sees CUDA, builds the seed's model and checks its parameter counts, and times a few
//! training steps on random data, so a broken install shows up before a long run.
use crate::device::DeviceSpec;
use crate::memory::budget::Need;
use crate::memory::CpuAllocator;
use crate::model::{ModelConfig, ModelError, ProbUNet};
use crate::train::{forward_backward, named_variables, Adam};
use anyhow::{anyhow, Context, Result};
use std::time::Instant;
use tch::{nn, Cuda, Device, Kind, Tensor};

/// Height and width of the random images the timed steps train on.
const SIDE: i64 = 128;

/// What to check.
#[derive(Debug, Clone)]
pub struct DoctorOptions {
    pub device: DeviceSpec,
    /// Training steps to time; 0 skips the timing.
    pub steps: usize,
    /// Batch size of the timed steps.
    pub batch: i64,
    /// Latent dimensions of the model that is built.
    pub latent_dim: i64,
}

/// One thing [`check`] found, told as soon as it is known: when a later check fails, the
/// user still sees how far the installation got.
#[derive(Debug, Clone)]
pub enum Finding {
    Libtorch {
        /// Its version and folder, where they could be found.
        found: crate::sys::Libtorch,
        cuda_available: bool,
        cuda_devices: i64,
        cudnn_available: bool,
    },
    Device(Device),
    /// The CPU allocator this process installed, if any.
    Allocator(Option<CpuAllocator>),
    /// The model built, with its trainable parameters per part.
    Model {
        latent_dim: i64,
        unet: i64,
        prior: i64,
        posterior: i64,
        fcomb: i64,
        total: i64,
    },
    /// The mean of the timed steps after the first, which pays for allocation and kernel
    /// selection (the only one when there is one).
    Step {
        batch: i64,
        ms_per_step: f64,
        images_per_s: f64,
        last_loss: f64,
    },
}

/// Checks libtorch, the device, the model and (unless `steps` is 0) a timed training
/// step, telling `found` each finding in that order.
pub fn check(options: &DoctorOptions, mut found: impl FnMut(Finding)) -> Result<()> {
    found(Finding::Libtorch {
        found: crate::sys::libtorch(),
        cuda_available: Cuda::is_available(),
        cuda_devices: Cuda::device_count(),
        cudnn_available: Cuda::cudnn_is_available(),
    });
    let device = options.device.resolve()?;
    found(Finding::Device(device));
    found(Finding::Allocator(crate::memory::installed()));

    let (vs, model) = build(options.latent_dim, device)?;
    let counts = model.parameter_counts();
    found(Finding::Model {
        latent_dim: options.latent_dim,
        unet: counts.unet,
        prior: counts.prior,
        posterior: counts.posterior,
        fcomb: counts.fcomb,
        total: counts.total(),
    });
    if options.steps == 0 {
        return Ok(());
    }
    found(time_steps(options, &vs, &model, device)?);
    Ok(())
}

/// The seed's model with `latent_dim` latent dimensions; a `--latent-dim` it cannot be
/// built with, or whose weights memory cannot hold, is refused by that name.
fn build(latent_dim: i64, device: Device) -> Result<(nn::VarStore, ProbUNet)> {
    let config = ModelConfig {
        latent_dim,
        ..ModelConfig::default()
    };
    config.validate().map_err(|e| match e {
        ModelError::Config {
            key: "latent_dim",
            why,
        } => anyhow!("--latent-dim: {why}"),
        other => other.into(),
    })?;
    let weights = config.parameter_count().saturating_mul(4);
    Need::new(format!("doctor --latent-dim {latent_dim}"), weights).fits_memory()?;
    let vs = nn::VarStore::new(device);
    let model = ProbUNet::new(&vs.root(), config).context("building the model")?;
    Ok((vs, model))
}

/// Times `steps` of the trainer's own step (its Adam, its loss read-back), so the timing
/// is training's. A batch memory cannot hold is refused before anything is allocated.
fn time_steps(
    options: &DoctorOptions,
    vs: &nn::VarStore,
    model: &ProbUNet,
    device: Device,
) -> Result<Finding> {
    let batch = options.batch;
    anyhow::ensure!(batch > 0, "--batch must be positive, got {batch}");
    if !device.is_cuda() {
        let (batch, side) = (batch as u64, SIDE as u64);
        let part = crate::model::parts::part_images(model.config(), batch, side, side, device);
        (model.config())
            .check_training(batch, part, side, side)
            .with_context(|| format!("doctor --batch {batch}"))?;
    }
    let mut adam = Adam::new(named_variables(vs))?;
    let image = Tensor::f_rand([batch, 1, SIDE, SIDE], (Kind::Float, device))?;
    let mask = image.f_gt(0.5)?.f_to_kind(Kind::Float)?;
    // The first step pays for allocation and kernel selection: it counts only when alone.
    let (mut first, mut steady) = (0.0, 0.0);
    let mut loss = f64::NAN;
    for step in 0..options.steps {
        let start = Instant::now();
        let (_, values) = forward_backward(model, &mut adam, &image, &mask)?;
        adam.step(1e-4)?;
        loss = values.loss;
        let seconds = start.elapsed().as_secs_f64();
        if step == 0 {
            first = seconds;
        } else {
            steady += seconds;
        }
    }
    anyhow::ensure!(
        loss.is_finite(),
        "the training step gave a non-finite loss ({loss})"
    );
    let ms_per_step = match options.steps {
        1 => 1e3 * first,
        n => 1e3 * steady / (n - 1) as f64,
    };
    Ok(Finding::Step {
        batch,
        ms_per_step,
        images_per_s: 1e3 * batch as f64 / ms_per_step,
        last_loss: loss,
    })
}

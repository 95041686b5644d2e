//! `probunet doctor`: what a user runs first on a new machine. It shows whether libtorch
//! sees CUDA, builds the seed's model and checks its parameter counts, and times a few
//! training steps on random data, so a broken install shows up before a long run.
use crate::device::DeviceSpec;
use crate::memory::CpuAllocator;
use crate::model::{ModelConfig, ProbUNet};
use crate::train::{forward_backward, named_variables, Adam};
use anyhow::{Context, Result};
use std::time::Instant;
use tch::{nn, Cuda, Device, Kind, Tensor};

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

    let vs = nn::VarStore::new(device);
    let config = ModelConfig {
        latent_dim: options.latent_dim,
        ..ModelConfig::default()
    };
    let model = ProbUNet::new(&vs.root(), config).context("building the model")?;
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

/// Times `steps` of the trainer's own step (its Adam, its loss read-back), so the timing
/// is training's.
fn time_steps(
    options: &DoctorOptions,
    vs: &nn::VarStore,
    model: &ProbUNet,
    device: Device,
) -> Result<Finding> {
    anyhow::ensure!(
        options.batch > 0,
        "--batch must be positive, got {}",
        options.batch
    );
    let mut adam = Adam::new(named_variables(vs))?;
    let image = Tensor::f_rand([options.batch, 1, 128, 128], (Kind::Float, device))?;
    let mask = image.f_gt(0.5)?.f_to_kind(Kind::Float)?;
    let mut times = Vec::with_capacity(options.steps);
    let mut loss = f64::NAN;
    for _ in 0..options.steps {
        let start = Instant::now();
        let (_, values) = forward_backward(model, &mut adam, &image, &mask)?;
        adam.step(1e-4)?;
        loss = values.loss;
        times.push(start.elapsed().as_secs_f64());
    }
    anyhow::ensure!(
        loss.is_finite(),
        "the training step gave a non-finite loss ({loss})"
    );
    let steady = if times.len() > 1 {
        &times[1..]
    } else {
        &times[..]
    };
    let ms_per_step = 1e3 * steady.iter().sum::<f64>() / steady.len() as f64;
    Ok(Finding::Step {
        batch: options.batch,
        ms_per_step,
        images_per_s: 1e3 * options.batch as f64 / ms_per_step,
        last_loss: loss,
    })
}

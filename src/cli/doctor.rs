//! `probunet doctor`: a line per finding of [`probunet::doctor::check`], printed as it
//! comes, so a failing check shows after what worked.
use anyhow::Result;
use probunet::device::{describe, DeviceSpec};
use probunet::doctor::{self, DoctorOptions, Finding};
use probunet::memory::CpuAllocator;

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: DeviceSpec,
    /// Training steps to time (0 skips the timing).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(0..=10_000))]
    steps: u16,
    /// Batch size of the timed steps (the seed trains with 5).
    #[arg(long, default_value_t = 5)]
    batch: i64,
    /// Latent dimensions of the model that is built.
    #[arg(long, default_value_t = 2)]
    latent_dim: i64,
}

pub fn run(args: &DoctorArgs) -> Result<()> {
    println!("probunet {}", env!("CARGO_PKG_VERSION"));
    let options = DoctorOptions {
        device: args.device,
        steps: args.steps.into(),
        batch: args.batch,
        latent_dim: args.latent_dim,
    };
    doctor::check(&options, |finding| println!("{}", line(finding)))
}

fn line(finding: Finding) -> String {
    match finding {
        Finding::Libtorch {
            found,
            cuda_available,
            cuda_devices,
            cudnn_available,
        } => format!(
            "libtorch {} from {}: CUDA available: {cuda_available}, CUDA devices: \
             {cuda_devices}, cuDNN: {cudnn_available}",
            found.version.as_deref().unwrap_or("(version unknown)"),
            found
                .lib_dir
                .as_ref()
                .map_or("(folder unknown)".into(), |d| d.display().to_string()),
        ),
        Finding::Device(device) => format!("device: {}", describe(device)),
        Finding::Allocator(allocator) => format!(
            "CPU allocator: {}",
            match allocator {
                Some(CpuAllocator::Caching { limit_bytes }) => format!(
                    "probunet's caching allocator, keeping up to {} MiB of freed blocks \
                     (PROBUNET_CPU_ALLOCATOR=system for libtorch's own)",
                    limit_bytes >> 20
                ),
                Some(CpuAllocator::System) | None => "libtorch's own".into(),
            }
        ),
        Finding::Model {
            latent_dim,
            unet,
            prior,
            posterior,
            fcomb,
            total,
        } => format!(
            "model (latent_dim {latent_dim}): U-Net {unet}, prior {prior}, posterior {posterior}, \
             fcomb {fcomb}, total {total} parameters"
        ),
        Finding::Step {
            batch,
            ms_per_step,
            images_per_s,
            last_loss,
        } => format!(
            "training step at batch {batch} on 128x128: {ms_per_step:.1} ms/step, \
             {images_per_s:.1} images/s (last loss {last_loss:.1})"
        ),
    }
}

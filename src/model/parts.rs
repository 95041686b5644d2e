//! Training and sampling a batch in parts on the CPU.
//!
//! On the CPU a step costs more per image as a layer's activations outgrow the cache: on a
//! 2-core AMD EPYC with AVX-512 (docs/performance.md, 2026-12-02), batch 32 took 3.3 s a
//! step in parts of 2 images, 3.6-4.3 in parts of 4, 4.9-5.1 in parts of 5 and 8.2-10.3
//! whole; batch 5 took 542-548 ms in parts of 2 against 605-670 whole. Sampling batch 32
//! (prior and U-Net per part, fcomb per sample) drew 543 samples/s in parts of 2 against
//! 273 whole, at 812 against 2,781 MiB; at batch 5 the two could not be told apart.
//! Nothing in the model couples the images of a batch (no batch norm), so a batch can go
//! through forward and backward in parts of a few images, each part's gradients added
//! into the same buffers before the one optimiser step: the same update up to the order
//! of float sums, at the speed and the memory of the small part; sampling draws every
//! latent before the parts, so a sample does not depend on them. On a GPU large batches
//! are what it is fast at, so a batch there goes through whole.
//!
//! `PROBUNET_CPU_PART=N` sets the most images per part (to compare); unset or `auto`
//! sizes parts by [`PART_BYTES`].
use super::ModelConfig;
use std::sync::OnceLock;
use tch::Device;

/// About how many bytes one activation of the first (largest) level may take in a part:
/// two images at the default 32 filters and 128x128, the fastest part measured.
pub const PART_BYTES: u64 = 4 << 20;

/// What `PROBUNET_CPU_PART` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartSize {
    /// Sized by [`PART_BYTES`].
    Auto,
    /// At most this many images per part.
    Images(u64),
}

/// Reads `PROBUNET_CPU_PART`; a value that cannot be read is an error naming it.
pub fn from_env() -> Result<PartSize, String> {
    choose(std::env::var("PROBUNET_CPU_PART").ok().as_deref())
}

fn choose(value: Option<&str>) -> Result<PartSize, String> {
    match value {
        None | Some("auto") => Ok(PartSize::Auto),
        Some(n) => match n.parse::<u64>() {
            Ok(images) if images >= 1 => Ok(PartSize::Images(images)),
            _ => Err(format!(
                "PROBUNET_CPU_PART={n:?}: expected \"auto\" or a number of images \
                 (at least 1)"
            )),
        },
    }
}

static INSTALLED: OnceLock<PartSize> = OnceLock::new();

/// Makes `choice` the part size of every CPU training step and sampling pass from now on. The first call
/// decides; later calls return what it chose.
pub fn install(choice: PartSize) -> PartSize {
    *INSTALLED.get_or_init(|| choice)
}

/// The most images a part holds for `config` on `height` x `width` images on
/// `device`: the whole batch on a GPU.
pub fn part_images(
    config: &ModelConfig,
    batch: u64,
    height: u64,
    width: u64,
    device: Device,
) -> u64 {
    if device != Device::Cpu {
        return batch.max(1);
    }
    let choice = INSTALLED.get().copied().unwrap_or(PartSize::Auto);
    resolve(choice, config, height, width).clamp(1, batch.max(1))
}

fn resolve(choice: PartSize, config: &ModelConfig, height: u64, width: u64) -> u64 {
    match choice {
        PartSize::Images(images) => images,
        PartSize::Auto => {
            let first = config.filters.first().copied().unwrap_or(1).max(1) as u64;
            let bytes = first
                .saturating_mul(height)
                .saturating_mul(width)
                .saturating_mul(4);
            PART_BYTES / bytes.max(1)
        }
    }
}

/// `batch` images split into `ceil(batch / most)` parts whose sizes differ by at most
/// one, as `(first image, images)`.
pub fn split(batch: i64, most: i64) -> Vec<(i64, i64)> {
    let parts = (batch + most.max(1) - 1) / most.max(1);
    let parts = parts.max(1);
    let (base, extra) = (batch / parts, batch % parts);
    let mut first = 0;
    (0..parts)
        .map(|i| {
            let images = base + i64::from(i < extra);
            let part = (first, images);
            first += images;
            part
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_names_a_part_size_or_is_refused() {
        assert_eq!(choose(None), Ok(PartSize::Auto));
        assert_eq!(choose(Some("auto")), Ok(PartSize::Auto));
        assert_eq!(choose(Some("4")), Ok(PartSize::Images(4)));
        for bad in ["0", "-1", "four", ""] {
            let err = choose(Some(bad)).unwrap_err();
            assert!(err.contains(&format!("PROBUNET_CPU_PART={bad:?}")), "{err}");
        }
    }

    #[test]
    fn parts_cover_the_batch_once_in_order_and_differ_by_at_most_one() {
        assert_eq!(
            split(32, 6),
            [(0, 6), (6, 6), (12, 5), (17, 5), (22, 5), (27, 5)]
        );
        for (batch, most) in [(1, 1), (5, 5), (5, 2), (32, 6), (32, 5), (128, 6), (7, 100)] {
            let parts = split(batch, most);
            let mut next = 0;
            for &(first, images) in &parts {
                assert_eq!(first, next);
                assert!(images >= 1 && images <= most);
                next += images;
            }
            assert_eq!(next, batch);
            let sizes: Vec<i64> = parts.iter().map(|p| p.1).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
            assert_eq!(parts.len() as i64, (batch + most - 1) / most);
        }
    }

    #[test]
    fn parts_hold_a_few_mib_of_first_level_activations() {
        let config = ModelConfig::default();
        // 32 filters at 128x128: 2 MiB per image.
        assert_eq!(resolve(PartSize::Auto, &config, 128, 128), 2);
        // The quickstart's 16 filters at 64x64 (256 KiB): its batches of 16 go through whole.
        let quickstart = ModelConfig {
            filters: vec![16, 32, 64, 96],
            ..ModelConfig::default()
        };
        assert_eq!(part_images(&quickstart, 16, 64, 64, Device::Cpu), 16);
        assert_eq!(resolve(PartSize::Images(3), &config, 128, 128), 3);
        assert_eq!(part_images(&config, 32, 128, 128, Device::Cuda(0)), 32);
    }
}

//! Seeds and random streams, in one place so that every reproducible draw in probunet
//! (the synthetic dataset, the loader's order, each training step, the sampling noise of
//! validation and eval) is derived the same way from a user's seed.
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

/// The 64-bit golden ratio, splitmix64's increment.
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// libtorch's stream of a training step's randomness (z from the posterior, dropout-free
/// but kept apart from validation's).
pub const STREAM_TRAIN: u64 = 1;
/// libtorch's stream of a validation's ELBO (z from the posterior).
pub const STREAM_VALIDATION: u64 = 2;
/// The stream of the sampling noise of validation and eval: one per store item.
pub const STREAM_SAMPLING: u64 = 16;

/// splitmix64: decorrelates nearby inputs into unrelated 64-bit values.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(GOLDEN);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The RNG of one (seed, stream, index): independent of every other triple, so each item
/// (or each evaluated image) has its own reproducible randomness.
pub fn rng(seed: u64, stream: u64, index: u64) -> Pcg64 {
    Pcg64::seed_from_u64(mix(mix(seed ^ mix(stream)) ^ index))
}

/// A standard normal draw (Box-Muller).
pub fn normal(rng: &mut Pcg64) -> f64 {
    let u: f64 = rng.gen_range(f64::EPSILON..1.0);
    let v: f64 = rng.gen();
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// The libtorch seed of one training step: reseeding from (seed, step) at every step is
/// what lets a resumed run continue exactly as the uninterrupted one.
pub fn step_seed(seed: u64, step: u64, stream: u64) -> i64 {
    let x = seed ^ step.wrapping_mul(GOLDEN) ^ stream.wrapping_mul(0xd1b5_4a32_d192_ed03);
    (mix(x.wrapping_sub(GOLDEN)) >> 1) as i64
}

/// The latent noise of one store item: `samples * latent_dim` standard-normal values from
/// the item's own RNG, row-major `[samples, latent_dim]`. It depends on nothing else, so
/// an image gets the same samples whatever the batch size, device or order, and the first
/// `n` of `N` samples are the samples drawn with `n`.
pub fn item_noise(seed: u64, item: usize, samples: usize, latent_dim: usize) -> Vec<f32> {
    let mut rng = rng(seed, STREAM_SAMPLING, item as u64);
    (0..samples * latent_dim)
        .map(|_| normal(&mut rng) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The formula training used before the seed module, kept to pin that moving it here
    /// changed no run's randomness.
    fn step_seed_before(seed: u64, step: u64, stream: u64) -> i64 {
        let mut x = seed ^ step.wrapping_mul(GOLDEN) ^ stream.wrapping_mul(0xd1b5_4a32_d192_ed03);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((x ^ (x >> 31)) >> 1) as i64
    }

    #[test]
    fn step_seeds_are_what_training_always_drew() {
        for seed in [0, 1, 42, u64::MAX] {
            for step in [0, 1, 199, 1 << 40] {
                for stream in [0, 1, 2] {
                    assert_eq!(
                        step_seed(seed, step, stream),
                        step_seed_before(seed, step, stream)
                    );
                }
            }
        }
    }

    #[test]
    fn item_noise_prefixes_are_the_smaller_draws() {
        let big = item_noise(3, 7, 10, 6);
        assert_eq!(&big[..4 * 6], &item_noise(3, 7, 4, 6)[..]);
        assert_ne!(item_noise(3, 8, 4, 6), item_noise(3, 7, 4, 6));
    }
}

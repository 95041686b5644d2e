//! How much memory a model asks for, computed from its config before any tensor exists,
//! so that a typo such as `filters = [8, 100000000]` is refused with its size instead of
//! aborting inside libtorch.

use super::unet::CONVS_PER_BLOCK;
use super::ModelConfig;
use crate::memory::budget::{product, Need, TooLarge};

const FLOAT: u128 = 4;

/// Weights and biases of one `kernel` x `kernel` convolution.
fn conv(c_in: i64, c_out: i64, kernel: i64) -> u128 {
    let (c_in, c_out, kernel) = (c_in as u64, c_out as u64, kernel as u64);
    product(&[c_in, c_out, kernel, kernel]).saturating_add(u128::from(c_out))
}

/// A down or up block: three 3x3 convolutions, the first changing the channel count.
fn block(c_in: i64, c_out: i64) -> u128 {
    let rest = conv(c_out, c_out, 3).saturating_mul((CONVS_PER_BLOCK - 1) as u128);
    conv(c_in, c_out, 3).saturating_add(rest)
}

fn encoder(input_channels: i64, filters: &[i64]) -> u128 {
    let inputs = std::iter::once(input_channels).chain(filters.iter().copied());
    inputs.zip(filters).fold(0u128, |sum, (c_in, &c_out)| {
        sum.saturating_add(block(c_in, c_out))
    })
}

/// Pixels of each level for an input of `height` x `width`: every level but the first
/// halves both sides.
fn level_pixels(levels: usize, height: u64, width: u64) -> impl Iterator<Item = u128> {
    (0..levels.min(64)).map(move |i| product(&[height >> i, width >> i]))
}

impl ModelConfig {
    /// Trainable parameters, counted the way the layers create them.
    pub fn parameter_count(&self) -> u128 {
        let f = &self.filters;
        let (Some(&first), Some(&last)) = (f.first(), f.last()) else {
            return 0;
        };
        let up = f
            .windows(2)
            .fold(0u128, |sum, w| sum.saturating_add(block(w[1] + w[0], w[0])));
        let gaussian = |c_in| encoder(c_in, f).saturating_add(conv(last, 2 * self.latent_dim, 1));
        let hidden = (self.fcomb_convs.saturating_sub(2)) as u128;
        let fcomb = conv(first + self.latent_dim, first, 1)
            .saturating_add(conv(first, first, 1).saturating_mul(hidden))
            .saturating_add(conv(first, self.num_classes, 1));
        [
            encoder(self.input_channels, f),
            up,
            gaussian(self.input_channels),
            gaussian(self.input_channels + self.num_classes),
            fcomb,
        ]
        .into_iter()
        .fold(0u128, u128::saturating_add)
    }

    /// Activations one image keeps for the backward pass: each convolution's output in the
    /// U-Net (down and up), both encoders and fcomb.
    fn activations_per_image(&self, height: u64, width: u64) -> u128 {
        let f = &self.filters;
        let convs = CONVS_PER_BLOCK as u128;
        let down: u128 = level_pixels(f.len(), height, width)
            .zip(f)
            .map(|(pixels, &c)| pixels.saturating_mul(c as u128 * convs))
            .fold(0, u128::saturating_add);
        let first = f.first().copied().unwrap_or(1) as u64;
        let fcomb = product(&[height, width, first, self.fcomb_convs as u64]);
        // The U-Net's up path roughly repeats its down path; prior and posterior add two more.
        down.saturating_mul(4).saturating_add(fcomb)
    }

    /// What building the model needs: its weights.
    pub fn check_weights(&self) -> Result<(), TooLarge> {
        Need::new(
            format!("model.filters = {:?}", self.filters),
            self.parameter_count().saturating_mul(FLOAT),
        )
        .fits_memory()
    }

    /// What training needs: weights, gradients and Adam's two moments, the batch's images
    /// and masks, and twice the activations of the `part` images that go through forward
    /// and backward together (the forward pass keeps them, the backward pass adds as many
    /// gradients).
    pub fn check_training(
        &self,
        batch: u64,
        part: u64,
        height: u64,
        width: u64,
    ) -> Result<(), TooLarge> {
        let state = self.parameter_count().saturating_mul(4 * FLOAT);
        let inputs = product(&[batch, height, width, 2]).saturating_mul(FLOAT);
        let activations = self
            .activations_per_image(height, width)
            .saturating_mul(u128::from(part.min(batch)))
            .saturating_mul(2 * FLOAT);
        Need::new(
            format!(
                "training model.filters = {:?}, model.latent_dim = {} on batches of \
                 {batch} images of {height}x{width}",
                self.filters, self.latent_dim
            ),
            state.saturating_add(inputs).saturating_add(activations),
        )
        .fits_memory()
    }
}

impl ModelConfig {
    /// What drawing `samples` samples of each of `batch` images holds at once: per sample
    /// pixel its logits, twice (fcomb's chunks and their concatenation), and a float for
    /// the probabilities or a reference draw; per image pixel the U-Net features and
    /// fcomb's feature part; and two of fcomb's chunks of activations. `what` names the
    /// flags or keys that asked.
    pub fn check_sampling(
        &self,
        what: String,
        batch: u64,
        samples: u64,
        height: u64,
        width: u64,
    ) -> Result<(), TooLarge> {
        let first = self.filters.first().copied().unwrap_or(1) as u64;
        let per_sample = 2 * self.num_classes as u64 + 1;
        let bytes = product(&[batch, samples, height, width, per_sample])
            .saturating_add(product(&[batch, height, width, 2 * first]))
            .saturating_mul(FLOAT)
            .saturating_add(2 * super::fcomb::CHUNK_BYTES as u128);
        Need::new(what, bytes).fits_memory()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ProbUNet;
    use tch::nn;

    fn counted(config: &ModelConfig) -> u128 {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let _model = ProbUNet::new(&vs.root(), config.clone()).unwrap();
        vs.trainable_variables()
            .iter()
            .map(|t| t.numel() as u128)
            .sum()
    }

    #[test]
    fn the_parameter_count_is_what_the_layers_create() {
        let default = ModelConfig::default();
        assert_eq!(default.parameter_count(), counted(&default));
        let other = ModelConfig {
            filters: vec![4, 6, 10],
            latent_dim: 3,
            fcomb_convs: 2,
            ..ModelConfig::default()
        };
        assert_eq!(other.parameter_count(), counted(&other));
    }

    #[test]
    fn absurd_filters_are_refused_with_their_size() {
        let config = ModelConfig {
            filters: vec![8, 100_000_000],
            ..ModelConfig::default()
        };
        let err = config.check_weights().unwrap_err().to_string();
        assert!(
            err.starts_with("model.filters = [8, 100000000] needs about"),
            "{err}"
        );
        assert!(err.contains("PiB") || err.contains("EiB"), "{err}");
        assert!(ModelConfig::default().check_weights().is_ok());
        assert!(ModelConfig::default()
            .check_training(32, 32, 128, 128)
            .is_ok());
        let err = ModelConfig::default()
            .check_training(1 << 40, 6, 128, 128)
            .unwrap_err();
        assert!(
            err.to_string().contains("batches of 1099511627776"),
            "{err}"
        );
        let sampling = |samples| {
            ModelConfig::default().check_sampling("--samples".into(), 16, samples, 128, 128)
        };
        assert!(sampling(100).is_ok());
        let err = sampling(100_000_000).unwrap_err().to_string();
        assert!(err.starts_with("--samples needs about"), "{err}");
    }
}

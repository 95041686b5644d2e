//! The whole model: U-Net, prior, posterior and fcomb, the ELBO and prior sampling.
use super::fcomb::Fcomb;
use super::gaussian::{AxisAlignedConvGaussian, DiagonalGaussian};
use super::layers::Prepared;
use super::layout::{self, Layout, Layouts};
use super::parts;
use super::simd;
use super::unet::UNet;
use super::{ModelConfig, ModelError, Reduction};
use crate::device::Precision;
use tch::{nn, Kind, TchError, Tensor};

#[derive(Debug)]
pub struct ProbUNet {
    config: ModelConfig,
    pub unet: UNet,
    pub prior: AxisAlignedConvGaussian,
    pub posterior: AxisAlignedConvGaussian,
    pub fcomb: Fcomb,
    /// The precision of the convolutions; the loss terms are always float32.
    compute_kind: Kind,
}

/// Every term of one ELBO evaluation. The scalars stay on the device (no host sync); the
/// training loop reads them when it logs.
#[derive(Debug)]
pub struct ElboTerms {
    /// `-elbo + l2_weight * reg`: what the optimiser minimises.
    pub loss: Tensor,
    /// `-(reconstruction + beta * kl)`.
    pub elbo: Tensor,
    /// KL(posterior || prior), summed over latent dims, averaged over the batch.
    pub kl: Tensor,
    /// BCE-with-logits of the reconstruction, reduced as the config says.
    pub reconstruction: Tensor,
    /// Sum of the L2 norms of the prior, posterior and fcomb hidden parameters.
    pub reg: Tensor,
    pub prior: DiagonalGaussian,
    pub posterior: DiagonalGaussian,
    /// `[B, classes, H, W]` logits of the reconstruction.
    pub logits: Tensor,
}

/// Trainable parameter counts per part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParameterCounts {
    pub unet: i64,
    pub prior: i64,
    pub posterior: i64,
    pub fcomb: i64,
}

impl ParameterCounts {
    pub fn total(&self) -> i64 {
        self.unet + self.prior + self.posterior + self.fcomb
    }
}

/// Where the latent sample of an ELBO comes from.
enum Latent<'a> {
    /// Drawn from the posterior.
    Draw,
    /// Given as is (no gradient reaches the posterior through it).
    Given(&'a Tensor),
    /// The posterior's `mu + sigma * eps` for given standard-normal `eps`.
    Noise(&'a Tensor),
}

/// The batch an ELBO's images are part of, and whether this part carries the weights' L2
/// term, which belongs to the batch once rather than to each part.
#[derive(Debug, Clone, Copy)]
pub struct Share {
    /// Images in the whole batch.
    pub batch: i64,
    pub with_reg: bool,
}

impl Share {
    fn whole(image: &Tensor) -> Self {
        Self {
            batch: image.size().first().copied().unwrap_or(0),
            with_reg: true,
        }
    }

    /// A mean over a part of `part` images as its share of the mean over the batch.
    fn of_mean(self, mean: Tensor, part: i64) -> Result<Tensor, TchError> {
        if part == self.batch {
            Ok(mean)
        } else {
            mean.f_mul_scalar(part as f64 / self.batch.max(1) as f64)
        }
    }
}

/// Which of the model's passes an input is laid out for (`layout::Layouts`).
#[derive(Debug, Clone, Copy)]
enum Pass {
    Elbo,
    Sample,
}

/// `t` (`[N, C, H, W]`) with channels-last strides; the layout then carries through ReLU,
/// pooling, upsampling and concatenation. (For C = 1, permuting makes no copy and the
/// strides must be set by hand, or libtorch would read the tensor as NCHW.)
fn channels_last(t: &Tensor) -> Result<Tensor, TchError> {
    let (n, c, h, w) = t.size4()?;
    t.f_permute([0, 2, 3, 1])?.f_contiguous()?.f_as_strided(
        [n, c, h, w],
        [h * w * c, 1, w * c, c],
        None::<i64>,
    )
}

fn numel<'a>(params: impl Iterator<Item = &'a Tensor>) -> i64 {
    params.map(|t| t.numel() as i64).sum()
}

impl ProbUNet {
    /// Builds the model under `p` (variables named `unet.*`, `prior.*`, `posterior.*`,
    /// `fcomb.*`, the names the PyTorch parity script uses).
    pub fn new(p: &nn::Path, config: ModelConfig) -> Result<Self, ModelError> {
        config.validate()?;
        config.check_weights()?;
        let c = &config;
        let unet = UNet::new(p / "unet", c.input_channels, &c.filters)?;
        let prior = AxisAlignedConvGaussian::new(
            p / "prior",
            c.input_channels,
            &c.filters,
            c.latent_dim,
            c.log_sigma_clamp,
        )?;
        let posterior = AxisAlignedConvGaussian::new(
            p / "posterior",
            c.input_channels + c.num_classes,
            &c.filters,
            c.latent_dim,
            c.log_sigma_clamp,
        )?;
        let fcomb = Fcomb::new(
            p / "fcomb",
            c.filters[0],
            c.latent_dim,
            c.fcomb_convs,
            c.num_classes,
        )?;
        Ok(Self {
            config,
            unet,
            prior,
            posterior,
            fcomb,
            compute_kind: Kind::Float,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// bf16 runs the convolutions in bfloat16 (autocast-style); fp32 runs everything in float32.
    pub fn set_precision(&mut self, precision: Precision) {
        self.compute_kind = match precision {
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
        };
    }

    /// The latent Gaussian of `net` for `input`, with float32 parameters whatever the
    /// compute precision.
    fn latent(
        &self,
        net: &AxisAlignedConvGaussian,
        input: &Tensor,
        pass: Pass,
    ) -> Result<DiagonalGaussian, TchError> {
        let g = net.forward(&self.layout(input, pass)?)?;
        Ok(DiagonalGaussian {
            mu: g.mu.f_to_kind(Kind::Float)?,
            log_sigma: g.log_sigma.f_to_kind(Kind::Float)?,
        })
    }

    fn features(&self, image: &Tensor, pass: Pass) -> Result<Tensor, TchError> {
        self.unet.forward(&self.layout(image, pass)?)
    }

    /// An input in the compute precision and in the memory layout the convolutions of
    /// `pass` run fastest from: on the CPU as [`layout::cpu_layouts`] chooses per ISA;
    /// channels-last for bfloat16 on CUDA (as PyTorch recommends for tensor cores); plain
    /// NCHW for float32 on CUDA, where cuDNN's NCHW kernels are its default.
    fn layout(&self, input: &Tensor, pass: Pass) -> Result<Tensor, TchError> {
        let input = input.f_to_kind(self.compute_kind)?;
        let layouts = self.layouts(input.device());
        let layout = match pass {
            Pass::Elbo => layouts.elbo,
            Pass::Sample => layouts.sample,
        };
        match layout {
            Layout::ChannelsLast => channels_last(&input),
            Layout::Nchw => input.f_contiguous(),
        }
    }

    /// The layouts this model's passes run in on `device` at its precision.
    pub fn layouts(&self, device: tch::Device) -> Layouts {
        if device == tch::Device::Cpu {
            layout::cpu_layouts()
        } else if self.compute_kind == Kind::BFloat16 {
            Layouts::both(Layout::ChannelsLast)
        } else {
            Layouts::both(Layout::Nchw)
        }
    }

    pub fn parameter_counts(&self) -> ParameterCounts {
        ParameterCounts {
            unet: numel(self.unet.parameters()),
            prior: numel(self.prior.parameters()),
            posterior: numel(self.posterior.parameters()),
            fcomb: numel(self.fcomb.parameters()),
        }
    }

    /// Refuses inputs the layers would mangle: wrong rank or channels, or H and W not
    /// divisible by 2^(levels-1) (pooling would round and the skips would not line up).
    pub fn check_image(&self, image: &Tensor) -> Result<(), ModelError> {
        self.check_input(&image.size())
    }

    /// [`ProbUNet::check_image`] for an image of shape `[B, C, H, W]` not yet made, e.g. a
    /// dataset store's before training or evaluating on it.
    pub fn check_input(&self, size: &[i64]) -> Result<(), ModelError> {
        let channels = self.config.input_channels;
        if size.len() != 4 || size[1] != channels {
            return Err(ModelError::Shape {
                what: "image",
                expected: format!("[B, {channels}, H, W]"),
                got: size.to_vec(),
            });
        }
        let divisor = self.config.size_divisor();
        if size[2] % divisor != 0 || size[3] % divisor != 0 || size[2] == 0 || size[3] == 0 {
            return Err(ModelError::InputSize {
                height: size[2],
                width: size[3],
                divisor,
                levels: self.config.filters.len(),
            });
        }
        Ok(())
    }

    fn check_mask(&self, image: &Tensor, mask: &Tensor) -> Result<(), ModelError> {
        let (i, m) = (image.size(), mask.size());
        if m.len() != 4 || m[0] != i[0] || m[1] != self.config.num_classes || m[2..] != i[2..] {
            return Err(ModelError::Shape {
                what: "mask",
                expected: format!(
                    "[{}, {}, {}, {}]",
                    i[0], self.config.num_classes, i[2], i[3]
                ),
                got: m,
            });
        }
        Ok(())
    }

    /// The ELBO with z drawn from the posterior (reparameterised), as in training.
    pub fn elbo(&self, image: &Tensor, mask: &Tensor) -> Result<ElboTerms, ModelError> {
        self.elbo_terms(image, mask, Latent::Draw, Share::whole(image))
    }

    /// The ELBO at a given latent `z` (`[B, latent_dim]`): deterministic, for parity checks.
    pub fn elbo_at(
        &self,
        image: &Tensor,
        mask: &Tensor,
        z: &Tensor,
    ) -> Result<ElboTerms, ModelError> {
        self.elbo_terms(image, mask, Latent::Given(z), Share::whole(image))
    }

    /// The terms of `image`'s share of the ELBO of a batch it is part of, with z the
    /// posterior's `mu + sigma * eps` (`eps` `[part, latent_dim]`): the shares of a batch's
    /// parts add up to the batch's terms, and their gradients to its gradients, so a batch
    /// can go through in parts that each fit in cache.
    pub fn elbo_share(
        &self,
        image: &Tensor,
        mask: &Tensor,
        eps: &Tensor,
        share: Share,
    ) -> Result<ElboTerms, ModelError> {
        self.elbo_terms(image, mask, Latent::Noise(eps), share)
    }

    fn elbo_terms(
        &self,
        image: &Tensor,
        mask: &Tensor,
        latent: Latent,
        share: Share,
    ) -> Result<ElboTerms, ModelError> {
        self.check_image(image)?;
        self.check_mask(image, mask)?;
        let prior = self.latent(&self.prior, image, Pass::Elbo)?;
        let posterior_input = Tensor::f_cat(&[image, mask], 1)?;
        let posterior = self.latent(&self.posterior, &posterior_input, Pass::Elbo)?;
        let features = self.features(image, Pass::Elbo)?;
        let z = match latent {
            Latent::Draw => posterior.rsample()?,
            Latent::Given(z) => z.shallow_clone(),
            Latent::Noise(eps) => posterior.reparameterise(eps)?,
        };
        let logits = self.fcomb.forward(&features, &z)?.f_to_kind(Kind::Float)?;
        let part = image.size()[0];
        let reconstruction = self.share_of(self.reconstruction(&logits, mask)?, part, share)?;
        let kl = share.of_mean(posterior.kl(&prior)?.f_mean(Kind::Float)?, part)?;
        let elbo = reconstruction
            .f_add(&kl.f_mul_scalar(self.config.beta)?)?
            .f_neg()?;
        let reg = if share.with_reg {
            self.reg()?
        } else {
            Tensor::f_zeros([], (Kind::Float, image.device()))?
        };
        let loss = reg.f_mul_scalar(self.config.l2_weight)?.f_sub(&elbo)?;
        Ok(ElboTerms {
            loss,
            elbo,
            kl,
            reconstruction,
            reg,
            prior,
            posterior,
            logits,
        })
    }

    /// A part's reconstruction term as its share of the batch's: a sum over the batch is
    /// already shared; a mean over it is weighted by the part's size.
    fn share_of(&self, term: Tensor, part: i64, share: Share) -> Result<Tensor, TchError> {
        match self.config.reconstruction {
            Reduction::Sum => Ok(term),
            Reduction::BatchMean => share.of_mean(term, part),
        }
    }

    /// The binary cross-entropy of `logits` against `mask`, reduced as the config says.
    fn reconstruction(&self, logits: &Tensor, mask: &Tensor) -> Result<Tensor, TchError> {
        let bce = logits.f_binary_cross_entropy_with_logits::<Tensor>(
            mask,
            None,
            None,
            tch::Reduction::None,
        )?;
        match self.config.reconstruction {
            Reduction::Sum => bce.f_sum(Kind::Float),
            Reduction::BatchMean => bce
                .f_sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Float)?
                .f_mean(Kind::Float),
        }
    }

    /// Sum of the (unsquared) L2 norms of every parameter of the posterior, the prior and
    /// fcomb's hidden layers, as the seed's `l2_regularisation` calls.
    pub fn reg(&self) -> Result<Tensor, TchError> {
        let norms = self
            .posterior
            .parameters()
            .chain(self.prior.parameters())
            .chain(self.fcomb.hidden_parameters())
            .map(|t| t.f_norm())
            .collect::<Result<Vec<Tensor>, TchError>>()?;
        Tensor::f_stack(&norms, 0)?.f_sum(Kind::Float)
    }

    /// Logits `[B, n, classes, H, W]` of `n` prior samples per image: prior and U-Net run
    /// once per image, fcomb once per sample.
    pub fn sample(&self, image: &Tensor, n: i64) -> Result<Tensor, ModelError> {
        self.sample_latents(image, |prior| prior.rsample_n(n))
    }

    /// As [`ProbUNet::sample`], with the standard-normal noise given: `eps` is
    /// `[B, n, latent_dim]` and sample `j` of image `i` decodes `mu_i + sigma_i * eps[i, j]`,
    /// so a caller can make each image's samples independent of the batch it is in.
    pub fn sample_with_noise(&self, image: &Tensor, eps: &Tensor) -> Result<Tensor, ModelError> {
        let (b, l) = (image.size().first().copied(), self.config.latent_dim);
        let size = eps.size();
        if size.len() != 3 || Some(size[0]) != b || size[2] != l {
            return Err(ModelError::Shape {
                what: "noise",
                expected: format!("[{}, n, {l}]", b.unwrap_or(0)),
                got: size,
            });
        }
        self.sample_latents(image, |prior| {
            prior.reparameterise(
                &eps.f_to_device(prior.mu.device())?
                    .f_to_kind(prior.mu.kind())?,
            )
        })
    }

    /// Prior and U-Net go through the images in parts ([`parts::part_images`]), as
    /// training does on the CPU; the latents are drawn for the whole batch at once, so a
    /// sample does not depend on the parts.
    fn sample_latents(
        &self,
        image: &Tensor,
        z: impl FnOnce(&DiagonalGaussian) -> Result<Tensor, TchError>,
    ) -> Result<Tensor, ModelError> {
        let most = self.part_images(image)?;
        self.sample_in_parts(image, z, most)
    }

    /// The U-Net's and the prior's 3x3 convolutions prepared for the Winograd path for one
    /// sampling pass, where it runs: float32, channels-last, on the CPU, outside autograd.
    fn prepare_winograd(&self, device: tch::Device) -> Result<Prepared<'_>, TchError> {
        let applies = device == tch::Device::Cpu
            && self.compute_kind == Kind::Float
            && self.layouts(device).sample == Layout::ChannelsLast
            && !simd::grad_enabled();
        if !applies {
            return Prepared::new([]);
        }
        Prepared::new(self.unet.convs().chain(self.prior.convs()))
    }

    /// The most of `image`'s batch that goes through at once ([`parts::part_images`]),
    /// after checking the image's shape.
    pub fn part_images(&self, image: &Tensor) -> Result<i64, ModelError> {
        self.check_image(image)?;
        let (b, _, h, w) = image.size4()?;
        let most = parts::part_images(&self.config, b as u64, h as u64, w as u64, image.device());
        Ok(most as i64)
    }

    /// [`ProbUNet::sample_latents`] in parts of at most `most` images.
    fn sample_in_parts(
        &self,
        image: &Tensor,
        z: impl FnOnce(&DiagonalGaussian) -> Result<Tensor, TchError>,
        most: i64,
    ) -> Result<Tensor, ModelError> {
        let _prepared = self.prepare_winograd(image.device())?;
        let parts = parts::split(image.size()[0], most);
        let images = parts
            .iter()
            .map(|&(first, n)| image.f_narrow(0, first, n))
            .collect::<Result<Vec<_>, _>>()?;
        let priors = images
            .iter()
            .map(|part| self.latent(&self.prior, part, Pass::Sample))
            .collect::<Result<Vec<_>, _>>()?;
        let z = z(&DiagonalGaussian::cat(&priors)?)?;
        let logits = images
            .iter()
            .zip(&parts)
            .map(|(part, &(first, n))| {
                let features = self.features(part, Pass::Sample)?;
                self.fcomb
                    .forward_samples(&features, &z.f_narrow(0, first, n)?)
            })
            .collect::<Result<Vec<_>, TchError>>()?;
        Ok(Tensor::f_cat(&logits, 0)?.f_to_kind(Kind::Float)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::OptimizerConfig;
    use tch::Device;

    fn build(config: ModelConfig) -> (nn::VarStore, ProbUNet) {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = ProbUNet::new(&vs.root(), config).unwrap();
        (vs, model)
    }

    fn small() -> ModelConfig {
        ModelConfig {
            filters: vec![8, 16, 32],
            ..ModelConfig::default()
        }
    }

    #[test]
    fn samples_in_parts_are_the_samples_of_the_whole_batch() {
        let (_vs, model) = build(small());
        let image = Tensor::from_slice(
            &(0..5 * 32 * 32)
                .map(|i| (i % 17) as f32 / 17.0)
                .collect::<Vec<_>>(),
        )
        .view([5, 1, 32, 32]);
        let eps = Tensor::from_slice(
            &(0..5 * 3 * 2)
                .map(|i| (i % 7) as f32 - 3.0)
                .collect::<Vec<_>>(),
        )
        .view([5, 3, 2]);
        let noise = |prior: &DiagonalGaussian| prior.reparameterise(&eps);
        let whole = model.sample_in_parts(&image, noise, 5).unwrap();
        assert_eq!(whole.size(), [5, 3, 1, 32, 32]);
        for most in [1, 2, 3] {
            let parts = model.sample_in_parts(&image, noise, most).unwrap();
            let scale = whole.abs().max().double_value(&[]).max(1.0);
            let diff = (&whole - &parts).abs().max().double_value(&[]);
            assert!(diff < 1e-4 * scale, "parts of {most}: {diff} of {scale}");
        }
    }

    #[test]
    fn sampling_by_winograd_matches_libtorch() {
        tch::manual_seed(3);
        let (_vs, model) = build(ModelConfig {
            filters: vec![16, 32, 48],
            ..small()
        });
        // 28x20 halves to 14x10 and then 7x5: partial tiles at the coarsest level.
        let image = Tensor::rand([3, 1, 28, 20], (Kind::Float, Device::Cpu));
        let eps = Tensor::randn([3, 4, 2], (Kind::Float, Device::Cpu));
        // Autograd recording keeps every convolution with libtorch.
        let expected = model.sample_with_noise(&image, &eps).unwrap().detach();
        let got = tch::no_grad(|| model.sample_with_noise(&image, &eps)).unwrap();
        let scale = expected.abs().max().double_value(&[]).max(1.0);
        let diff = (&expected - &got).abs().max().double_value(&[]);
        assert!(diff < 1e-4 * scale, "{diff} of {scale}");
        for conv in model.unet.convs().chain(model.prior.convs()) {
            assert!(conv.prepared().is_none(), "released after the pass");
        }
    }

    #[test]
    fn parameter_counts_match_the_seed() {
        for (latent_dim, prior, posterior, fcomb, total) in [
            (2, 1_366_276, 1_366_564, 3_265, 4_996_233),
            (6, 1_367_820, 1_368_108, 3_393, 4_999_449),
        ] {
            let (vs, model) = build(ModelConfig {
                latent_dim,
                ..ModelConfig::default()
            });
            let counts = model.parameter_counts();
            assert_eq!(
                counts,
                ParameterCounts {
                    unet: 2_260_128,
                    prior,
                    posterior,
                    fcomb
                }
            );
            assert_eq!(counts.total(), total);
            let stored: i64 = vs
                .trainable_variables()
                .iter()
                .map(|t| t.numel() as i64)
                .sum();
            assert_eq!(
                stored, total,
                "every parameter is a trainable variable, none twice"
            );
        }
    }

    #[test]
    fn output_shapes_at_batch_one_and_five() {
        tch::manual_seed(0);
        let (_vs, model) = build(ModelConfig::default());
        for batch in [1, 5] {
            let image = Tensor::rand([batch, 1, 128, 128], (Kind::Float, Device::Cpu));
            let mask = image.gt(0.5).to_kind(Kind::Float);
            let terms = tch::no_grad(|| model.elbo(&image, &mask)).unwrap();
            assert_eq!(terms.logits.size(), [batch, 1, 128, 128]);
            assert_eq!(terms.prior.mu.size(), [batch, 2]);
            assert_eq!(terms.posterior.log_sigma.size(), [batch, 2]);
            for scalar in [
                &terms.loss,
                &terms.elbo,
                &terms.kl,
                &terms.reconstruction,
                &terms.reg,
            ] {
                assert_eq!(scalar.size(), Vec::<i64>::new());
                assert!(scalar.double_value(&[]).is_finite());
            }
            let samples = tch::no_grad(|| model.sample(&image, 3)).unwrap();
            assert_eq!(samples.size(), [batch, 3, 1, 128, 128]);
        }
    }

    #[test]
    fn sizes_not_divisible_by_eight_are_refused() {
        let (_vs, model) = build(ModelConfig::default());
        let image = Tensor::zeros([1, 1, 100, 128], (Kind::Float, Device::Cpu));
        let err = model.sample(&image, 1).unwrap_err().to_string();
        assert!(
            err.contains("100x128") && err.contains("divisible by 8"),
            "{err}"
        );
        let err = model.elbo(&image, &image).unwrap_err().to_string();
        assert!(err.contains("divisible by 8"), "{err}");
        let flat = Tensor::zeros([1, 128, 128], (Kind::Float, Device::Cpu));
        let err = model.sample(&flat, 1).unwrap_err().to_string();
        assert!(err.contains("[B, 1, H, W]"), "{err}");
    }

    #[test]
    fn mask_of_another_shape_is_refused() {
        let (_vs, model) = build(small());
        let image = Tensor::zeros([2, 1, 32, 32], (Kind::Float, Device::Cpu));
        let mask = Tensor::zeros([2, 1, 16, 32], (Kind::Float, Device::Cpu));
        let err = model.elbo(&image, &mask).unwrap_err().to_string();
        assert!(
            err.contains("mask") && err.contains("[2, 1, 32, 32]"),
            "{err}"
        );
    }

    #[test]
    fn sampling_reuses_features_but_equals_fcomb_per_sample() {
        tch::manual_seed(4);
        let (_vs, model) = build(ModelConfig {
            latent_dim: 3,
            ..small()
        });
        let image = Tensor::rand([2, 1, 32, 32], (Kind::Float, Device::Cpu));
        let features = model.unet.forward(&image).unwrap();
        let z = Tensor::randn([2, 4, 3], (Kind::Float, Device::Cpu));
        let fast = model.fcomb.forward_samples(&features, &z).unwrap();
        for s in 0..4 {
            let slow = model.fcomb.forward(&features, &z.select(1, s)).unwrap();
            let diff = (fast.select(1, s) - slow).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "sample {s} differs by {diff}");
        }
    }

    /// A libtorch failure inside a pass (here allocations no address space can hold) comes
    /// back as an error the command reports, not a panic.
    #[test]
    fn a_failed_allocation_is_an_error_not_a_panic() {
        let (_vs, model) = build(small());
        let image = Tensor::zeros([1, 1, 32, 32], (Kind::Float, Device::Cpu));
        let err = tch::no_grad(|| model.sample(&image, 1 << 50)).unwrap_err();
        assert!(matches!(err, ModelError::Torch(_)), "{err}");
        assert!(err.to_string().contains("allocate"), "{err}");
        // A batch of 2^40 images as a broadcast view: only the pass itself allocates.
        let images = image.expand([1 << 40, 1, 32, 32], false);
        let err = model.elbo(&images, &images).unwrap_err();
        assert!(matches!(err, ModelError::Torch(_)), "{err}");
    }

    #[test]
    fn sampling_with_given_noise_decodes_mu_plus_sigma_eps() {
        tch::manual_seed(8);
        let (_vs, model) = build(small());
        let image = Tensor::rand([2, 1, 32, 32], (Kind::Float, Device::Cpu));
        let eps = Tensor::randn([2, 3, 2], (Kind::Float, Device::Cpu));
        let logits = tch::no_grad(|| model.sample_with_noise(&image, &eps)).unwrap();
        assert_eq!(logits.size(), [2, 3, 1, 32, 32]);
        let prior = model.prior.forward(&image).unwrap();
        let features = model.unet.forward(&image).unwrap();
        for s in 0..3 {
            let z = &prior.mu + prior.sigma().unwrap() * eps.select(1, s);
            let expected = model.fcomb.forward(&features, &z).unwrap();
            let diff = (logits.select(1, s) - expected)
                .abs()
                .max()
                .double_value(&[]);
            assert!(diff < 1e-5, "sample {s} differs by {diff}");
        }
        // One image alone gets the same samples as it does in a batch.
        let alone =
            tch::no_grad(|| model.sample_with_noise(&image.narrow(0, 1, 1), &eps.narrow(0, 1, 1)))
                .unwrap();
        let diff = (alone - logits.narrow(0, 1, 1))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-5, "{diff}");
        let err = model
            .sample_with_noise(
                &image,
                &Tensor::zeros([2, 3, 5], (Kind::Float, Device::Cpu)),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("noise") && err.contains("[2, n, 2]"), "{err}");
    }

    #[test]
    fn reconstruction_reduction_is_a_setting() {
        tch::manual_seed(5);
        let image = Tensor::rand([4, 1, 32, 32], (Kind::Float, Device::Cpu));
        let mask = image.gt(0.5).to_kind(Kind::Float);
        let z = Tensor::zeros([4, 2], (Kind::Float, Device::Cpu));
        tch::manual_seed(6);
        let (_a, sum) = build(small());
        tch::manual_seed(6);
        let (_b, mean) = build(ModelConfig {
            reconstruction: Reduction::BatchMean,
            ..small()
        });
        let sum = tch::no_grad(|| sum.elbo_at(&image, &mask, &z)).unwrap();
        let mean = tch::no_grad(|| mean.elbo_at(&image, &mask, &z)).unwrap();
        let ratio = sum.reconstruction.double_value(&[]) / mean.reconstruction.double_value(&[]);
        assert!(
            (ratio - 4.0).abs() < 1e-4,
            "sum over the batch is 4x the batch mean: {ratio}"
        );
    }

    #[test]
    fn bf16_convolutions_track_fp32_and_train_fp32_weights() {
        tch::manual_seed(8);
        let (vs, mut model) = build(small());
        let image = Tensor::rand([2, 1, 32, 32], (Kind::Float, Device::Cpu));
        let mask = image.gt(0.5).to_kind(Kind::Float);
        let z = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu));
        let fp32 = tch::no_grad(|| model.elbo_at(&image, &mask, &z)).unwrap();
        model.set_precision(Precision::Bf16);
        let bf16 = model.elbo_at(&image, &mask, &z).unwrap();
        assert_eq!(bf16.logits.kind(), Kind::Float, "loss terms stay float32");
        let (a, b) = (fp32.loss.double_value(&[]), bf16.loss.double_value(&[]));
        assert!(
            (a - b).abs() / a.abs() < 0.02,
            "fp32 loss {a}, bf16 loss {b}"
        );
        let samples = tch::no_grad(|| model.sample(&image, 3)).unwrap();
        assert_eq!(
            (samples.size(), samples.kind()),
            (vec![2, 3, 1, 32, 32], Kind::Float)
        );
        bf16.loss.backward();
        for (name, t) in vs.variables() {
            assert_eq!(t.kind(), Kind::Float, "{name}");
            assert!(t.grad().defined(), "{name} gets a gradient");
        }
    }

    #[test]
    fn loss_halves_in_a_hundred_cpu_steps() {
        tch::manual_seed(11);
        let (vs, model) = build(small());
        let mut opt = nn::Adam::default().build(&vs, 1e-3).unwrap();
        let image = Tensor::rand([4, 1, 32, 32], (Kind::Float, Device::Cpu));
        let mask = image.gt(0.5).to_kind(Kind::Float);
        let mut losses = Vec::new();
        for _ in 0..100 {
            let terms = model.elbo(&image, &mask).unwrap();
            opt.backward_step(&terms.loss);
            losses.push(terms.loss.double_value(&[]));
        }
        let (first, last) = (losses[0], losses[99]);
        assert!(last <= 0.5 * first, "loss went from {first} to {last}");
    }
}

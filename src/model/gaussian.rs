//! The prior and posterior nets and the diagonal Gaussian they parameterise.
use super::layers::{Conv2d, ConvInit};
use super::unet::Encoder;
use tch::{nn, Kind, TchError, Tensor};

/// A batch of axis-aligned Gaussians over the latent space: `mu` and `log_sigma` are `[B, L]`.
#[derive(Debug)]
pub struct DiagonalGaussian {
    pub mu: Tensor,
    pub log_sigma: Tensor,
}

impl DiagonalGaussian {
    pub fn sigma(&self) -> Result<Tensor, TchError> {
        self.log_sigma.f_exp()
    }

    /// Reparameterised samples `mu + sigma * eps` for standard-normal `eps` of shape
    /// `[B, L]` or `[B, n, L]` (n samples per image).
    pub fn reparameterise(&self, eps: &Tensor) -> Result<Tensor, TchError> {
        if eps.dim() == 3 {
            let sigma = self.sigma()?.f_unsqueeze(1)?;
            self.mu.f_unsqueeze(1)?.f_add(&sigma.f_mul(eps)?)
        } else {
            self.mu.f_add(&self.sigma()?.f_mul(eps)?)
        }
    }

    /// The Gaussians of several batches as one batch, in order.
    pub fn cat(batches: &[DiagonalGaussian]) -> Result<Self, TchError> {
        let (mu, log_sigma): (Vec<&Tensor>, Vec<&Tensor>) =
            batches.iter().map(|g| (&g.mu, &g.log_sigma)).unzip();
        Ok(Self {
            mu: Tensor::f_cat(&mu, 0)?,
            log_sigma: Tensor::f_cat(&log_sigma, 0)?,
        })
    }

    /// `n` reparameterised samples per image, `[B, n, L]`.
    pub fn rsample_n(&self, n: i64) -> Result<Tensor, TchError> {
        let (b, l) = (self.mu.size()[0], self.mu.size()[1]);
        let eps = Tensor::f_randn([b, n, l], (self.mu.kind(), self.mu.device()))?;
        self.reparameterise(&eps)
    }

    /// One reparameterised sample per image, `[B, L]`.
    pub fn rsample(&self) -> Result<Tensor, TchError> {
        self.reparameterise(&self.mu.f_randn_like()?)
    }

    /// Analytic KL(self || other) per batch element, summed over the latent dimensions:
    /// `(sigma_q^2 + (mu_q - mu_p)^2) / (2 sigma_p^2) - 1/2 - log(sigma_q / sigma_p)`.
    pub fn kl(&self, other: &DiagonalGaussian) -> Result<Tensor, TchError> {
        let log_ratio = self.log_sigma.f_sub(&other.log_sigma)?;
        let var_ratio = log_ratio.f_mul_scalar(2.0)?.f_exp()?;
        let mean_term = self
            .mu
            .f_sub(&other.mu)?
            .f_square()?
            .f_div(&other.log_sigma.f_mul_scalar(2.0)?.f_exp()?)?;
        var_ratio
            .f_add(&mean_term)?
            .f_sub_scalar(1.0)?
            .f_mul_scalar(0.5)?
            .f_sub(&log_ratio)?
            .f_sum_dim_intlist(-1, false, Kind::Float)
    }
}

/// Maps an image (prior) or an image with its mask as an extra channel (posterior) to a
/// diagonal Gaussian: the encoder, a global mean over H and W, then a 1x1 conv to
/// `2 * latent_dim` channels split into mu and log sigma.
#[derive(Debug)]
pub struct AxisAlignedConvGaussian {
    encoder: Encoder,
    head: Conv2d,
    latent_dim: i64,
    log_sigma_clamp: Option<f64>,
}

impl AxisAlignedConvGaussian {
    pub fn new(
        p: nn::Path,
        input_channels: i64,
        filters: &[i64],
        latent_dim: i64,
        log_sigma_clamp: Option<f64>,
    ) -> Result<Self, TchError> {
        let encoder = Encoder::new(&p / "encoder", input_channels, filters)?;
        #[expect(clippy::expect_used, reason = "ModelConfig::validate checks filters")]
        let last = *filters.last().expect("at least one level");
        let head = Conv2d::new(
            &p / "head",
            last,
            2 * latent_dim,
            1,
            ConvInit::KaimingUnitBias,
        )?;
        Ok(Self {
            encoder,
            head,
            latent_dim,
            log_sigma_clamp,
        })
    }

    /// `input` is the image, or the image and mask concatenated on channels.
    pub fn forward(&self, input: &Tensor) -> Result<DiagonalGaussian, TchError> {
        let encoding =
            self.encoder
                .forward(input)?
                .f_mean_dim([2i64, 3].as_slice(), true, None::<Kind>)?;
        let params = self.head.forward(&encoding)?.f_flatten(1, -1)?;
        let mu = params.f_narrow(1, 0, self.latent_dim)?;
        let mut log_sigma = params.f_narrow(1, self.latent_dim, self.latent_dim)?;
        if let Some(c) = self.log_sigma_clamp {
            log_sigma = clamp_keeping_gradient(&log_sigma, c)?;
        }
        Ok(DiagonalGaussian { mu, log_sigma })
    }

    /// The encoder's convolutions (the 1x1 head is not one [`Prepared`](super::layers::Prepared) takes).
    pub fn convs(&self) -> impl Iterator<Item = &Conv2d> {
        self.encoder.convs()
    }

    pub fn parameters(&self) -> impl Iterator<Item = &Tensor> {
        self.encoder.parameters().chain(self.head.parameters())
    }
}

/// `x` clamped to `[-c, c]` with the gradient of `x` itself: the value stays where the
/// KL's `exp(2 log sigma)` is finite, while the gradient beyond the bound still pulls a head
/// back. A plain clamp's gradient is zero there, so a head once pushed past the bound stayed
/// stuck: in 2 of 3 quickstart seeds the prior sat at +20 for good (KL ~40, val GED
/// 0.76-0.97 against 0.27-0.33 with this; docs/results.md).
fn clamp_keeping_gradient(x: &Tensor, c: f64) -> Result<Tensor, TchError> {
    // The value is the clamp's alone, since `x - x.detach()` is exactly zero once `x` is
    // finite (inf - inf would be NaN); the gradient is `x`'s alone, through that difference.
    let x = x.f_clamp(f64::from(-f32::MAX), f64::from(f32::MAX))?;
    x.f_clamp(-c, c)?
        .f_detach()?
        .f_add(&x.f_sub(&x.f_detach()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn the_clamp_bounds_the_value_and_keeps_the_gradient() {
        let x =
            Tensor::from_slice(&[-50.0f32, -3.0, 0.5, 25.0, f32::INFINITY]).set_requires_grad(true);
        let y = clamp_keeping_gradient(&x, 20.0).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(&y).unwrap(),
            [-20.0, -3.0, 0.5, 20.0, 20.0]
        );
        y.sum(Kind::Float).backward();
        assert_eq!(
            Vec::<f32>::try_from(x.grad()).unwrap(),
            [1.0, 1.0, 1.0, 1.0, 0.0],
            "the gradient passes through the bound, except from infinity"
        );
    }

    fn gaussian(mu: &[f32], log_sigma: &[f32]) -> DiagonalGaussian {
        let l = mu.len() as i64;
        DiagonalGaussian {
            mu: Tensor::from_slice(mu).view([1, l]),
            log_sigma: Tensor::from_slice(log_sigma).view([1, l]),
        }
    }

    /// log N(x; mu, sigma) summed over the latent dims.
    fn log_density(g: &DiagonalGaussian, x: &Tensor) -> Tensor {
        let z = (x - &g.mu) / g.sigma().unwrap();
        (z.square() * -0.5 - &g.log_sigma - 0.5 * (2.0 * std::f64::consts::PI).ln())
            .sum_dim_intlist(-1, false, Kind::Float)
    }

    #[test]
    fn analytic_kl_matches_monte_carlo_within_two_percent() {
        tch::manual_seed(7);
        let q = gaussian(&[0.3, -1.2, 0.8], &[-0.4, 0.2, 0.1]);
        let p = gaussian(&[-0.5, 0.4, 0.0], &[0.3, -0.2, 0.0]);
        let analytic = q.kl(&p).unwrap().double_value(&[0]);
        let x = q
            .reparameterise(&Tensor::randn([400_000, 3], (Kind::Float, Device::Cpu)))
            .unwrap();
        let mc = (log_density(&q, &x) - log_density(&p, &x))
            .mean(Kind::Double)
            .double_value(&[]);
        let rel = (analytic - mc).abs() / analytic;
        assert!(analytic > 0.5, "a KL worth testing: {analytic}");
        assert!(
            rel < 0.02,
            "analytic {analytic} vs Monte Carlo {mc} ({:.2}%)",
            100.0 * rel
        );
    }

    #[test]
    fn kl_of_a_gaussian_with_itself_is_zero() {
        let q = gaussian(&[0.3, -1.2], &[-0.4, 0.7]);
        let p = gaussian(&[0.3, -1.2], &[-0.4, 0.7]);
        assert_eq!(q.kl(&p).unwrap().double_value(&[0]), 0.0);
    }

    #[test]
    fn n_samples_per_image_have_the_gaussian_moments() {
        tch::manual_seed(3);
        let g = gaussian(&[2.0, -1.0], &[0.0, (0.5f32).ln()]);
        let z = g.rsample_n(200_000).unwrap();
        assert_eq!(z.size(), [1, 200_000, 2]);
        let mean = z.mean_dim(1, false, Kind::Double);
        let std = z.std_dim(1, true, false);
        for (i, (m, s)) in [(2.0, 1.0), (-1.0, 0.5)].into_iter().enumerate() {
            assert!((mean.double_value(&[0, i as i64]) - m).abs() < 0.01);
            assert!((std.double_value(&[0, i as i64]) - s).abs() < 0.01);
        }
    }
}

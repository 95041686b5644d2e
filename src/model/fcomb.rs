//! Fcomb: combines a latent sample with the U-Net features into logits through 1x1 convs.
use super::fcomb_kernel;
use super::layers::{Conv2d, ConvInit};
use super::simd::Isa;
use tch::{nn, Device, Kind, TchError, Tensor};

/// About how many bytes of activations fcomb's 1x1 convs take per chunk of samples: two
/// such tensors live at once, and 2 x 8 MiB sit in a 32 MiB L3 cache.
pub const CHUNK_BYTES: i64 = 8 << 20;

/// The pieces `b` images of `n` samples each are decoded in, image-major, each at most
/// `rows` samples where one image's samples allow it, as `[first image, images, first
/// sample, samples]`: chunks of one image's samples when `n >= rows`, else chunks of whole
/// images with all their samples.
fn chunk_plan(b: i64, n: i64, rows: i64) -> Vec<[i64; 4]> {
    let rows = rows.max(1);
    if n >= rows {
        (0..b)
            .flat_map(|i| {
                (0..n)
                    .step_by(rows as usize)
                    .map(move |s| [i, 1, s, rows.min(n - s)])
            })
            .collect()
    } else {
        let images = rows / n.max(1);
        (0..b)
            .step_by(images as usize)
            .map(|i| [i, images.min(b - i), 0, n])
            .collect()
    }
}

#[derive(Debug)]
pub struct Fcomb {
    /// `fcomb_convs - 1` hidden 1x1 convs with ReLU; the first takes features and z.
    hidden: Vec<Conv2d>,
    last: Conv2d,
    features: i64,
}

impl Fcomb {
    pub fn new(
        p: nn::Path,
        features: i64,
        latent_dim: i64,
        convs: usize,
        classes: i64,
    ) -> Result<Self, TchError> {
        let layers = &p / "layers";
        let hidden = (0..convs - 1)
            .map(|i| {
                let c_in = if i == 0 {
                    features + latent_dim
                } else {
                    features
                };
                Conv2d::new(
                    &layers / i,
                    c_in,
                    features,
                    1,
                    ConvInit::OrthogonalTruncated,
                )
            })
            .collect::<Result<_, _>>()?;
        let last = Conv2d::new(
            &p / "last",
            features,
            classes,
            1,
            ConvInit::OrthogonalTruncated,
        )?;
        Ok(Self {
            hidden,
            last,
            features,
        })
    }

    /// Logits for one latent sample per image: `features` `[B, F, H, W]`, `z` `[B, L]`.
    pub fn forward(&self, features: &Tensor, z: &Tensor) -> Result<Tensor, TchError> {
        self.forward_samples(features, &z.f_unsqueeze(1)?)?
            .f_squeeze_dim(1)
    }

    /// Logits for `n` samples per image without tiling z or repeating the features:
    /// the first conv splits as `W_f f + W_z z + b`, so `W_f f` is computed once per image
    /// and only the `[B, n, F]` latent part varies. (Training takes this path too: it
    /// skips concatenating a tiled z, and the features keep their layout.) `z` is
    /// `[B, n, L]`; the result is `[B, n, classes, H, W]`.
    ///
    /// The samples go through the 1x1 convs in chunks of about [`CHUNK_BYTES`] of
    /// activations, so each layer reads its input from cache rather than memory, and the
    /// peak memory of sampling does not grow with `n`.
    pub fn forward_samples(&self, features: &Tensor, z: &Tensor) -> Result<Tensor, TchError> {
        let (b, n) = (z.size()[0], z.size()[1]);
        let (h, w) = (features.size()[2], features.size()[3]);
        let first = &self.hidden[0];
        let w_f = first
            .weight
            .f_narrow(1, 0, self.features)?
            .f_to_kind(features.kind())?;
        let w_z = first
            .weight
            .f_narrow(1, self.features, z.size()[2])?
            .f_flatten(1, -1)?;
        let feature_part = features.f_conv2d(&w_f, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1)?;
        let latent_part = z
            .f_matmul(&w_z.f_tr()?)?
            .f_add(&first.bias)?
            .f_to_kind(features.kind())?;
        if let Some(logits) = self.decode_fused(&feature_part, &latent_part)? {
            return Ok(logits);
        }
        let row_bytes = self.features * h * w * features.kind().elt_size_in_bytes() as i64;
        let rows = CHUNK_BYTES / row_bytes.max(1);
        let mut chunks = chunk_plan(b, n, rows)
            .into_iter()
            .map(|[i, images, s, samples]| {
                self.decode(
                    &feature_part.f_narrow(0, i, images)?,
                    &latent_part
                        .f_narrow(0, i, images)?
                        .f_narrow(1, s, samples)?,
                )
            })
            .collect::<Result<Vec<Tensor>, TchError>>()?;
        let logits = if chunks.len() == 1 {
            chunks.remove(0)
        } else {
            Tensor::f_cat(&chunks, 0)?
        };
        let classes = logits.size()[1];
        logits.f_reshape([b, n, classes, h, w])
    }

    /// Logits `[m * n, classes, H, W]` (image-major) from the first layer's two parts:
    /// `feature_part` `[m, F, H, W]` and `latent_part` `[m, n, F]`.
    fn decode(&self, feature_part: &Tensor, latent_part: &Tensor) -> Result<Tensor, TchError> {
        let (m, n) = (latent_part.size()[0], latent_part.size()[1]);
        let (h, w) = (feature_part.size()[2], feature_part.size()[3]);
        // In place after each layer: neither the sum's nor a convolution's backward needs
        // its output.
        let mut xs = feature_part
            .f_unsqueeze(1)?
            .f_add(&latent_part.f_unsqueeze(-1)?.f_unsqueeze(-1)?)?
            .f_relu_()?
            .f_reshape([m * n, self.features, h, w])?;
        for conv in &self.hidden[1..] {
            xs = conv.forward(&xs)?.f_relu_()?;
        }
        self.last.forward(&xs)
    }

    /// [`Fcomb::forward_samples`]'s decoding through [`fcomb_kernel`] where it applies:
    /// float32 on an AVX2 or AVX-512 CPU, outside autograd, at most
    /// [`fcomb_kernel::MAX_LANES`] lanes of channels. `None` leaves it to libtorch.
    fn decode_fused(
        &self,
        feature_part: &Tensor,
        latent_part: &Tensor,
    ) -> Result<Option<Tensor>, TchError> {
        let fits = feature_part.device() == Device::Cpu
            && feature_part.kind() == Kind::Float
            && !feature_part.requires_grad()
            && !latent_part.requires_grad();
        let Some(isa) = Isa::available().filter(|_| fits) else {
            return Ok(None);
        };
        let Ok(layers) = self.kernel_layers()? else {
            return Ok(None);
        };
        let (m, f, h, w) = feature_part.size4()?;
        let n = latent_part.size()[1];
        let classes = self.last.weight.size()[0];
        // Channels-last features are pixel-major already: no copy.
        let pixel_major = feature_part.f_permute([0, 2, 3, 1])?.f_contiguous()?;
        let latent = floats(latent_part)?;
        let logits = Tensor::f_empty([m, n, classes, h, w], (Kind::Float, Device::Cpu))?;
        // SAFETY: both are contiguous float32 CPU tensors of `numel` elements, held here
        // for the whole call: `pixel_major` is only read, and `logits`, made above, is
        // written by this call alone.
        let (features, out) = unsafe {
            (
                std::slice::from_raw_parts(
                    pixel_major.data_ptr() as *const f32,
                    pixel_major.numel(),
                ),
                std::slice::from_raw_parts_mut(logits.data_ptr() as *mut f32, logits.numel()),
            )
        };
        let dims = (m as usize, n as usize, (h * w) as usize);
        fcomb_kernel::decode(isa, &layers, features, &latent, dims, out)
            .map_err(|e| TchError::Shape(format!("fused fcomb on {f} channels: {e}")))?;
        Ok(Some(logits))
    }

    /// The layers after the first for [`fcomb_kernel`]; `Err` inside when they do not fit it.
    fn kernel_layers(&self) -> Result<Result<fcomb_kernel::Layers, fcomb_kernel::Unfit>, TchError> {
        let hidden = self.hidden[1..]
            .iter()
            .map(|conv| Ok((floats(&conv.weight)?, floats(&conv.bias)?)))
            .collect::<Result<Vec<_>, TchError>>()?;
        let (weight, bias) = (floats(&self.last.weight)?, floats(&self.last.bias)?);
        Ok(fcomb_kernel::Layers::new(
            self.features as usize,
            &hidden,
            (&weight, &bias),
        ))
    }

    /// Parameters of the hidden layers only: the seed's l2 term skips the last layer.
    pub fn hidden_parameters(&self) -> impl Iterator<Item = &Tensor> {
        self.hidden.iter().flat_map(Conv2d::parameters)
    }

    pub fn parameters(&self) -> impl Iterator<Item = &Tensor> {
        self.hidden_parameters().chain(self.last.parameters())
    }
}

/// A float32 copy of `t`'s values in row-major order of its logical shape.
fn floats(t: &Tensor) -> Result<Vec<f32>, TchError> {
    let flat = t
        .f_detach()?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?
        .f_view(-1)?;
    Vec::<f32>::try_from(&flat)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed's fcomb for one z per image: z tiled over the image and concatenated with
    /// the features, then every conv whole.
    fn tiled(fcomb: &Fcomb, features: &Tensor, z: &Tensor) -> Tensor {
        let size = features.size();
        let (b, l) = (z.size()[0], z.size()[1]);
        let z = z.view([b, l, 1, 1]).expand([b, l, size[2], size[3]], false);
        let mut xs = Tensor::cat(&[features.shallow_clone(), z], 1);
        for conv in &fcomb.hidden {
            xs = conv.forward(&xs).unwrap().relu();
        }
        fcomb.last.forward(&xs).unwrap()
    }

    #[test]
    fn chunks_cover_every_sample_once_in_order() {
        assert_eq!(
            chunk_plan(2, 6, 4),
            [[0, 1, 0, 4], [0, 1, 4, 2], [1, 1, 0, 4], [1, 1, 4, 2]]
        );
        assert_eq!(chunk_plan(5, 1, 4), [[0, 4, 0, 1], [4, 1, 0, 1]]);
        assert_eq!(
            chunk_plan(3, 2, 0),
            [
                [0, 1, 0, 1],
                [0, 1, 1, 1],
                [1, 1, 0, 1],
                [1, 1, 1, 1],
                [2, 1, 0, 1],
                [2, 1, 1, 1]
            ]
        );
    }

    #[test]
    fn chunked_samples_decode_as_the_seed_does_one_sample_at_a_time() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let fcomb = Fcomb::new(vs.root(), 32, 2, 4, 1).unwrap();
        // 2 MiB per sample of [32, 128, 128] float32: chunks of 4 samples, so 6 samples
        // per image split 4 + 2, and 5 images of one sample split 4 + 1.
        for (b, n) in [(2, 6), (5, 1)] {
            let features = Tensor::rand([b, 32, 128, 128], (Kind::Float, Device::Cpu));
            let z = Tensor::randn([b, n, 2], (Kind::Float, Device::Cpu));
            let all = tch::no_grad(|| fcomb.forward_samples(&features, &z)).unwrap();
            assert_eq!(all.size(), [b, n, 1, 128, 128]);
            for j in 0..n {
                let one = tch::no_grad(|| tiled(&fcomb, &features, &z.select(1, j)));
                let diff = (all.select(1, j) - one).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "b {b}, sample {j}: {diff}");
            }
        }
    }

    #[test]
    fn sampling_takes_the_fused_kernel_and_training_keeps_autograd() {
        tch::manual_seed(4);
        let vs = nn::VarStore::new(Device::Cpu);
        let fcomb = Fcomb::new(vs.root(), 32, 2, 4, 1).unwrap();
        // Channels-last, as the U-Net hands features over on AVX-512.
        let features =
            Tensor::rand([2, 16, 16, 32], (Kind::Float, Device::Cpu)).permute([0, 3, 1, 2]);
        let latent = Tensor::rand([2, 3, 32], (Kind::Float, Device::Cpu));
        let fused = tch::no_grad(|| fcomb.decode_fused(&features, &latent)).unwrap();
        assert_eq!(fused.is_some(), Isa::available().is_some());
        let training = features.set_requires_grad(true);
        assert!(fcomb.decode_fused(&training, &latent).unwrap().is_none());
        let z = Tensor::randn([2, 3, 2], (Kind::Float, Device::Cpu));
        let logits = fcomb.forward_samples(&training, &z).unwrap();
        assert!(logits.requires_grad());
        let sampled = tch::no_grad(|| fcomb.forward_samples(&features, &z)).unwrap();
        let diff = (logits.detach() - sampled).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "fused against libtorch: {diff}");
    }
}

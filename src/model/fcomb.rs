//! Fcomb: combines a latent sample with the U-Net features into logits through 1x1 convs.
use super::layers::{Conv2d, ConvInit};
use tch::{nn, Tensor};

#[derive(Debug)]
pub struct Fcomb {
    /// `fcomb_convs - 1` hidden 1x1 convs with ReLU; the first takes features and z.
    hidden: Vec<Conv2d>,
    last: Conv2d,
    features: i64,
}

impl Fcomb {
    pub fn new(p: nn::Path, features: i64, latent_dim: i64, convs: usize, classes: i64) -> Self {
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
            .collect();
        let last = Conv2d::new(
            &p / "last",
            features,
            classes,
            1,
            ConvInit::OrthogonalTruncated,
        );
        Self {
            hidden,
            last,
            features,
        }
    }

    /// Logits for one latent sample per image: `features` `[B, F, H, W]`, `z` `[B, L]`.
    pub fn forward(&self, features: &Tensor, z: &Tensor) -> Tensor {
        self.forward_samples(features, &z.unsqueeze(1))
            .squeeze_dim(1)
    }

    /// Logits for `n` samples per image without tiling z or repeating the features:
    /// the first conv splits as `W_f f + W_z z + b`, so `W_f f` is computed once per image
    /// and only the `[B, n, F]` latent part varies. (Training takes this path too: it
    /// skips concatenating a tiled z, and the features keep their channels-last layout.) `z` is `[B, n, L]`; the result is
    /// `[B, n, classes, H, W]`.
    pub fn forward_samples(&self, features: &Tensor, z: &Tensor) -> Tensor {
        let (b, n) = (z.size()[0], z.size()[1]);
        let (h, w) = (features.size()[2], features.size()[3]);
        let first = &self.hidden[0];
        let w_f = first
            .weight
            .narrow(1, 0, self.features)
            .to_kind(features.kind());
        let w_z = first
            .weight
            .narrow(1, self.features, z.size()[2])
            .flatten(1, -1);
        let feature_part = features.conv2d(&w_f, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1);
        let latent_part = (z.matmul(&w_z.tr()) + &first.bias).to_kind(features.kind());
        let mut xs = (feature_part.unsqueeze(1) + latent_part.unsqueeze(-1).unsqueeze(-1))
            .relu()
            .reshape([b * n, self.features, h, w]);
        for conv in &self.hidden[1..] {
            xs = conv.forward(&xs).relu();
        }
        let logits = self.last.forward(&xs);
        let classes = logits.size()[1];
        logits.reshape([b, n, classes, h, w])
    }

    /// Parameters of the hidden layers only: the seed's l2 term skips the last layer.
    pub fn hidden_parameters(&self) -> impl Iterator<Item = &Tensor> {
        self.hidden.iter().flat_map(Conv2d::parameters)
    }

    pub fn parameters(&self) -> impl Iterator<Item = &Tensor> {
        self.hidden_parameters().chain(self.last.parameters())
    }
}

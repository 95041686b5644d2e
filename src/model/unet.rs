//! The U-Net feature extractor and the encoder (its down path) shared with the prior and
//! posterior nets.
use super::layers::{Conv2d, ConvInit};
use tch::{nn, Device, TchError, Tensor};

/// Three 3x3 convolutions with ReLU, after an optional 2x2 average pool.
#[derive(Debug)]
struct DownBlock {
    pool: bool,
    convs: Vec<Conv2d>,
}

/// Convolutions per block, as in the seed.
pub const CONVS_PER_BLOCK: i64 = 3;

impl DownBlock {
    fn new(p: nn::Path, c_in: i64, c_out: i64, pool: bool) -> Result<Self, TchError> {
        let convs = (0..CONVS_PER_BLOCK)
            .map(|i| {
                let c_in = if i == 0 { c_in } else { c_out };
                Conv2d::new(&p / i, c_in, c_out, 3, ConvInit::KaimingTruncated)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { pool, convs })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        let xs = if self.pool {
            xs.f_avg_pool2d([2, 2], [2, 2], [0, 0], true, true, None::<i64>)?
        } else {
            xs.shallow_clone()
        };
        self.forward_from(xs, 0)
    }

    /// The block from its `first` conv on, `xs` being that conv's input.
    fn forward_from(&self, mut xs: Tensor, first: usize) -> Result<Tensor, TchError> {
        for conv in &self.convs[first..] {
            // In place: a convolution's backward needs its input, not its output, and
            // ReLU's needs only its result, so no fresh tensor is wanted here.
            xs = conv.forward_relu(&xs)?;
        }
        Ok(xs)
    }

    fn parameters(&self) -> impl Iterator<Item = &Tensor> {
        self.convs.iter().flat_map(Conv2d::parameters)
    }
}

/// The down path: one `DownBlock` per filter count, pooling before every block but the
/// first. Returns every level's output (the U-Net needs them as skips).
#[derive(Debug)]
pub struct Encoder {
    blocks: Vec<DownBlock>,
}

impl Encoder {
    pub fn new(p: nn::Path, input_channels: i64, filters: &[i64]) -> Result<Self, TchError> {
        let blocks = filters
            .iter()
            .enumerate()
            .map(|(i, &c_out)| {
                let c_in = if i == 0 {
                    input_channels
                } else {
                    filters[i - 1]
                };
                DownBlock::new(&p / i, c_in, c_out, i != 0)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { blocks })
    }

    /// Outputs of every level, finest first.
    pub fn forward_levels(&self, xs: &Tensor) -> Result<Vec<Tensor>, TchError> {
        let mut levels: Vec<Tensor> = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let next = block.forward(levels.last().unwrap_or(xs))?;
            levels.push(next);
        }
        Ok(levels)
    }

    /// The coarsest level's output.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        self.blocks
            .iter()
            .try_fold(xs.shallow_clone(), |xs, block| block.forward(&xs))
    }

    pub fn parameters(&self) -> impl Iterator<Item = &Tensor> {
        self.blocks.iter().flat_map(DownBlock::parameters)
    }

    pub fn convs(&self) -> impl Iterator<Item = &Conv2d> {
        self.blocks.iter().flat_map(|b| &b.convs)
    }
}

/// Bilinear x2 upsampling (align_corners), concatenation with the skip, then a `DownBlock`
/// without pooling.
///
/// On the CPU the concatenation is never built: the first conv over `[up, skip]` is the
/// sum of its two halves' convs, one over each, so the concatenation's copy and the
/// slicing of its gradient go. In PyTorch, a part of 2 images at 128x128 (64 + 32
/// channels in, 32 out) took 19 ms forward and backward that way against 31-32 with the
/// concatenation, at 64x64 14 against 17; a whole batch-5 forward and backward took
/// 494-507 ms against 503-523 (alternating, 2-core Zen 5, AVX-512, 2026-12-02). A GPU,
/// where nothing has measured it, keeps the concatenation.
#[derive(Debug)]
struct UpBlock {
    block: DownBlock,
}

impl UpBlock {
    fn new(p: nn::Path, c_in: i64, c_out: i64) -> Result<Self, TchError> {
        Ok(Self {
            block: DownBlock::new(p, c_in, c_out, false)?,
        })
    }

    fn forward(&self, xs: &Tensor, skip: &Tensor) -> Result<Tensor, TchError> {
        let (h, w) = (skip.size()[2], skip.size()[3]);
        let up = xs.f_upsample_bilinear2d([h, w], true, None, None)?;
        if up.device() != Device::Cpu {
            return self
                .block
                .forward(&Tensor::f_cat(&[up, skip.shallow_clone()], 1)?);
        }
        let first = self.block.convs[0].forward_split_relu(&up, skip)?;
        self.block.forward_from(first, 1)
    }
}

/// The U-Net without its last layer: full-resolution features with `filters[0]` channels.
#[derive(Debug)]
pub struct UNet {
    encoder: Encoder,
    up: Vec<UpBlock>,
}

impl UNet {
    pub fn new(p: nn::Path, input_channels: i64, filters: &[i64]) -> Result<Self, TchError> {
        let encoder = Encoder::new(&p / "down", input_channels, filters)?;
        let up_path = &p / "up";
        let up = (0..filters.len().saturating_sub(1))
            .rev()
            .enumerate()
            .map(|(k, i)| UpBlock::new(&up_path / k, filters[i + 1] + filters[i], filters[i]))
            .collect::<Result<_, _>>()?;
        Ok(Self { encoder, up })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        let mut levels = self.encoder.forward_levels(xs)?;
        #[expect(clippy::expect_used, reason = "ModelConfig::validate checks filters")]
        let mut out = levels.pop().expect("the encoder has at least one level");
        for (block, skip) in self.up.iter().zip(levels.iter().rev()) {
            out = block.forward(&out, skip)?;
        }
        Ok(out)
    }

    pub fn parameters(&self) -> impl Iterator<Item = &Tensor> {
        self.encoder
            .parameters()
            .chain(self.up.iter().flat_map(|u| u.block.parameters()))
    }

    pub fn convs(&self) -> impl Iterator<Item = &Conv2d> {
        self.encoder
            .convs()
            .chain(self.up.iter().flat_map(|u| &u.block.convs))
    }
}

//! Figure data: a grid of an image, its annotations and the model's samples, as shown in
//! TensorBoard during training and written by `probunet eval`.
use super::ScoreError;
use crate::tensorboard::{Image, ImageGrid};
use tch::{Device, Kind, Tensor};

/// One image of a figure, its tensors on any device: `image` `[C, H, W]` (the first channel
/// is shown), `masks` `[m, H, W]`, `probs` the `[n, H, W]` sample probabilities.
#[derive(Debug)]
pub struct FigureRow {
    pub image: Tensor,
    pub masks: Tensor,
    pub probs: Tensor,
}

/// A grid with one row per image: the input, every annotation, the first `shown` samples
/// (binarised at 0.5), the mean foreground probability over all samples and, with
/// `variance`, the per-pixel variance of the probabilities over the samples, times 4 (so
/// that white is the largest variance possible, half the samples at 0 and half at 1).
pub fn figure(rows: &[FigureRow], shown: i64, variance: bool) -> Result<Image, ScoreError> {
    let first = rows
        .first()
        .ok_or_else(|| ScoreError::Shapes("a figure needs at least one image".into()))?;
    let (m, h, w) = (
        first.masks.size()[0],
        first.image.size()[1] as usize,
        first.image.size()[2] as usize,
    );
    let shown = shown.min(first.probs.size()[0]);
    let cols = 1 + m + shown + 1 + i64::from(variance);
    let mut grid = ImageGrid::new(rows.len(), cols as usize, h, w)?;
    let tile = |t: &Tensor| {
        Vec::<f32>::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).reshape([-1]))
    };
    for (r, row) in rows.iter().enumerate() {
        if row.masks.size()[0] != m || row.probs.size()[0] < shown {
            return Err(ScoreError::Shapes(format!(
                "figure row {r}: {:?} masks and {:?} samples, the first row has {m} and {shown}",
                row.masks.size(),
                row.probs.size()
            )));
        }
        let probs = row.probs.to_device(Device::Cpu).to_kind(Kind::Float);
        grid.set_tile_f32(r, 0, &tile(&row.image.get(0))?)?;
        for a in 0..m {
            grid.set_tile_f32(r, 1 + a as usize, &tile(&row.masks.get(a))?)?;
        }
        for s in 0..shown {
            grid.set_tile_f32(r, (1 + m + s) as usize, &tile(&probs.get(s).gt(0.5))?)?;
        }
        let col = (1 + m + shown) as usize;
        grid.set_tile_f32(r, col, &tile(&probs.mean_dim(0, false, Kind::Float))?)?;
        if variance {
            let var = probs.var_dim(0, false, false) * 4.0;
            grid.set_tile_f32(r, col + 1, &tile(&var)?)?;
        }
    }
    Ok(grid.into_image())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_figure_row_has_input_annotations_samples_mean_and_variance() {
        let (h, w) = (8, 12);
        let image = Tensor::full([1, h, w], 0.5, (Kind::Float, Device::Cpu));
        let masks = Tensor::ones([4, h, w], (Kind::Uint8, Device::Cpu));
        // Two samples at 0 and two at 1: mean 1/2 and the largest variance, 1/4.
        let probs = Tensor::cat(
            &[
                Tensor::zeros([2, h, w], (Kind::Float, Device::Cpu)),
                Tensor::ones([2, h, w], (Kind::Float, Device::Cpu)),
            ],
            0,
        );
        let row = || FigureRow {
            image: image.shallow_clone(),
            masks: masks.shallow_clone(),
            probs: probs.shallow_clone(),
        };
        let picture = figure(&[row(), row()], 3, true).unwrap();
        let cols = 1 + 4 + 3 + 2;
        let gap = ImageGrid::SEPARATOR;
        assert_eq!(picture.width(), cols * w as usize + (cols - 1) * gap);
        assert_eq!(picture.height(), 2 * h as usize + gap);
        let pixel = |col: usize| picture.pixels()[col * (w as usize + gap)];
        assert_eq!(
            (0..cols).map(pixel).collect::<Vec<_>>(),
            [128, 255, 255, 255, 255, 0, 0, 255, 128, 255]
        );
        let without = figure(&[row()], 10, false).unwrap();
        assert_eq!(
            without.width(),
            10 * w as usize + 9 * gap,
            "4 samples, no variance"
        );
        assert!(figure(&[], 3, true).is_err());
    }
}

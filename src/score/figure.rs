//! The figure of an image, its annotations and the model's samples, as shown in
//! TensorBoard during training and written by `probunet eval`.
use super::ScoreError;
use crate::figure::{Colormap, ColourBar, Column, Tile, TileFigure, TileRow};
use crate::tensorboard::Image;
use tch::{Device, Kind, Tensor};

/// The largest per-pixel variance of probabilities in [0, 1]: half the samples at 0 and
/// half at 1. The variance colour bar spans [0, this].
pub const MAX_VARIANCE: f32 = 0.25;

/// One image of a figure, its tensors on any device: `image` `[C, H, W]` (the first channel
/// is shown), `masks` `[m, H, W]`, `probs` the `[n, H, W]` sample probabilities.
#[derive(Debug)]
pub struct FigureRow {
    /// The item's key and scores, drawn above the row.
    pub caption: String,
    pub image: Tensor,
    pub masks: Tensor,
    pub probs: Tensor,
}

/// A figure with one row per image, in labelled groups: the input; every reader's
/// annotation; the first `shown` samples (binarised at 0.5); the mean foreground
/// probability over all samples (viridis) and, with `variance`, the per-pixel variance of
/// the probabilities over the samples (magma), each with its colour bar.
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
    let tiles = rows
        .iter()
        .enumerate()
        .map(|(r, row)| {
            if row.masks.size()[0] != m || row.probs.size()[0] < shown {
                return Err(ScoreError::Shapes(format!(
                    "figure row {r}: {:?} masks and {:?} samples, the first row has {m} and {shown}",
                    row.masks.size(),
                    row.probs.size()
                )));
            }
            Ok(TileRow {
                caption: row.caption.clone(),
                tiles: row_tiles(row, shown, variance)?,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let figure = TileFigure {
        height: h,
        width: w,
        columns: columns(m, shown, variance),
        rows: tiles,
        bars: bars(variance),
    };
    Ok(figure.render()?)
}

fn columns(readers: i64, shown: i64, variance: bool) -> Vec<Column> {
    let column = |header: String, group: u8| Column { header, group };
    let mut columns = vec![column("input".into(), 0)];
    columns.extend((1..=readers).map(|a| column(format!("reader {a}"), 1)));
    columns.extend((1..=shown).map(|s| column(format!("sample {s}"), 2)));
    columns.push(column("mean p(fg)".into(), 3));
    if variance {
        columns.push(column("variance".into(), 3));
    }
    columns
}

fn bars(variance: bool) -> Vec<ColourBar> {
    let mut bars = vec![ColourBar {
        label: "p(fg)".into(),
        colormap: Colormap::Viridis,
        lo: 0.0,
        hi: 1.0,
    }];
    if variance {
        bars.push(ColourBar {
            label: "variance".into(),
            colormap: Colormap::Magma,
            lo: 0.0,
            hi: MAX_VARIANCE,
        });
    }
    bars
}

fn row_tiles(row: &FigureRow, shown: i64, variance: bool) -> Result<Vec<Tile>, ScoreError> {
    let values = |t: &Tensor| -> Result<Vec<f32>, ScoreError> {
        let flat = t
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .f_reshape([-1])?;
        Ok(Vec::<f32>::try_from(flat)?)
    };
    let map = |values: Vec<f32>, colormap: Colormap, hi: f32| Tile::Map {
        values,
        colormap,
        lo: 0.0,
        hi,
    };
    let probs = row.probs.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?;
    let mut tiles = vec![Tile::Grey(values(&row.image.f_get(0)?)?)];
    for a in 0..row.masks.size()[0] {
        tiles.push(Tile::Grey(values(&row.masks.f_get(a)?)?));
    }
    for s in 0..shown {
        tiles.push(Tile::Grey(values(&probs.f_get(s)?.f_gt(0.5)?)?));
    }
    let mean = probs.f_mean_dim(0, false, Kind::Float)?;
    tiles.push(map(values(&mean)?, Colormap::Viridis, 1.0));
    if variance {
        let var = probs.f_var_dim(0, false, false)?;
        tiles.push(map(values(&var)?, Colormap::Magma, MAX_VARIANCE));
    }
    Ok(tiles)
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
            caption: "item 3".into(),
            image: image.shallow_clone(),
            masks: masks.shallow_clone(),
            probs: probs.shallow_clone(),
        };
        let first = row_tiles(&row(), 3, true).unwrap();
        let firsts: Vec<f32> = first
            .iter()
            .map(|t| match t {
                Tile::Grey(v) | Tile::Map { values: v, .. } => v[0],
            })
            .collect();
        assert_eq!(firsts, [0.5, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.5, 0.25]);
        let headers: Vec<String> = columns(4, 3, true).into_iter().map(|c| c.header).collect();
        assert_eq!(headers[..2], ["input", "reader 1"]);
        assert_eq!(
            headers[5..],
            ["sample 1", "sample 2", "sample 3", "mean p(fg)", "variance"]
        );
        let picture = figure(&[row(), row()], 3, true).unwrap();
        let without = figure(&[row()], 10, false).unwrap();
        assert!(
            without.width() < picture.width(),
            "4 samples and no variance are narrower"
        );
        assert!(
            picture.height() > 2 * 128,
            "two rows of tiles of at least 128 pixels"
        );
        assert!(figure(&[], 3, true).is_err());
    }
}

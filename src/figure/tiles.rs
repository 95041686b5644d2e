//! A grid of labelled image tiles: a header per column, a caption per row, a wider gap
//! between groups of columns, and colour bars for the colormapped columns.
use super::canvas::{text_width, Anchor, Canvas};
use super::{Colormap, FigureError};
use crate::tensorboard::Image;

/// Tiles are scaled up by a whole factor to at least this many pixels a side, so that a
/// 64-pixel crop is not a thumbnail.
pub const MIN_TILE: usize = 128;
const PAD: usize = 12;
const GAP: usize = 4;
const GROUP_GAP: usize = 20;
const LINE: usize = 22;
const TEXT: f64 = 14.0;
const BAR_WIDTH: usize = 16;
const FRAME: [u8; 3] = [150, 150, 150];

/// One tile's pixels, row-major, `height x width` of the figure.
#[derive(Clone, Debug)]
pub enum Tile {
    /// Grey, 0 black and 1 white (inputs in [0, 1], binary masks).
    Grey(Vec<f32>),
    /// Through a colormap whose ends are `lo` and `hi`.
    Map {
        values: Vec<f32>,
        colormap: Colormap,
        lo: f32,
        hi: f32,
    },
}

impl Tile {
    fn values(&self) -> &[f32] {
        match self {
            Tile::Grey(v) | Tile::Map { values: v, .. } => v,
        }
    }

    fn colours(&self) -> Vec<[u8; 3]> {
        match self {
            Tile::Grey(v) => v
                .iter()
                .map(|&x| {
                    let g = (x.clamp(0.0, 1.0) * 255.0).round() as u8;
                    [g, g, g]
                })
                .collect(),
            Tile::Map {
                values,
                colormap,
                lo,
                hi,
            } => {
                let span = (hi - lo).max(f32::EPSILON);
                values
                    .iter()
                    .map(|&x| colormap.rgb((x - lo) / span))
                    .collect()
            }
        }
    }
}

/// A column's header and the group it belongs to: columns of one group sit close, and a
/// wider gap separates groups (input | annotations | samples | summaries).
#[derive(Clone, Debug)]
pub struct Column {
    pub header: String,
    pub group: u8,
}

#[derive(Clone, Debug)]
pub struct TileRow {
    /// Drawn above the row: the item's key and its scores.
    pub caption: String,
    pub tiles: Vec<Tile>,
}

/// A colour bar beside the grid, with its ends and middle labelled.
#[derive(Clone, Debug)]
pub struct ColourBar {
    pub label: String,
    pub colormap: Colormap,
    pub lo: f32,
    pub hi: f32,
}

/// Every row has one tile per column, each `height x width`.
#[derive(Clone, Debug)]
pub struct TileFigure {
    pub height: usize,
    pub width: usize,
    pub columns: Vec<Column>,
    pub rows: Vec<TileRow>,
    pub bars: Vec<ColourBar>,
}

/// Where everything goes, in pixels.
struct Layout {
    scale: usize,
    column_x: Vec<usize>,
    /// Each bar's x and the width its labels take.
    bar_x: Vec<usize>,
    width: usize,
    height: usize,
}

impl TileFigure {
    pub fn render(&self) -> Result<Image, FigureError> {
        self.check()?;
        let layout = self.layout()?;
        let mut canvas = Canvas::new(layout.width, layout.height)?;
        let (tw, th) = (self.width * layout.scale, self.height * layout.scale);
        for (column, &x) in self.columns.iter().zip(&layout.column_x) {
            canvas.text(&column.header, (x + tw / 2, PAD), TEXT, Anchor::TopCentre)?;
        }
        for (r, row) in self.rows.iter().enumerate() {
            let top = PAD + LINE + r * (LINE + th + GAP);
            canvas.text(&row.caption, (PAD, top + 3), TEXT, Anchor::TopLeft)?;
            for (tile, &x) in row.tiles.iter().zip(&layout.column_x) {
                // A frame, so that an all-white mask still shows as a tile.
                canvas.fill(x - 1, top + LINE - 1, tw + 2, th + 2, FRAME);
                canvas.blit(x, top + LINE, self.width, layout.scale, &tile.colours());
            }
        }
        for (bar, &x) in self.bars.iter().zip(&layout.bar_x) {
            draw_bar(&mut canvas, bar, x, PAD + 2 * LINE, th)?;
        }
        canvas.into_image()
    }

    fn check(&self) -> Result<(), FigureError> {
        let pixels = self.height.saturating_mul(self.width);
        if self.rows.is_empty() || self.columns.is_empty() || pixels == 0 {
            return Err(FigureError::Shape(
                "a figure needs a row, a column and pixels".into(),
            ));
        }
        for (r, row) in self.rows.iter().enumerate() {
            if row.tiles.len() != self.columns.len() {
                return Err(FigureError::Shape(format!(
                    "row {r} has {} tiles for {} columns",
                    row.tiles.len(),
                    self.columns.len()
                )));
            }
            if let Some(c) = row.tiles.iter().position(|t| t.values().len() != pixels) {
                return Err(FigureError::Shape(format!(
                    "row {r}, column {c}: {} values for a {}x{} tile",
                    row.tiles[c].values().len(),
                    self.height,
                    self.width
                )));
            }
        }
        Ok(())
    }

    fn layout(&self) -> Result<Layout, FigureError> {
        let side = self.height.min(self.width);
        let scale = MIN_TILE.div_ceil(side).clamp(1, 16);
        let tw = self.width * scale;
        let mut x = PAD;
        let mut column_x = Vec::with_capacity(self.columns.len());
        for (c, column) in self.columns.iter().enumerate() {
            if c > 0 {
                let same = self.columns[c - 1].group == column.group;
                x += tw + if same { GAP } else { GROUP_GAP };
            }
            column_x.push(x);
        }
        x += tw + GROUP_GAP;
        let mut bar_x = Vec::with_capacity(self.bars.len());
        for bar in &self.bars {
            bar_x.push(x);
            let ticks = ticks(bar)
                .iter()
                .map(|(_, t)| text_width(t, TEXT - 2.0))
                .collect::<Result<Vec<_>, _>>()?;
            let label = text_width(&bar.label, TEXT)?;
            let tick = ticks.into_iter().max().unwrap_or(0);
            x += label.max(BAR_WIDTH + 4 + tick) + GROUP_GAP;
        }
        let caption = self
            .rows
            .iter()
            .map(|r| text_width(&r.caption, TEXT))
            .collect::<Result<Vec<_>, _>>()?;
        let width = (x - GROUP_GAP + PAD).max(PAD * 2 + caption.into_iter().max().unwrap_or(0));
        let th = self.height * scale;
        let rows = self.rows.len();
        let height = PAD + LINE + rows * (LINE + th) + (rows - 1) * GAP + PAD;
        Ok(Layout {
            scale,
            column_x,
            bar_x,
            width,
            height,
        })
    }
}

/// The bar's ends and middle, as positions in [0, 1] from the bottom and their labels.
fn ticks(bar: &ColourBar) -> [(f32, String); 3] {
    let label = |v: f32| {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    };
    let mid = (bar.lo + bar.hi) / 2.0;
    [
        (0.0, label(bar.lo)),
        (0.5, label(mid)),
        (1.0, label(bar.hi)),
    ]
}

fn draw_bar(
    canvas: &mut Canvas,
    bar: &ColourBar,
    x: usize,
    top: usize,
    height: usize,
) -> Result<(), FigureError> {
    canvas.text(&bar.label, (x, top - LINE + 3), TEXT, Anchor::TopLeft)?;
    let steps = height.max(2);
    for i in 0..steps {
        let t = 1.0 - i as f32 / (steps - 1) as f32;
        canvas.fill(x, top + i, BAR_WIDTH, 1, bar.colormap.rgb(t));
    }
    for (t, text) in ticks(bar) {
        let y = top + ((1.0 - t) * (steps - 1) as f32).round() as usize;
        canvas.fill(x + BAR_WIDTH, y, 3, 1, [0, 0, 0]);
        canvas.text(
            &text,
            (x + BAR_WIDTH + 5, y),
            TEXT - 2.0,
            Anchor::MiddleLeft,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figure(rows: usize) -> TileFigure {
        let (h, w) = (8, 12);
        let columns = ["input", "reader 1", "sample 1", "mean"]
            .iter()
            .enumerate()
            .map(|(g, h)| Column {
                header: h.to_string(),
                group: g as u8,
            })
            .collect();
        let grey = |v: f32| Tile::Grey(vec![v; h * w]);
        let mean = Tile::Map {
            values: vec![1.0; h * w],
            colormap: Colormap::Viridis,
            lo: 0.0,
            hi: 1.0,
        };
        TileFigure {
            height: h,
            width: w,
            columns,
            rows: (0..rows)
                .map(|r| TileRow {
                    caption: format!("item {r}  GED 0.41"),
                    tiles: vec![grey(0.5), grey(1.0), grey(0.0), mean.clone()],
                })
                .collect(),
            bars: vec![ColourBar {
                label: "p(fg)".into(),
                colormap: Colormap::Viridis,
                lo: 0.0,
                hi: 1.0,
            }],
        }
    }

    #[test]
    fn tiles_are_scaled_to_128_pixels_and_groups_are_apart() {
        let f = figure(2);
        let layout = f.layout().unwrap();
        assert_eq!(layout.scale, 16, "8 pixels high -> 128");
        let tw = 12 * 16;
        let gaps: Vec<usize> = layout
            .column_x
            .windows(2)
            .map(|p| p[1] - p[0] - tw)
            .collect();
        assert_eq!(gaps, [GROUP_GAP; 3]);
        let image = f.render().unwrap();
        assert_eq!(
            (image.width(), image.height()),
            (layout.width, layout.height)
        );
        assert_eq!(image.height(), PAD + LINE + 2 * (LINE + 128) + GAP + PAD);
        // Tile pixels: the first row's input is mid grey, the mean is viridis' top.
        let pixel = |x: usize, y: usize| {
            let at = (y * image.width() + x) * 3;
            <[u8; 3]>::try_from(&image.pixels()[at..at + 3]).unwrap()
        };
        let y = PAD + 2 * LINE + 5;
        assert_eq!(pixel(layout.column_x[0] + 5, y), [128, 128, 128]);
        assert_eq!(pixel(layout.column_x[3] + 5, y), Colormap::Viridis.rgb(1.0));
        // Text was drawn: the header line above the tiles is not all white.
        let header: Vec<[u8; 3]> = (0..image.width())
            .flat_map(|x| (PAD..PAD + LINE).map(move |y| (x, y)))
            .map(|(x, y)| pixel(x, y))
            .collect();
        assert!(header.iter().any(|p| p[0] < 100), "headers drawn");
    }

    #[test]
    fn wrong_shapes_are_refused() {
        let mut f = figure(1);
        f.rows[0].tiles.pop();
        assert!(matches!(f.render(), Err(FigureError::Shape(m)) if m.contains("3 tiles for 4")));
        let mut f = figure(1);
        f.rows[0].tiles[1] = Tile::Grey(vec![0.0; 5]);
        assert!(matches!(f.render(), Err(FigureError::Shape(m)) if m.contains("column 1")));
        let mut f = figure(1);
        f.rows.clear();
        assert!(f.render().is_err());
    }
}

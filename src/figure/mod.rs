//! Labelled figures as PNG: tile grids of images, annotations and samples (eval,
//! validation, predict) and line or point charts (training curves, sweep summaries).
//!
//! Pixels are drawn here; text and charts by plotters into the same RGB buffer, with
//! DejaVu Sans embedded in the binary so that a figure looks the same on every machine,
//! fonts installed or not.
mod canvas;
mod chart;
mod colormap;
mod tiles;

pub use chart::{curves_figure, reference, sweep_figure, Panel, Series, SeriesStyle, SweepPanel};
pub use colormap::Colormap;
pub use tiles::{ColourBar, Column, Tile, TileFigure, TileRow};

/// Why a figure could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum FigureError {
    #[error("figure: {0}")]
    Shape(String),
    #[error("figure is {width}x{height} pixels, more than the {max} a side allowed")]
    TooLarge {
        width: usize,
        height: usize,
        max: usize,
    },
    #[error("drawing a figure: {0}")]
    Draw(String),
    #[error(transparent)]
    Image(#[from] crate::tensorboard::TensorboardError),
}

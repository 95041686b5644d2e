//! An RGB buffer that tiles are copied into and plotters draws text and charts onto.
use super::FigureError;
use crate::tensorboard::Image;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;
use std::sync::OnceLock;

/// DejaVu Sans (Bitstream Vera licence, assets/fonts/LICENSE-DejaVu.txt).
const DEJAVU_SANS: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// The family name plotters knows the embedded font by.
pub const FONT: &str = "sans-serif";

/// A side longer than this is refused: no figure needs it, and the buffer is sized by it.
pub const MAX_SIDE: usize = 16_384;

/// Registers the embedded font with plotters once per process.
pub fn font() -> Result<(), FigureError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU_SANS).is_ok()
    });
    match ok {
        true => Ok(()),
        false => Err(FigureError::Draw("the embedded font did not load".into())),
    }
}

pub fn draw_error(e: impl std::fmt::Display) -> FigureError {
    FigureError::Draw(e.to_string())
}

pub struct Canvas {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
}

/// Where a text's anchor point sits on it.
#[derive(Clone, Copy)]
pub enum Anchor {
    TopLeft,
    TopCentre,
    MiddleLeft,
}

impl Canvas {
    /// A white canvas.
    pub fn new(width: usize, height: usize) -> Result<Self, FigureError> {
        if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
            return Err(FigureError::TooLarge {
                width,
                height,
                max: MAX_SIDE,
            });
        }
        font()?;
        Ok(Canvas {
            width,
            height,
            rgb: vec![255; width * height * 3],
        })
    }

    pub fn fill(&mut self, x: usize, y: usize, w: usize, h: usize, colour: [u8; 3]) {
        for row in y..(y + h).min(self.height) {
            for col in x..(x + w).min(self.width) {
                let at = (row * self.width + col) * 3;
                self.rgb[at..at + 3].copy_from_slice(&colour);
            }
        }
    }

    /// Copies `colours` (`h x w`, row-major) at `(x, y)`, each pixel `scale x scale`.
    pub fn blit(&mut self, x: usize, y: usize, w: usize, scale: usize, colours: &[[u8; 3]]) {
        for (i, colour) in colours.iter().enumerate() {
            let (r, c) = (i / w, i % w);
            self.fill(x + c * scale, y + r * scale, scale, scale, *colour);
        }
    }

    pub fn text(
        &mut self,
        text: &str,
        (x, y): (usize, usize),
        size: f64,
        anchor: Anchor,
    ) -> Result<(), FigureError> {
        let pos = match anchor {
            Anchor::TopLeft => Pos::new(HPos::Left, VPos::Top),
            Anchor::TopCentre => Pos::new(HPos::Center, VPos::Top),
            Anchor::MiddleLeft => Pos::new(HPos::Left, VPos::Center),
        };
        let style = TextStyle::from((FONT, size).into_font())
            .color(&BLACK)
            .pos(pos);
        let area = self.area();
        area.draw_text(text, &style, (x as i32, y as i32))
            .map_err(draw_error)?;
        area.present().map_err(draw_error)
    }

    /// The whole canvas as a plotters drawing area, for charts.
    pub fn area(&mut self) -> DrawingArea<BitMapBackend<'_>, plotters::coord::Shift> {
        BitMapBackend::with_buffer(&mut self.rgb, (self.width as u32, self.height as u32))
            .into_drawing_area()
    }

    pub fn into_image(self) -> Result<Image, FigureError> {
        Ok(Image::rgb(self.height, self.width, self.rgb)?)
    }
}

/// The width in pixels `text` takes at `size`.
pub fn text_width(text: &str, size: f64) -> Result<usize, FigureError> {
    font()?;
    let font = (FONT, size).into_font();
    let (w, _) = font.box_size(text).map_err(draw_error)?;
    Ok(w as usize)
}

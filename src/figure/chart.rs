//! Charts side by side in one PNG: a run's training curves, and a sweep's best val GED
//! against each swept value.
use super::canvas::{draw_error, Canvas, FONT};
use super::FigureError;
use crate::tensorboard::Image;
use plotters::prelude::*;

const PANEL_WIDTH: usize = 480;
const PANEL_HEIGHT: usize = 360;
/// Tableau's first colours: distinguishable, and the ones matplotlib users know.
const PALETTE: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeriesStyle {
    Line,
    Points,
    /// A dashed black line: a reference such as the ideal model's GED.
    Reference,
}

#[derive(Clone, Debug)]
pub struct Series {
    /// Shown in the legend when a panel has more than one series.
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub style: SeriesStyle,
}

#[derive(Clone, Debug, Default)]
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Names of x = 0, 1, ...: a categorical axis (a sweep's values); empty for numbers.
    pub categories: Vec<String>,
    pub series: Vec<Series>,
}

/// One panel per swept axis: each trial's value of it and its best val GED.
#[derive(Clone, Debug)]
pub struct SweepPanel {
    pub axis: String,
    /// The axis's values in the sweep's order, as written in its spec.
    pub values: Vec<String>,
    /// (index into `values`, best val GED) per trial that has one.
    pub trials: Vec<(usize, f64)>,
}

/// Training curves, one panel each, side by side.
pub fn curves_figure(panels: &[Panel]) -> Result<Image, FigureError> {
    draw_panels(panels)
}

/// Best val GED against each swept value, trials as points, the mean per value as a
/// line and the ideal model's GED, when the data has one, as a dashed line.
pub fn sweep_figure(panels: &[SweepPanel], ideal: Option<f64>) -> Result<Image, FigureError> {
    let panels: Vec<Panel> = panels.iter().map(|p| sweep_panel(p, ideal)).collect();
    draw_panels(&panels)
}

fn sweep_panel(p: &SweepPanel, ideal: Option<f64>) -> Panel {
    let trials: Vec<(f64, f64)> = p.trials.iter().map(|&(i, g)| (i as f64, g)).collect();
    let means: Vec<(f64, f64)> = (0..p.values.len())
        .filter_map(|i| {
            let g: Vec<f64> = p
                .trials
                .iter()
                .filter(|t| t.0 == i && t.1.is_finite())
                .map(|t| t.1)
                .collect();
            (!g.is_empty()).then(|| (i as f64, g.iter().sum::<f64>() / g.len() as f64))
        })
        .collect();
    let mut series = vec![
        Series {
            name: "trials".into(),
            points: trials,
            style: SeriesStyle::Points,
        },
        Series {
            name: "mean".into(),
            points: means,
            style: SeriesStyle::Line,
        },
    ];
    if let Some(ideal) = ideal {
        let last = p.values.len().saturating_sub(1) as f64;
        series.push(reference("ideal model", ideal, -0.5, last + 0.5));
    }
    Panel {
        title: format!("best val GED by {}", p.axis),
        x_label: p.axis.clone(),
        y_label: "best val GED".into(),
        categories: p.values.clone(),
        series,
    }
}

/// A horizontal reference line from `x0` to `x1`.
pub fn reference(name: &str, y: f64, x0: f64, x1: f64) -> Series {
    Series {
        name: name.into(),
        points: vec![(x0, y), (x1, y)],
        style: SeriesStyle::Reference,
    }
}

fn draw_panels(panels: &[Panel]) -> Result<Image, FigureError> {
    if panels.is_empty() {
        return Err(FigureError::Shape("a chart needs a panel".into()));
    }
    let mut canvas = Canvas::new(PANEL_WIDTH * panels.len(), PANEL_HEIGHT)?;
    {
        let root = canvas.area();
        root.fill(&WHITE).map_err(draw_error)?;
        for (panel, area) in panels.iter().zip(root.split_evenly((1, panels.len()))) {
            draw_panel(panel, &root, &area)?;
        }
        root.present().map_err(draw_error)?;
    }
    canvas.into_image()
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// The data's extent with a margin; a categorical axis spans its categories.
fn ranges(panel: &Panel) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let finite = || {
        panel
            .series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    };
    let extent = |values: Vec<f64>| {
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        match (lo.is_finite(), hi > lo) {
            (false, _) => (0.0, 1.0),
            (true, false) => (lo - 0.5, lo + 0.5),
            (true, true) => (lo, hi),
        }
    };
    let (y0, y1) = extent(finite().map(|p| p.1).collect());
    let margin = (y1 - y0) * 0.08;
    let x = match panel.categories.len() {
        0 => {
            let (x0, x1) = extent(finite().map(|p| p.0).collect());
            x0..x1
        }
        n => -0.5..n as f64 - 0.5,
    };
    (x, y0 - margin..y1 + margin)
}

fn draw_panel(panel: &Panel, root: &Area, area: &Area) -> Result<(), FigureError> {
    let (xs, ys) = ranges(panel);
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FONT, 17))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(xs, ys)
        .map_err(draw_error)?;
    let categorical = !panel.categories.is_empty();
    chart
        .configure_mesh()
        .x_desc(panel.x_label.as_str())
        .y_desc(panel.y_label.as_str())
        .label_style((FONT, 13))
        .axis_desc_style((FONT, 14))
        .x_labels(if categorical { 0 } else { 6 })
        .y_labels(6)
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .light_line_style(RGBColor(245, 245, 245))
        .draw()
        .map_err(draw_error)?;
    for (i, s) in panel.series.iter().enumerate() {
        draw_series(&mut chart, s, PALETTE[i % PALETTE.len()])?;
    }
    if categorical {
        let y = chart.y_range().start;
        for (i, name) in panel.categories.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(i as f64, y));
            let style = TextStyle::from((FONT, 13).into_font()).pos(
                plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Center,
                    plotters::style::text_anchor::VPos::Top,
                ),
            );
            root.draw_text(name, &style, (x, y + 6))
                .map_err(draw_error)?;
        }
    }
    if panel.series.len() > 1 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 13))
            .border_style(BLACK)
            .background_style(WHITE.mix(0.85))
            .draw()
            .map_err(draw_error)?;
    }
    Ok(())
}

/// A tick label: whole numbers without a fraction, others to at most four places.
fn tick(v: &f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        return format!("{}", *v as i64);
    }
    let s = format!("{v:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

type Chart<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

fn draw_series(chart: &mut Chart, s: &Series, colour: RGBColor) -> Result<(), FigureError> {
    let points: Vec<(f64, f64)> = s
        .points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let name = s.name.as_str();
    let line = move |style: ShapeStyle| {
        move |(x, y): (i32, i32)| PathElement::new(vec![(x, y), (x + 18, y)], style)
    };
    match s.style {
        SeriesStyle::Line => {
            let style = colour.stroke_width(2);
            chart
                .draw_series(LineSeries::new(points, style))
                .map_err(draw_error)?
                .label(name)
                .legend(line(style));
        }
        SeriesStyle::Points => {
            let style = colour.mix(0.8).filled();
            chart
                .draw_series(points.into_iter().map(|p| Circle::new(p, 4, style)))
                .map_err(draw_error)?
                .label(name)
                .legend(move |(x, y)| Circle::new((x + 9, y), 4, style));
        }
        SeriesStyle::Reference => {
            let style = BLACK.stroke_width(2);
            chart
                .draw_series(DashedLineSeries::new(points, 8, 5, style))
                .map_err(draw_error)?
                .label(name)
                .legend(line(style));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dark_pixels(image: &Image) -> usize {
        image
            .pixels()
            .chunks(3)
            .filter(|p| p[0] < 60 && p[1] < 60 && p[2] < 60)
            .count()
    }

    #[test]
    fn ticks_drop_needless_zeros() {
        let ticks: Vec<String> = [20.0, -500.0, 0.25, 1e-5, 0.1234567]
            .iter()
            .map(tick)
            .collect();
        assert_eq!(ticks, ["20", "-500", "0.25", "0", "0.1235"]);
    }

    #[test]
    fn curves_draw_panels_side_by_side() {
        let line = Series {
            name: "train ELBO".into(),
            points: (0..50)
                .map(|i| (i as f64 * 10.0, (i as f64).sqrt()))
                .collect(),
            style: SeriesStyle::Line,
        };
        let panel = Panel {
            title: "ELBO".into(),
            x_label: "step".into(),
            y_label: "nats".into(),
            series: vec![line.clone(), reference("ideal", 3.0, 0.0, 490.0)],
            ..Panel::default()
        };
        let empty = Panel {
            title: "no data yet".into(),
            ..Panel::default()
        };
        let image = curves_figure(&[panel, empty]).unwrap();
        assert_eq!(
            (image.width(), image.height()),
            (2 * PANEL_WIDTH, PANEL_HEIGHT)
        );
        assert!(
            dark_pixels(&image) > 500,
            "axes, text and the dashed line are drawn"
        );
        assert!(curves_figure(&[]).is_err());
    }

    #[test]
    fn a_sweep_panel_has_trials_means_and_the_ideal() {
        let p = SweepPanel {
            axis: "model.beta".into(),
            values: vec!["0.1".into(), "1".into(), "10".into()],
            trials: vec![(0, 0.5), (0, 0.7), (2, 0.3), (1, f64::NAN)],
        };
        let panel = sweep_panel(&p, Some(0.2));
        let means = &panel.series[1].points;
        assert_eq!(means.len(), 2, "no finite trial at beta=1: {means:?}");
        assert_eq!(means[0].0, 0.0);
        assert!((means[0].1 - 0.6).abs() < 1e-12);
        assert_eq!(means[1], (2.0, 0.3));
        assert_eq!(panel.series[2].points, [(-0.5, 0.2), (2.5, 0.2)]);
        let image = sweep_figure(&[p.clone(), p], Some(0.2)).unwrap();
        assert_eq!(image.width(), 2 * PANEL_WIDTH);
    }
}

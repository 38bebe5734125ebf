//! Plots as PNG and SVG (plotters; the PNG text uses the bundled DejaVu Sans, so no system fonts
//! are needed) and image montages.

use std::path::Path;
use std::sync::Once;

use crate::error::{Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, bytes);
    });
}

/// One named series of (x, y) points.
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points in x order.
    pub points: Vec<(f64, f64)>,
}

const WIDTH: u32 = 900;
const HEIGHT: u32 = 560;

fn palette(i: usize) -> RGBColor {
    const C: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    C[i % C.len()]
}

fn bounds(series: &[Series]) -> ((f64, f64), (f64, f64)) {
    let pts = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return ((0.0, 1.0), (0.0, 1.0));
    }
    let pad = |a: f64, b: f64| {
        let d = (b - a).abs().max(1e-6) * 0.06;
        (a - d, b + d)
    };
    (pad(x0, x1), pad(y0, y1))
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    lines: bool,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)
        .map_err(|e| crate::error::LabError::Message(format!("{e:?}")))?;
    let ((x0, x1), (y0, y1)) = bounds(series);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| crate::error::LabError::Message(format!("{e:?}")))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| crate::error::LabError::Message(format!("{e:?}")))?;
    for (i, s) in series.iter().enumerate() {
        let color = palette(i);
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        let style = ShapeStyle::from(&color).filled();
        if lines {
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| crate::error::LabError::Message(format!("{e:?}")))?
                .label(s.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, style)))
                .map_err(|e| crate::error::LabError::Message(format!("{e:?}")))?;
        } else {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 6, style)))
                .map_err(|e| crate::error::LabError::Message(format!("{e:?}")))?
                .label(s.label.clone())
                .legend(move |(x, y)| Circle::new((x + 9, y), 5, style));
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| crate::error::LabError::Message(format!("{e:?}")))?;
    root.present()
        .map_err(|e| crate::error::LabError::Message(format!("{e:?}")))?;
    Ok(())
}

/// Draws `draw` once into `<stem>.png` and once into `<stem>.svg`.
fn png_and_svg(
    stem: &Path,
    draw: impl Fn(DrawingArea<BitMapBackend<'_>, Shift>) -> Result<()>,
    draw_svg: impl Fn(DrawingArea<SVGBackend<'_>, Shift>) -> Result<()>,
) -> Result<()> {
    register_font();
    if let Some(dir) = stem.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    draw(BitMapBackend::new(&png, (WIDTH, HEIGHT)).into_drawing_area())
        .with_context(|| format!("drawing {}", png.display()))?;
    draw_svg(SVGBackend::new(&svg, (WIDTH, HEIGHT)).into_drawing_area())
        .with_context(|| format!("drawing {}", svg.display()))?;
    Ok(())
}

/// Writes `<stem>.png` and `<stem>.svg`: lines (`lines = true`) or a scatter.
pub fn chart(
    stem: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    lines: bool,
) -> Result<()> {
    png_and_svg(
        stem,
        |root| draw(root, title, x_label, y_label, series, lines),
        |root| draw(root, title, x_label, y_label, series, lines),
    )
}

/// A point with its 95% confidence half-widths on both axes.
#[derive(Clone, Debug)]
pub struct ErrPoint {
    /// x and its half-width.
    pub x: (f64, f64),
    /// y and its half-width.
    pub y: (f64, f64),
    /// Shown next to the point.
    pub label: String,
}

/// Points of one family (MJP by ratio, DP by noise level, ...), joined in order when `joined`.
#[derive(Clone, Debug)]
pub struct ErrSeries {
    /// Legend label.
    pub label: String,
    /// The points, in the order they are joined.
    pub points: Vec<ErrPoint>,
    /// Whether a line joins them.
    pub joined: bool,
}

fn draw_frontier<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[ErrSeries],
    x_marker: Option<(f64, &str)>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: &dyn std::fmt::Debug| crate::error::LabError::Message(format!("{e:?}"));
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut extent: Vec<Series> = series
        .iter()
        .map(|s| Series {
            label: String::new(),
            points: s
                .points
                .iter()
                .flat_map(|p| {
                    [
                        (p.x.0 - p.x.1, p.y.0 - p.y.1),
                        (p.x.0 + p.x.1, p.y.0 + p.y.1),
                    ]
                })
                .collect(),
        })
        .collect();
    if let Some((x, _)) = x_marker {
        let y = extent
            .iter()
            .flat_map(|s| s.points.first())
            .map(|p| p.1)
            .next()
            .unwrap_or(0.0);
        extent.push(Series {
            label: String::new(),
            points: vec![(x, y)],
        });
    }
    let ((x0, x1), (y0, y1)) = bounds(&extent);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    if let Some((x, label)) = x_marker {
        let grey = RGBColor(120, 120, 120);
        chart
            .draw_series(LineSeries::new(
                vec![(x, y0), (x, y1)],
                grey.stroke_width(1),
            ))
            .map_err(|e| err(&e))?
            .label(label.to_string())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], grey.stroke_width(1))
            });
    }
    for (i, s) in series.iter().enumerate() {
        let color = palette(i);
        let style = ShapeStyle::from(&color).filled();
        let pts: Vec<(f64, f64)> = s.points.iter().map(|p| (p.x.0, p.y.0)).collect();
        if s.joined && pts.len() > 1 {
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?;
        }
        chart
            .draw_series(s.points.iter().map(|p| {
                ErrorBar::new_vertical(
                    p.x.0,
                    p.y.0 - p.y.1,
                    p.y.0,
                    p.y.0 + p.y.1,
                    color.stroke_width(1),
                    8,
                )
            }))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(s.points.iter().map(|p| {
                ErrorBar::new_horizontal(
                    p.y.0,
                    p.x.0 - p.x.1,
                    p.x.0,
                    p.x.0 + p.x.1,
                    color.stroke_width(1),
                    8,
                )
            }))
            .map_err(|e| err(&e))?;
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 5, style)))
            .map_err(|e| err(&e))?
            .label(s.label.clone())
            .legend(move |(x, y)| Circle::new((x + 9, y), 5, style));
        chart
            .draw_series(s.points.iter().map(|p| {
                Text::new(
                    p.label.clone(),
                    (p.x.0, p.y.0),
                    ("sans-serif", 12).into_font().color(&color),
                )
            }))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Writes `<stem>.png` and `<stem>.svg`: points with 95% CI bars on both axes, each family
/// joined in order where it asks to be, and an optional vertical reference line.
pub fn frontier(
    stem: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[ErrSeries],
    x_marker: Option<(f64, &str)>,
) -> Result<()> {
    png_and_svg(
        stem,
        |root| draw_frontier(root, title, x_label, y_label, series, x_marker),
        |root| draw_frontier(root, title, x_label, y_label, series, x_marker),
    )
}

/// Stacks PNG images vertically, each with a caption to its left, into one PNG.
pub fn montage(out: &Path, rows: &[(String, std::path::PathBuf)]) -> Result<()> {
    register_font();
    let images: Vec<(String, image::RgbImage)> = rows
        .iter()
        .filter_map(|(label, p)| image::open(p).ok().map(|i| (label.clone(), i.to_rgb8())))
        .collect();
    if images.is_empty() {
        return Ok(());
    }
    let label_w = 240u32;
    let w = label_w + images.iter().map(|(_, i)| i.width()).max().unwrap_or(1);
    let h: u32 = images.iter().map(|(_, i)| i.height() + 6).sum();
    let mut canvas = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    let mut y = 0;
    let mut captions = Vec::new();
    for (label, img) in &images {
        image::imageops::overlay(&mut canvas, img, i64::from(label_w), i64::from(y));
        captions.push((label.clone(), y + img.height() / 2));
        y += img.height() + 6;
    }
    {
        let root = BitMapBackend::with_buffer(canvas.as_mut(), (w, h)).into_drawing_area();
        for (label, cy) in &captions {
            root.draw(&Text::new(
                label.clone(),
                (6, *cy as i32 - 8),
                ("sans-serif", 16).into_font().color(&BLACK),
            ))
            .map_err(|e| crate::error::LabError::Message(format!("{e:?}")))?;
        }
        root.present()
            .map_err(|e| crate::error::LabError::Message(format!("{e:?}")))?;
    }
    canvas
        .save(out)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

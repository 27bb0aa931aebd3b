//! The inter-arrival plot of a probe run, as the seed paper's Figure 6 draws it: the time
//! between consecutive replies (ms, y) against the time since the first probe (s, x). A
//! steady run is a flat line at the probe interval; each driver restart is a spike whose
//! height is the outage. Marks (crashes) are vertical red lines, the outage threshold a
//! dashed horizontal line.
//!
//! Drawn with `plotters` and only its SVG backend: no fonts are loaded (text is emitted as
//! SVG `<text>` and laid out by the viewer), so it builds and runs anywhere.

use std::path::Path;

use plotters::prelude::*;

use crate::probe::ProbeReport;

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// plotters failed to draw.
    #[error("Drawing failed: {0}")]
    Draw(String),
    /// Writing the file failed.
    #[error("Cannot write {path}")]
    Write {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn draw_err(e: impl std::fmt::Display) -> PlotError {
    PlotError::Draw(e.to_string())
}

/// Picture size in pixels.
const SIZE: (u32, u32) = (1000, 500);
/// Room above the highest point (for the mark labels and the legend), as a factor.
const HEADROOM: f64 = 1.5;
/// Room the legend takes from the right edge, in pixels.
const LEGEND_WIDTH: i32 = 230;
/// Marks beyond this many are drawn without their labels (they would overlap).
const MAX_LABELLED_MARKS: usize = 20;

/// The plot of `report` as an SVG document.
pub fn render_svg(report: &ProbeReport) -> Result<String, PlotError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        draw(report, &root)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// Writes the plot of `report` to `path` as SVG.
pub fn write_svg(report: &ProbeReport, path: &Path) -> Result<(), PlotError> {
    let svg = render_svg(report)?;
    std::fs::write(path, svg).map_err(|source| PlotError::Write {
        path: path.display().to_string(),
        source,
    })
}

fn draw<DB: DrawingBackend>(
    report: &ProbeReport,
    root: &DrawingArea<DB, plotters::coord::Shift>,
) -> Result<(), PlotError>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(draw_err)?;
    let points = report.inter_arrivals();
    let x_max = points
        .iter()
        .map(|p| p.0)
        .chain(report.marks.iter().map(|m| m.t_s))
        .fold(report.duration_s, f64::max)
        .max(0.001);
    let y_top = points
        .iter()
        .map(|p| p.1)
        .chain(report.outages.iter().map(|o| o.duration_ms))
        .fold(report.run.threshold_ms, f64::max)
        .max(1.0)
        * HEADROOM;
    let title = format!(
        "Reply inter-arrival, {} probes/s ({}), {} outage(s), {} of {} probes lost",
        report.run.rate,
        report.run.mode,
        report.outages.len(),
        report.lost,
        report.sent
    );
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0f64..x_max, 0f64..y_top)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("time since start (s)")
        .y_desc("inter-arrival time (ms)")
        .light_line_style(WHITE)
        .draw()
        .map_err(draw_err)?;

    let threshold = report.run.threshold_ms;
    chart
        .draw_series(DashedLineSeries::new(
            [(0.0, threshold), (x_max, threshold)],
            6,
            4,
            ShapeStyle::from(&BLACK.mix(0.5)).stroke_width(1),
        ))
        .map_err(draw_err)?
        .label(format!("outage threshold {threshold:.1} ms"))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.5)));

    for (i, m) in report.marks.iter().enumerate() {
        let series = chart
            .draw_series(LineSeries::new(
                [(m.t_s, 0.0), (m.t_s, y_top)],
                RED.mix(0.6),
            ))
            .map_err(draw_err)?;
        if i == 0 {
            series
                .label("marks (crashes)")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED));
        }
        if report.marks.len() <= MAX_LABELLED_MARKS {
            chart
                .draw_series(std::iter::once(Text::new(
                    m.label.clone(),
                    (m.t_s, y_top * 0.97),
                    ("sans-serif", 12).into_font().color(&RED),
                )))
                .map_err(draw_err)?;
        }
    }

    chart
        .draw_series(LineSeries::new(steps(&points), BLUE.stroke_width(1)))
        .map_err(draw_err)?
        .label("reply inter-arrival")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
    // The outages' peaks, so a spike one interval wide is not lost at this scale.
    chart
        .draw_series(
            points
                .iter()
                .filter(|p| p.1 > threshold)
                .map(|&p| Circle::new(p, 3, BLUE.filled())),
        )
        .map_err(draw_err)?;

    let (width, _) = chart.plotting_area().dim_in_pixel();
    let legend_x = i32::try_from(width).unwrap_or(0) - LEGEND_WIDTH;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        // Top right, below the row of mark labels, in the headroom above the highest spike.
        .position(SeriesLabelPosition::Coordinate(legend_x, 24))
        .draw()
        .map_err(draw_err)?;
    Ok(())
}

/// The series as steps that change at each arrival: a reply's inter-arrival is drawn from
/// the moment it arrives, so an outage is a vertical spike where it ends (as in the seed
/// paper's figure), not a ramp across the silence that joining the points would draw.
fn steps(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(points.len() * 2);
    for (i, &(t, y)) in points.iter().enumerate() {
        if let Some(&(_, prev)) = i.checked_sub(1).and_then(|j| points.get(j)) {
            out.push((t, prev));
        }
        out.push((t, y));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{Mark, ProbeRecord, RunCounters, RunInfo};

    fn report(with_marks: usize) -> ProbeReport {
        let probes = (0..400u64)
            .map(|i| {
                let sent = i as f64 * 0.005;
                let lost = (100..160).contains(&i);
                ProbeRecord {
                    index: i,
                    sent_s: sent,
                    reply_s: (!lost).then_some(sent + 0.001),
                }
            })
            .collect();
        let marks = (0..with_marks)
            .map(|i| Mark {
                label: format!("crash {i}"),
                t_s: 0.5 + i as f64 * 0.01,
            })
            .collect();
        let run = RunInfo {
            mode: "icmp".into(),
            rate: 200.0,
            threshold_ms: 15.0,
            ..RunInfo::default()
        };
        ProbeReport::analyze(run, probes, marks, RunCounters::default(), 2.0, 0.015)
    }

    #[test]
    fn svg_has_axes_series_and_marks() {
        let svg = render_svg(&report(1)).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.contains("<polyline"));
        assert!(svg.contains("inter-arrival time (ms)"));
        assert!(svg.contains("time since start (s)"));
        assert!(svg.contains("crash 0"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn steps_jump_at_each_arrival() {
        let s = steps(&[(1.0, 5.0), (2.0, 300.0), (2.005, 5.0)]);
        assert_eq!(
            s,
            [
                (1.0, 5.0),
                (2.0, 5.0),
                (2.0, 300.0),
                (2.005, 300.0),
                (2.005, 5.0)
            ]
        );
        assert!(steps(&[]).is_empty());
    }

    #[test]
    fn many_marks_lose_their_labels_and_empty_reports_still_draw() {
        let svg = render_svg(&report(MAX_LABELLED_MARKS + 1)).unwrap();
        assert!(!svg.contains("crash 3<"));
        let svg = render_svg(&ProbeReport::default()).unwrap();
        assert!(svg.contains("<svg"));
    }
}

//! Hand-written SVG of mean quality against mean cost per call, one file per split.
//!
//! Every router except the single models and `random` is drawn as a polyline with markers across
//! the sweep (w_quality from 0 to 1). `random` gets markers only, because it ignores the
//! preference. Single models are grey squares with their names. The cost axis is logarithmic
//! when the plotted costs span more than two decades.

use std::fmt::Write as _;

use super::{EvalReport, EvalRow};

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 600.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 260.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 70.0;

/// Line colours of the sweep routers, in legend order (Tableau 10).
const COLOURS: [&str; 10] = [
    "#d62728", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#bcbd22", "#7f7f7f",
];

/// Escapes text for an SVG text node or attribute.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Mapping from data to pixels on one axis.
struct Axis {
    min: f64,
    max: f64,
    log: bool,
    from: f64,
    to: f64,
}

impl Axis {
    fn position(&self, value: f64) -> f64 {
        let (value, min, max) = if self.log {
            (
                value.max(self.min).log10(),
                self.min.log10(),
                self.max.log10(),
            )
        } else {
            (value, self.min, self.max)
        };
        let span = if max > min { max - min } else { 1.0 };
        self.from + (value - min) / span * (self.to - self.from)
    }

    /// Tick values: every decade for a log axis, about five round steps otherwise.
    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let first = self.min.log10().floor() as i32;
            let last = self.max.log10().ceil() as i32;
            return (first..=last)
                .map(|exponent| 10f64.powi(exponent))
                .filter(|tick| *tick >= self.min * 0.999 && *tick <= self.max * 1.001)
                .collect();
        }
        let span = (self.max - self.min).max(f64::MIN_POSITIVE);
        let raw = span / 5.0;
        let magnitude = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * magnitude)
            .find(|step| *step >= raw)
            .unwrap_or(magnitude * 10.0);
        let mut tick = (self.min / step).ceil() * step;
        let mut ticks = Vec::new();
        while tick <= self.max + step * 1e-9 {
            ticks.push(tick);
            tick += step;
        }
        ticks
    }
}

fn format_tick(value: f64, log: bool) -> String {
    if log {
        format!("{value:.0e}")
    } else if value == 0.0 {
        "0".to_string()
    } else if value.abs() < 0.01 {
        format!("{value:.1e}")
    } else {
        format!("{value:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

/// Renders the quality-vs-cost plot of one split (`"id"` or `"ood"`) as a standalone SVG.
pub fn render_svg(report: &EvalReport, split: &str) -> String {
    let rows: Vec<&EvalRow> = report
        .rows
        .iter()
        .filter(|row| row.split == split)
        .collect();
    let positive_costs: Vec<f64> = rows
        .iter()
        .map(|row| row.mean_cost)
        .filter(|c| *c > 0.0)
        .collect();
    let cost_min = positive_costs.iter().copied().fold(f64::INFINITY, f64::min);
    let cost_max = rows.iter().map(|row| row.mean_cost).fold(0.0, f64::max);
    let log = cost_min.is_finite() && cost_max / cost_min > 100.0;
    let (x_min, x_max) = if log {
        (
            10f64.powf(cost_min.log10().floor()),
            10f64.powf(cost_max.log10().ceil()),
        )
    } else {
        (0.0, if cost_max > 0.0 { cost_max * 1.05 } else { 1.0 })
    };
    let quality_min = rows
        .iter()
        .map(|row| row.mean_quality)
        .fold(f64::INFINITY, f64::min);
    let quality_max = rows
        .iter()
        .map(|row| row.mean_quality)
        .fold(f64::NEG_INFINITY, f64::max);
    let (y_min, y_max) = if quality_min.is_finite() {
        (
            (quality_min * 10.0).floor() / 10.0,
            ((quality_max * 10.0).ceil() / 10.0).max(quality_min + 0.1),
        )
    } else {
        (0.0, 1.0)
    };
    let x_axis = Axis {
        min: x_min,
        max: x_max,
        log,
        from: LEFT,
        to: WIDTH - RIGHT,
    };
    let y_axis = Axis {
        min: y_min,
        max: y_max,
        log: false,
        from: HEIGHT - BOTTOM,
        to: TOP,
    };

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let estimate = if report.costs_are_estimates {
        ", costs ESTIMATED"
    } else {
        ""
    };
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="28" font-size="16" font-weight="bold">{} · {split} split · quality vs cost{estimate}</text>"#,
        escape(&report.dataset)
    );
    write_axes(&mut svg, &x_axis, &y_axis, report.costs_are_estimates);

    // Single models first, so router lines draw on top of them.
    for row in rows
        .iter()
        .filter(|row| row.router.starts_with("single:") && row.w_quality == 1.0)
    {
        let (x, y) = (
            x_axis.position(row.mean_cost),
            y_axis.position(row.mean_quality),
        );
        let _ = writeln!(
            svg,
            r##"<rect x="{:.1}" y="{:.1}" width="8" height="8" fill="#999"/><text x="{:.1}" y="{:.1}" font-size="10" fill="#555" stroke="white" stroke-width="3" paint-order="stroke">{}</text>"##,
            x - 4.0,
            y - 4.0,
            x + 7.0,
            y + 4.0,
            escape(row.router.trim_start_matches("single:"))
        );
    }
    let sweep_routers: Vec<String> = report
        .router_ids()
        .into_iter()
        .filter(|id| !id.starts_with("single:") && rows.iter().any(|row| &row.router == id))
        .collect();
    for (index, router) in sweep_routers.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let points: Vec<(f64, f64)> = rows
            .iter()
            .filter(|row| &row.router == router)
            .map(|row| {
                (
                    x_axis.position(row.mean_cost),
                    y_axis.position(row.mean_quality),
                )
            })
            .collect();
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{x:.1},{y:.1}"))
            .collect();
        // The random router ignores w_quality, so joining its points in sweep order would draw
        // a line through noise: it gets markers only.
        if router != "random" {
            let _ = writeln!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="1.8"/>"#,
                path.join(" ")
            );
        }
        for (x, y) in &points {
            let _ = writeln!(
                svg,
                r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{colour}"/>"#
            );
        }
        let legend_y = TOP + 10.0 + index as f64 * 20.0;
        let legend_x = WIDTH - RIGHT + 20.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{legend_x}" y1="{legend_y}" x2="{:.1}" y2="{legend_y}" stroke="{colour}" stroke-width="2"/><circle cx="{:.1}" cy="{legend_y}" r="3" fill="{colour}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            legend_x + 24.0,
            legend_x + 12.0,
            legend_x + 30.0,
            legend_y + 4.0,
            escape(router)
        );
    }
    let legend_y = TOP + 10.0 + sweep_routers.len() as f64 * 20.0;
    let legend_x = WIDTH - RIGHT + 20.0;
    let _ = writeln!(
        svg,
        r##"<rect x="{:.1}" y="{:.1}" width="8" height="8" fill="#999"/><text x="{:.1}" y="{:.1}">single model</text>"##,
        legend_x + 8.0,
        legend_y - 4.0,
        legend_x + 30.0,
        legend_y + 4.0
    );
    let _ = writeln!(
        svg,
        r##"<text x="{legend_x}" y="{:.1}" font-size="10" fill="#555">lines: w_quality 0 → 1</text>"##,
        legend_y + 26.0
    );
    svg.push_str("</svg>\n");
    svg
}

fn write_axes(svg: &mut String, x_axis: &Axis, y_axis: &Axis, estimated: bool) {
    let (left, right, top, bottom) = (x_axis.from, x_axis.to, y_axis.to, y_axis.from);
    let _ = writeln!(
        svg,
        r##"<rect x="{left}" y="{top}" width="{:.1}" height="{:.1}" fill="none" stroke="#333"/>"##,
        right - left,
        bottom - top
    );
    for tick in x_axis.ticks() {
        let x = x_axis.position(tick);
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{bottom}" stroke="#eee"/><line x1="{x:.1}" y1="{bottom}" x2="{x:.1}" y2="{:.1}" stroke="#333"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            bottom + 5.0,
            bottom + 18.0,
            format_tick(tick, x_axis.log)
        );
    }
    for tick in y_axis.ticks() {
        let y = y_axis.position(tick);
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="#eee"/><line x1="{:.1}" y1="{y:.1}" x2="{left}" y2="{y:.1}" stroke="#333"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left - 5.0,
            left - 8.0,
            y + 4.0,
            format_tick(tick, false)
        );
    }
    let scale = if x_axis.log { ", log scale" } else { "" };
    let estimate = if estimated { " (ESTIMATED)" } else { "" };
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">mean cost per call, USD{estimate}{scale}</text>"#,
        (left + right) / 2.0,
        bottom + 40.0
    );
    let _ = writeln!(
        svg,
        r#"<text transform="translate({:.1},{:.1}) rotate(-90)" text-anchor="middle">mean quality</text>"#,
        left - 50.0,
        (top + bottom) / 2.0
    );
}

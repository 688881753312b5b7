//! The PNG of a run, like the figures of the Go project (seed): every request's latency over time, and the
//! throughput per second below it.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::resources::Resources;
use crate::stats::Point;

/// DejaVu Sans Mono, embedded so plots need no system fonts (license in `assets/DejaVu-LICENSE.txt`).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
/// Above this many points each is one pixel rather than a dot.
const DOTS_UP_TO: usize = 50_000;

const OK_COLOR: RGBColor = RGBColor(31, 119, 180);
const FAILED_COLOR: RGBColor = RGBColor(214, 39, 40);
const SENT_COLOR: RGBColor = RGBColor(150, 150, 150);

/// Requests per one-second bucket: sent (by intended time), succeeded and failed (by end time).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PerSecond {
    /// Requests due in each second.
    pub(crate) sent: Vec<u64>,
    /// Successes ending in each second.
    pub(crate) ok: Vec<u64>,
    /// Failures ending in each second.
    pub(crate) failed: Vec<u64>,
}

/// Buckets `points` by second.
pub(crate) fn per_second(points: &[Point]) -> PerSecond {
    let seconds = points.iter().map(|p| p.done.max(p.at)).fold(0.0_f64, f64::max).floor() as usize + 1;
    let mut buckets = PerSecond { sent: vec![0; seconds], ok: vec![0; seconds], failed: vec![0; seconds] };
    for p in points {
        buckets.sent[p.at.max(0.0) as usize] += 1;
        let end = p.done.max(0.0) as usize;
        if p.ok {
            buckets.ok[end] += 1;
        } else {
            buckets.failed[end] += 1;
        }
    }
    buckets
}

fn drawing<E: std::fmt::Debug>(error: E) -> anyhow::Error {
    anyhow!("drawing the plot: {error:?}")
}

/// Draws `points` into a PNG at `path`, titled `title`.
pub(crate) fn draw(path: &Path, title: &str, points: &[Point]) -> anyhow::Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow!("the embedded plot font is unreadable"))?;
    let root = BitMapBackend::new(path, (1280, 860)).into_drawing_area();
    root.fill(&WHITE).map_err(drawing)?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(drawing)?;
    let (top, bottom) = root.split_vertically(480);

    let x_max = points.iter().map(|p| p.done.max(p.at)).fold(1.0_f64, f64::max).ceil();
    let y_max = points.iter().map(|p| p.latency_ms).fold(1.0_f64, f64::max) * 1.05;
    let mut latency = ChartBuilder::on(&top)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(drawing)?;
    latency
        .configure_mesh()
        .x_desc("time since start (s), by intended send time")
        .y_desc("latency (ms)")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(drawing)?;
    for (ok, color, label) in [(true, OK_COLOR, "succeeded"), (false, FAILED_COLOR, "failed")] {
        let chosen = points.iter().filter(|p| p.ok == ok);
        let count = chosen.clone().count();
        if count == 0 {
            continue;
        }
        let series: Vec<DynElement<'_, BitMapBackend<'_>, (f64, f64)>> = if points.len() <= DOTS_UP_TO {
            chosen.map(|p| Circle::new((p.at, p.latency_ms), 2, color.filled()).into_dyn()).collect()
        } else {
            chosen.map(|p| Pixel::new((p.at, p.latency_ms), color).into_dyn()).collect()
        };
        latency
            .draw_series(series)
            .map_err(drawing)?
            .label(format!("{label} ({count})"))
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
    }
    latency
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(drawing)?;

    let buckets = per_second(points);
    let r_max = buckets.sent.iter().chain(&buckets.ok).chain(&buckets.failed).copied().max().unwrap_or(1).max(1);
    let mut throughput = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..x_max, 0.0..(r_max as f64 * 1.1))
        .map_err(drawing)?;
    throughput
        .configure_mesh()
        .x_desc("time since start (s)")
        .y_desc("requests per second")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(drawing)?;
    for (values, color, label) in [
        (&buckets.sent, SENT_COLOR, "sent (by intended time)"),
        (&buckets.ok, OK_COLOR, "succeeded (by end time)"),
        (&buckets.failed, FAILED_COLOR, "failed (by end time)"),
    ] {
        // A step per second: each count is flat over the second it covers.
        let line = values.iter().enumerate().flat_map(|(s, &n)| [(s as f64, n as f64), (s as f64 + 1.0, n as f64)]);
        throughput
            .draw_series(LineSeries::new(line, color.stroke_width(2)))
            .map_err(drawing)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    throughput
        .configure_series_labels()
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(drawing)?;
    root.present().map_err(drawing)?;
    Ok(())
}

/// Colours of the series of several processes or directories, in turn.
const SERIES_COLORS: [RGBColor; 4] = [OK_COLOR, RGBColor(255, 127, 14), RGBColor(44, 160, 44), FAILED_COLOR];

/// One panel of lines over time: `(label, points)` per series.
fn draw_lines(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    x_max: f64,
    y_desc: &str,
    lines: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    let y_max = lines.iter().flat_map(|(_, points)| points.iter().map(|p| p.1)).fold(1.0_f64, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(drawing)?;
    chart
        .configure_mesh()
        .x_desc("time since start (s)")
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(drawing)?;
    for (i, (label, points)) in lines.iter().enumerate() {
        let color = SERIES_COLORS[i % SERIES_COLORS.len()];
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)).point_size(3))
            .map_err(drawing)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    if !lines.is_empty() {
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(drawing)?;
    }
    Ok(())
}

/// Draws the watched processes' resident memory and CPU and the watched directories' size over
/// time into a PNG at `path`, titled `title`.
pub(crate) fn draw_resources(path: &Path, title: &str, resources: &Resources) -> anyhow::Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow!("the embedded plot font is unreadable"))?;
    let root = BitMapBackend::new(path, (1280, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(drawing)?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(drawing)?;
    let panels = root.split_evenly((3, 1));

    let name = |name: &str, id: String| if name.is_empty() { id } else { format!("{name} ({id})") };
    let mut rss = Vec::new();
    let mut cpu = Vec::new();
    for series in &resources.processes {
        let label = name(&series.name, series.pid.to_string());
        let samples = &series.samples;
        rss.push((
            label.clone(),
            samples.iter().filter_map(|s| Some((s.t_s, s.rss_kib? as f64 / 1024.0))).collect::<Vec<_>>(),
        ));
        cpu.push((label, samples.iter().filter_map(|s| Some((s.t_s, s.cpu_percent?))).collect::<Vec<_>>()));
    }
    let dirs: Vec<(String, Vec<(f64, f64)>)> = resources
        .dirs
        .iter()
        .map(|series| {
            let label = name(&series.name, series.path.display().to_string());
            (label, series.samples.iter().map(|s| (s.t_s, s.bytes as f64 / (1 << 20) as f64)).collect())
        })
        .collect();
    let x_max =
        rss.iter().chain(&dirs).flat_map(|(_, points)| points.iter().map(|p| p.0)).fold(1.0_f64, f64::max).ceil();
    draw_lines(&panels[0], x_max, "resident memory (MiB)", &rss)?;
    draw_lines(&panels[1], x_max, "CPU (% of one core)", &cpu)?;
    draw_lines(&panels[2], x_max, "directory size (MiB)", &dirs)?;
    root.present().map_err(drawing)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(at: f64, done: f64, ok: bool) -> Point {
        Point { at, latency_ms: (done - at) * 1e3, done, ok }
    }

    #[test]
    fn requests_are_bucketed_by_send_and_end_second() {
        let points = [point(0.1, 0.2, true), point(0.9, 1.5, true), point(1.2, 3.1, false)];
        let buckets = per_second(&points);
        assert_eq!(buckets.sent, [2, 1, 0, 0]);
        assert_eq!(buckets.ok, [1, 1, 0, 0]);
        assert_eq!(buckets.failed, [0, 0, 0, 1]);
    }

    #[test]
    fn a_plot_is_written_as_a_png() {
        let dir = std::env::temp_dir().join(format!("sagaflow-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("run.png");
        let points: Vec<Point> =
            (0..300).map(|i| point(i as f64 / 100.0, i as f64 / 100.0 + 0.02, i % 50 != 0)).collect();
        draw(&path, "sync flow, 100/s for 3s", &points).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");

        use crate::resources::{DirSample, DirSeries, ProcessSample, ProcessSeries};
        let samples = (0..4)
            .map(|i| ProcessSample {
                t_s: f64::from(i) * 10.0,
                rss_kib: Some(30_000 + 1_000 * u64::from(i as u8)),
                cpu_percent: (i > 0).then_some(80.0),
            })
            .collect();
        let resources = Resources {
            interval_s: 10.0,
            processes: vec![ProcessSeries { name: "orchestrator".into(), pid: 1, samples }],
            dirs: vec![DirSeries {
                name: "data".into(),
                path: "/d".into(),
                samples: vec![DirSample { t_s: 0.0, bytes: 1 << 20 }],
            }],
        };
        let resources_path = dir.join("run-resources.png");
        draw_resources(&resources_path, "resources", &resources).unwrap();
        assert_eq!(&std::fs::read(&resources_path).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

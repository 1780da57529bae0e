//! `--plot FILE`: the end-to-end latency histograms of both latency runs as
//! one SVG (plotters, SVG backend only: no font or image dependencies).

use std::path::Path;

use plotters::prelude::*;

use super::latency::Hist;
use super::report::Report;

/// Bars per run: log-spaced latency buckets from 0.1 ms up to the maximum.
const BUCKETS: usize = 40;

/// Share of messages per log-spaced bucket: `(from_ms, to_ms, percent)`.
fn buckets(h: &Hist, top_ms: f64) -> Vec<(f64, f64, f64)> {
    let lo = 0.1f64;
    let step = (top_ms / lo).ln() / BUCKETS as f64;
    let total = h.len().max(1) as f64;
    (0..BUCKETS)
        .map(|i| {
            let from = lo * (step * i as f64).exp();
            let to = lo * (step * (i + 1) as f64).exp();
            let (a, b) = ((from * 1000.0) as u64, (to * 1000.0) as u64);
            let first = if i == 0 { 0 } else { a };
            let n = h.count_between(first, b.saturating_sub(1).max(first));
            (from, to, 100.0 * n as f64 / total)
        })
        .collect()
}

/// Write the SVG.
pub(crate) fn latency_svg(path: &Path, report: &Report) -> anyhow::Result<()> {
    let runs = [
        ("fixed rate", &report.latency.fixed_rate, BLUE),
        ("saturation", &report.latency.saturation, RED),
    ];
    let root = SVGBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((2, 1));
    for ((name, run, color), area) in runs.iter().zip(areas.iter()) {
        let top = (run.hist.max() as f64 / 1000.0).max(1.0) * 1.05;
        let bars = buckets(&run.hist, top);
        let ymax = bars.iter().map(|b| b.2).fold(1.0, f64::max) * 1.1;
        let offered = run.offered_per_sec.map_or("saturation".to_string(), |o| {
            format!("{o:.0} msg/s offered")
        });
        let caption = format!(
            "{name} ({offered}): p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, {} msgs",
            run.p50_ms, run.p99_ms, run.p999_ms, run.messages
        );
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d((0.1f64..top).log_scale(), 0f64..ymax)?;
        chart
            .configure_mesh()
            .x_desc("end-to-end latency, ms (log scale)")
            .y_desc("% of messages")
            .draw()?;
        chart.draw_series(
            bars.iter()
                .filter(|b| b.2 > 0.0)
                .map(|&(from, to, pct)| Rectangle::new([(from, 0.0), (to, pct)], color.filled())),
        )?;
        for (q, v) in [("p50", run.p50_ms), ("p99", run.p99_ms)] {
            if v > 0.1 {
                chart
                    .draw_series(LineSeries::new(
                        vec![(v, 0.0), (v, ymax)],
                        BLACK.stroke_width(1),
                    ))?
                    .label(q);
            }
        }
    }
    root.present()?;
    Ok(())
}

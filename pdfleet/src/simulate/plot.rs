//! The timeline of simulated runs as a PNG: load, TTFT and ITL at the SLO's quantile against
//! their targets, and each role's replicas, one line per policy.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use super::fleet::{Run, SimConfig};

const FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

fn color(i: usize) -> RGBColor {
    [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(90, 90, 90),
    ][i % 5]
}

/// Registers the embedded font once (plotters draws text with it; no system fonts needed).
pub fn fonts() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

type Panel<'a> = (
    &'a str,
    Box<dyn Fn(&super::fleet::Sample) -> Option<f64> + 'a>,
    Option<f64>,
);

pub fn timeline(
    path: &Path,
    title: &str,
    runs: &[(&str, &Run)],
    cfg: &SimConfig,
) -> anyhow::Result<()> {
    fonts();
    let root = BitMapBackend::new(path, (1400, 1500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let root = root
        .titled(
            &format!("{title}: load, latency and replicas by policy"),
            ("sans-serif", 24),
        )
        .map_err(|e| anyhow!("{e}"))?;
    let panels: Vec<Panel> = vec![
        (
            "arrivals (requests/s)",
            Box::new(|s| Some(s.arrivals_per_s)),
            None,
        ),
        (
            "TTFT at the SLO quantile (s)",
            Box::new(|s| s.ttft_q_s),
            Some(cfg.ttft_s),
        ),
        (
            "ITL at the SLO quantile (ms)",
            Box::new(|s| s.itl_q_s.map(|v| 1e3 * v)),
            Some(1e3 * cfg.itl_s),
        ),
        (
            "prefill replicas (asked for)",
            Box::new(|s| Some(s.prefill.0 as f64)),
            None,
        ),
        (
            "decode replicas (asked for)",
            Box::new(|s| Some(s.decode.0 as f64)),
            None,
        ),
    ];
    let areas = root.split_evenly((panels.len(), 1));
    let t_max = runs
        .iter()
        .flat_map(|r| r.1.timeline.iter().map(|s| s.t))
        .fold(1.0, f64::max);
    for (area, (label, f, target)) in areas.iter().zip(&panels) {
        // The load is the same for every policy: draw it once.
        let shown: Vec<(&str, &Run)> = if label.starts_with("arrivals") {
            runs.iter().take(1).map(|&(_, r)| ("load", r)).collect()
        } else {
            runs.to_vec()
        };
        let y_max = shown
            .iter()
            .flat_map(|r| r.1.timeline.iter().filter_map(f))
            .chain(target.iter().copied())
            .fold(0.0f64, f64::max)
            * 1.1
            + 1e-9;
        let mut chart = ChartBuilder::on(area)
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(60)
            .caption(*label, ("sans-serif", 18))
            .build_cartesian_2d(0.0..t_max, 0.0..y_max)
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        if let Some(t) = target {
            chart
                .draw_series(LineSeries::new(
                    vec![(0.0, *t), (t_max, *t)],
                    BLACK.stroke_width(1),
                ))
                .map_err(|e| anyhow!("{e}"))?
                .label("target")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
        }
        for (i, (name, run)) in shown.iter().enumerate() {
            let c = color(i);
            let pts: Vec<(f64, f64)> = run
                .timeline
                .iter()
                .filter_map(|s| f(s).map(|v| (s.t, v)))
                .collect();
            chart
                .draw_series(LineSeries::new(pts, c.stroke_width(2)))
                .map_err(|e| anyhow!("{e}"))?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

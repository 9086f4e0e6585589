//! The plots of `herald-bench report`: grouped bar charts in SVG, drawn with `plotters`.
//!
//! One chart per scenario and kind of figure: throughput (medians, with the min–max of the runs as
//! a whisker), latency percentiles, and timings (p50/p99 of the samples; the failover chart puts
//! the peers' documented detection defaults next to Herald's, on a log scale).

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::compare::summarize;
use super::percentile;
use super::report::{by_label, Fig, PEER_FAILOVER_DEFAULTS};

const PALETTE: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

/// One bar per group: the median and the min–max whisker (equal when there is one figure).
struct Series {
    name: String,
    bars: Vec<Option<(f64, f64, f64)>>,
}

fn bar(values: &[f64]) -> Option<(f64, f64, f64)> {
    summarize(values).map(|s| (s.median, s.min, s.max))
}

fn pct_bar(values: &[f64], p: f64) -> Option<(f64, f64, f64)> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let x = percentile(&v, p);
    x.is_finite().then_some((x, x, x))
}

fn short(v: f64) -> String {
    match v {
        v if v >= 1e6 => format!("{:.2}M", v / 1e6),
        v if v >= 1e4 => format!("{:.0}k", v / 1e3),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v if v >= 10.0 => format!("{v:.0}"),
        v => format!("{v:.2}"),
    }
}

/// Draws the charts of one scenario into `dir`; returns `(scenario, file name)` per chart.
pub(super) fn draw(scenario: &str, figs: &[Fig], dir: &Path) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chart = |kind: &str, title: String, y: &str, groups: Vec<String>, series: Vec<Series>, log: bool| {
        if groups.is_empty() || series.iter().all(|s| s.bars.iter().all(Option::is_none)) {
            return Ok::<(), String>(());
        }
        let file = format!("{scenario}-{kind}.svg");
        bars(&dir.join(&file), &title, y, &groups, &series, log)?;
        out.push((scenario.to_string(), file));
        Ok(())
    };
    let peer_name = figs.iter().find_map(|f| f.peer.as_ref().map(|p| p.0.clone()));

    // Throughput: Herald (and the peer) per case.
    let rate = by_label(figs, "events_per_second");
    if !rate.is_empty() {
        let mut series = vec![Series {
            name: "herald".into(),
            bars: rate.iter().map(|(_, f)| bar(&f.herald)).collect(),
        }];
        if rate.iter().any(|(_, f)| !f.plain.is_empty()) {
            series[0].name = "herald mtls".into();
            series.push(Series {
                name: "herald plaintext".into(),
                bars: rate.iter().map(|(_, f)| bar(&f.plain)).collect(),
            });
        }
        if let Some(p) = &peer_name {
            series.push(Series {
                name: p.clone(),
                bars: rate
                    .iter()
                    .map(|(_, f)| f.peer.as_ref().and_then(|p| bar(&p.1)))
                    .collect(),
            });
        }
        let groups = rate.iter().map(|(l, _)| l.clone()).collect();
        chart(
            "throughput",
            format!("{scenario}: events/s (median of runs, whisker min-max)"),
            "events/s",
            groups,
            series,
            false,
        )?;
    }

    // Latency percentiles: one group per case and percentile.
    let mut groups = Vec::new();
    let (mut h, mut p) = (Vec::new(), Vec::new());
    for (metric, name) in [("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")] {
        for (label, f) in by_label(figs, metric) {
            groups.push(format!("{label} {name}"));
            h.push(bar(&f.herald));
            p.push(f.peer.as_ref().and_then(|p| bar(&p.1)));
        }
    }
    let mut series = vec![Series {
        name: "herald".into(),
        bars: h,
    }];
    if let Some(name) = &peer_name {
        series.push(Series {
            name: name.clone(),
            bars: p,
        });
    }
    chart(
        "latency",
        format!("{scenario}: latency percentiles, ms (lower is better)"),
        "ms",
        groups,
        series,
        false,
    )?;

    // Timings: p50 and p99 of the samples; failover next to the peers' documented defaults.
    let samples: Vec<&Fig> = figs.iter().filter(|f| f.metric == "samples_ms").collect();
    // `scale` at several cluster sizes (one mode per size): charted against the size below.
    let mut sizes: Vec<String> = Vec::new();
    if scenario == "scale" {
        for f in figs {
            if !sizes.contains(&f.mode) {
                sizes.push(f.mode.clone());
            }
        }
    }
    if let Some(first) = samples.first().filter(|_| scenario == "cluster") {
        let mut groups = vec!["herald p50".to_string(), "herald p99".to_string()];
        let mut values = vec![pct_bar(&first.herald, 0.5), pct_bar(&first.herald, 0.99)];
        let mut defaults = vec![None, None];
        for (name, ms) in PEER_FAILOVER_DEFAULTS {
            groups.push(name.to_string());
            values.push(None);
            defaults.push(Some((*ms, *ms, *ms)));
        }
        chart(
            "failover",
            "kill -> first event handled elsewhere, ms (log scale)".into(),
            "ms",
            groups,
            vec![
                Series {
                    name: "herald, measured".into(),
                    bars: values,
                },
                Series {
                    name: "peers' documented defaults, not run".into(),
                    bars: defaults,
                },
            ],
            true,
        )?;
    } else if sizes.len() > 1 {
        let at = |mode: &str, case: &str| figs.iter().find(|f| f.mode == mode && f.case == case);
        let timing = |case: &str, name: &str, p: f64| Series {
            name: name.into(),
            bars: sizes
                .iter()
                .map(|m| at(m, case).and_then(|f| pct_bar(&f.herald, p)))
                .collect(),
        };
        chart(
            "nodes-timings",
            "scale: timings by cluster size, ms (lower is better)".into(),
            "ms",
            sizes.clone(),
            vec![
                timing("kill -> first event handled elsewhere", "failover p99", 0.99),
                timing("join -> placed (the last node)", "join -> placed", 0.5),
                timing(
                    "leader kill -> survivors agree",
                    "leader kill -> survivors agree, p99",
                    0.99,
                ),
            ],
            false,
        )?;
        // Per node: the median over the nodes, whiskers their min–max.
        let per_node = |case: &str, name: &str| Series {
            name: name.into(),
            bars: sizes.iter().map(|m| at(m, case).and_then(|f| bar(&f.herald))).collect(),
        };
        chart(
            "nodes-traffic",
            "scale: idle write syscalls/s per node (its peer messages), by cluster size".into(),
            "writes/s",
            sizes.clone(),
            vec![per_node(
                "idle write syscalls per node",
                "median (min-max) over the nodes",
            )],
            false,
        )?;
        chart(
            "nodes-cpu",
            "scale: idle CPU per node, % of a core, by cluster size".into(),
            "% of a core",
            sizes.clone(),
            vec![per_node("idle CPU per node", "median (min-max) over the nodes")],
            false,
        )?;
    } else if !samples.is_empty() {
        chart(
            "timings",
            format!("{scenario}: ms (lower is better)"),
            "ms",
            samples.iter().map(|f| f.label()).collect(),
            vec![
                Series {
                    name: "p50".into(),
                    bars: samples.iter().map(|f| pct_bar(&f.herald, 0.5)).collect(),
                },
                Series {
                    name: "p99".into(),
                    bars: samples.iter().map(|f| pct_bar(&f.herald, 0.99)).collect(),
                },
            ],
            false,
        )?;
    }
    Ok(out)
}

/// `text` in lines of at most `width` characters, broken at spaces (a longer word stands alone).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split(' ') {
        match lines.last_mut() {
            Some(line) if line.len() + 1 + word.len() <= width => {
                line.push(' ');
                line.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

/// A grouped bar chart. With `log`, bars are drawn in log10 of their values (labels show values).
fn bars(path: &Path, title: &str, y_desc: &str, groups: &[String], series: &[Series], log: bool) -> Result<(), String> {
    let e = |e: plotters::drawing::DrawingAreaErrorKind<std::io::Error>| format!("{}: {e}", path.display());
    let scale = |v: f64| if log { v.max(1.0).log10() } else { v };
    let top = series
        .iter()
        .flat_map(|s| s.bars.iter().flatten().map(|b| b.2))
        .fold(0.0f64, f64::max);
    // Room above the tallest bar for its label and, with several series, for the legend (upper
    // right, a line per series), so that the legend never covers a bar.
    let legend = if series.len() > 1 { series.len() as f64 } else { 0.0 };
    let y_max = if log {
        scale(top).ceil() + 0.3 + 0.25 * legend
    } else {
        top * (1.15 + 0.07 * legend)
    }
    .max(1e-9);
    // The series with a bar in each group: a group's bars sit side by side, centred.
    let present: Vec<Vec<usize>> = (0..groups.len())
        .map(|i| {
            (0..series.len())
                .filter(|&j| series[j].bars.get(i).is_some_and(Option::is_some))
                .collect()
        })
        .collect();
    let widest = present.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let width = (160 + groups.len() * (110 * widest).max(150)).clamp(640, 1400) as u32;
    let root = SVGBackend::new(path, (width, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let n = groups.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(70)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..n, 0f64..y_max)
        .map_err(e)?;
    let y_fmt = |v: &f64| {
        if log {
            short(10f64.powf(*v))
        } else {
            short(*v)
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_label_formatter(&|_| String::new())
        .y_labels(if log { y_max.floor() as usize + 1 } else { 8 })
        .y_label_formatter(&y_fmt)
        .y_desc(y_desc)
        .draw()
        .map_err(e)?;
    let w = 0.8 / widest as f64;
    let label_style = TextStyle::from(("sans-serif", 11).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (j, s) in series.iter().enumerate() {
        let color = PALETTE[j % PALETTE.len()];
        let mut rects = Vec::new();
        let mut whiskers = Vec::new();
        let mut texts = Vec::new();
        for (i, b) in s.bars.iter().enumerate() {
            let Some((mid, lo, hi)) = *b else { continue };
            let (slot, slots) = (present[i].iter().position(|&s| s == j).unwrap_or(0), present[i].len());
            let x0 = i as f64 + 0.5 - slots as f64 * w / 2.0 + slot as f64 * w;
            let xc = x0 + w * 0.45;
            rects.push(Rectangle::new([(x0, 0.0), (x0 + w * 0.9, scale(mid))], color.filled()));
            if hi > lo {
                whiskers.push(PathElement::new(
                    vec![(xc, scale(lo)), (xc, scale(hi))],
                    BLACK.stroke_width(1),
                ));
            }
            texts.push(Text::new(short(mid), (xc, scale(hi.max(mid))), label_style.clone()));
        }
        let name = s.name.clone();
        chart
            .draw_series(rects)
            .map_err(e)?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        chart.draw_series(whiskers).map_err(e)?;
        chart.draw_series(texts).map_err(e)?;
    }
    if series.len() > 1 {
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.9))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(e)?;
    }
    let group_style = TextStyle::from(("sans-serif", 12).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    let (left, _) = chart.backend_coord(&(0.0, 0.0));
    let (right, _) = chart.backend_coord(&(n, 0.0));
    // ~6.5 px per character of a 12 px sans-serif font.
    let chars = (((right - left) as f64 / n.max(1.0)) / 6.5).max(8.0) as usize;
    for (i, g) in groups.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        for (k, line) in wrap(g, chars).into_iter().take(4).enumerate() {
            root.draw(&Text::new(line, (px, py + 8 + 14 * k as i32), group_style.clone()))
                .map_err(e)?;
        }
    }
    root.present().map_err(e)?;
    Ok(())
}

/// A time-series chart (the soak's): one line per series of `(seconds, value)` points, x in
/// seconds from 0, y from 0; `marker` draws a grey vertical line there (the end of the warm-up).
pub(super) fn lines(
    path: &Path,
    title: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
    marker: Option<f64>,
) -> Result<(), String> {
    let e = |e: plotters::drawing::DrawingAreaErrorKind<std::io::Error>| format!("{}: {e}", path.display());
    let points = || series.iter().flat_map(|(_, p)| p.iter().copied());
    let x_max = points().map(|p| p.0).fold(1.0f64, f64::max);
    let y_max = (points().map(|p| p.1).fold(0.0f64, f64::max) * 1.15).max(1e-9);
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(y_desc)
        .x_label_formatter(&|v| short(*v))
        .y_label_formatter(&|v| short(*v))
        .draw()
        .map_err(e)?;
    if let Some(x) = marker {
        let dash = PathElement::new(vec![(x, 0.0), (x, y_max)], BLACK.mix(0.4).stroke_width(1));
        chart.draw_series(std::iter::once(dash)).map_err(e)?;
    }
    for (j, (name, p)) in series.iter().enumerate() {
        let color = PALETTE[j % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(2)))
            .map_err(e)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_series_charts_are_svg_with_a_line_per_series() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.svg");
        let series = vec![
            ("node 1".to_string(), vec![(0.0, 1.0), (10.0, 2.0), (20.0, 1.5)]),
            ("node 2".to_string(), vec![(0.0, 3.0), (10.0, 3.5)]),
        ];
        lines(&path, "RSS per node", "MiB", &series, Some(6.0)).expect("drawn");
        let svg = std::fs::read_to_string(&path).expect("written");
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        for text in ["RSS per node", "node 1", "node 2"] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert!(svg.matches("<polyline").count() >= 2, "one line per series");
    }

    #[test]
    fn labels_wrap_at_spaces() {
        assert_eq!(
            wrap("ack=none, 1 event per publish", 12),
            ["ack=none, 1", "event per", "publish"]
        );
        assert_eq!(wrap("do_send(Event)", 4), ["do_send(Event)"]);
    }

    #[test]
    fn charts_are_written_for_each_kind_of_figure() {
        let dir = tempfile::tempdir().unwrap();
        let fig = |metric: &str, case: &str, herald: Vec<f64>, peer: Option<Vec<f64>>| Fig {
            plain: vec![],
            scenario: "nats".into(),
            mode: "ack=none".into(),
            case: case.into(),
            metric: metric.into(),
            higher_is_better: metric == "events_per_second",
            herald,
            peer: peer.map(|p| ("nats".to_string(), p)),
        };
        let figs = vec![
            fig("events_per_second", "16 B", vec![2e5, 2.2e5], Some(vec![5e5, 5.1e5])),
            fig("events_per_second", "1 KiB", vec![1.6e5], Some(vec![2.2e5])),
            fig("p99_ms", "16 B", vec![1.5], Some(vec![1.1])),
        ];
        let drawn = draw("nats", &figs, dir.path()).unwrap();
        let files: Vec<&str> = drawn.iter().map(|d| d.1.as_str()).collect();
        assert_eq!(files, ["nats-throughput.svg", "nats-latency.svg"]);
        let svg = std::fs::read_to_string(dir.path().join("nats-throughput.svg")).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("1 KiB") && svg.contains("505k"),
            "{svg}"
        );

        let rounds = vec![fig("samples_ms", "kill", vec![50.0, 80.0, 900.0], None)];
        let drawn = draw("cluster", &rounds, dir.path()).unwrap();
        assert_eq!(drawn[0].1, "cluster-failover.svg");
        let svg = std::fs::read_to_string(dir.path().join("cluster-failover.svg")).unwrap();
        assert!(
            svg.contains("Orleans") && svg.contains("900") && svg.contains("documented defaults"),
            "{svg}"
        );
    }
}

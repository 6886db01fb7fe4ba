//! Hand-written SVG plots: latency by percentile (the HdrHistogram style:
//! x is the percentile on a log scale of 1/(1-q), y the latency on a log
//! scale, so the tail is as visible as the median), and bulk throughput and
//! CPU per GiB against the number of streams.

use hdrhistogram::Histogram;

/// One line of the plot.
pub(crate) struct Series {
    /// Legend text.
    pub(crate) label: String,
    /// `(quantile, latency µs)` points, quantile ascending.
    pub(crate) points: Vec<(f64, f64)>,
    /// Dashed line (the direct baseline).
    pub(crate) dashed: bool,
}

/// Quantiles from 0 to 99.99 % (and the max as 99.999 %).
pub(crate) fn percentile_points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    let mut v = Vec::new();
    // 0 .. 0.9999 evenly on the log(1/(1-q)) axis, 0.05 decades apart.
    let mut x: f64 = 0.0;
    while x <= 4.0 + 1e-9 {
        let q = 1.0 - 10f64.powf(-x);
        v.push((q, h.value_at_quantile(q) as f64 / 1000.0));
        x += 0.05;
    }
    v.push((0.99999, h.max() as f64 / 1000.0));
    v
}

const W: f64 = 900.0;
const H: f64 = 520.0;
const L: f64 = 80.0;
const R: f64 = 20.0;
const T: f64 = 50.0;
const B: f64 = 60.0;
const COLORS: [&str; 4] = ["#d62728", "#1f77b4", "#ff7f0e", "#2ca02c"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Renders the plot; colours pair up series two by two (tunnel solid,
/// direct dashed, same colour family per mode).
pub(crate) fn percentile_plot(title: &str, series: &[Series]) -> String {
    let all = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (mut lo, mut hi) = (f64::MAX, f64::MIN);
    for y in all {
        if y > 0.0 {
            lo = lo.min(y);
            hi = hi.max(y);
        }
    }
    if lo > hi {
        lo = 1.0;
        hi = 10.0;
    }
    let (ylo, yhi) = (
        lo.log10().floor(),
        hi.log10().ceil().max(lo.log10().floor() + 1.0),
    );
    let xmax = 5.0;
    let px = |q: f64| L + (-(1.0 - q).max(1e-5).log10()).min(xmax) / xmax * (W - L - R);
    let py = |us: f64| T + (1.0 - (us.max(1e-3).log10() - ylo) / (yhi - ylo)) * (H - T - B);
    let mut o = String::new();
    o.push_str(&format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    ));
    o.push_str(&format!(
        "<text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        W / 2.0,
        esc(title)
    ));
    // Grid: x at 0, 90, 99, 99.9, 99.99, 99.999 %.
    for (i, lbl) in ["0%", "90%", "99%", "99.9%", "99.99%", "max"]
        .iter()
        .enumerate()
    {
        let x = L + i as f64 / xmax * (W - L - R);
        o.push_str(&format!(
            "<line x1=\"{x:.1}\" y1=\"{T}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\n<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{lbl}</text>\n",
            H - B,
            H - B + 18.0
        ));
    }
    let mut d = ylo as i32;
    while d as f64 <= yhi {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powi(d);
            if v.log10() > yhi + 1e-9 {
                break;
            }
            let y = py(v);
            let stroke = if m == 1.0 { "#bbb" } else { "#eee" };
            o.push_str(&format!(
                "<line x1=\"{L}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"{stroke}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
                W - R,
                L - 6.0,
                y + 4.0,
                fmt_us(v)
            ));
        }
        d += 1;
    }
    o.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">percentile (log scale of 1/(1-q))</text>\n",
        (L + W - R) / 2.0,
        H - 18.0
    ));
    o.push_str(&format!(
        "<text transform=\"translate(18 {:.1}) rotate(-90)\" text-anchor=\"middle\">latency (log scale)</text>\n",
        (T + H - B) / 2.0
    ));
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[(i / 2) % COLORS.len()];
        let pts: Vec<(f64, f64)> = s.points.iter().map(|&(q, us)| (px(q), py(us))).collect();
        polyline(&mut o, color, s.dashed, &pts);
        legend(
            &mut o,
            L + 12.0,
            T + 16.0 + i as f64 * 18.0,
            color,
            s.dashed,
            &s.label,
        );
    }
    o.push_str("</svg>\n");
    o
}

/// One line of a [`streams_plot`] panel: a value per stream count.
pub(crate) struct Line {
    /// Legend text.
    pub(crate) label: String,
    /// `(streams, value)` points, streams ascending.
    pub(crate) points: Vec<(usize, f64)>,
    /// Colour index (one per path, shared by its lines in both panels).
    pub(crate) color: usize,
    /// Dashed line (the edge's CPU beside the relay's, solid).
    pub(crate) dashed: bool,
}

/// Two panels side by side against the number of streams (evenly spaced
/// categories): throughput on a log scale (direct is an order of magnitude
/// above the tunnels) and CPU seconds per GiB on a linear scale.
pub(crate) fn streams_plot(title: &str, streams: &[usize], gbps: &[Line], cpu: &[Line]) -> String {
    let (w, h) = (1000.0, 460.0);
    let mut o = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        w / 2.0,
        esc(title)
    );
    let panel_w = (w - 40.0) / 2.0;
    panel(
        &mut o,
        10.0,
        panel_w,
        h,
        streams,
        "Gbit/s (log scale)",
        gbps,
        true,
    );
    panel(
        &mut o,
        30.0 + panel_w,
        panel_w,
        h,
        streams,
        "CPU s per GiB",
        cpu,
        false,
    );
    o.push_str("</svg>\n");
    o
}

/// Draws one panel of [`streams_plot`] at horizontal offset `x0`.
#[allow(clippy::too_many_arguments)]
fn panel(
    o: &mut String,
    x0: f64,
    pw: f64,
    h: f64,
    streams: &[usize],
    ylabel: &str,
    lines: &[Line],
    log: bool,
) {
    let (l, r, t, b) = (x0 + 70.0, x0 + pw - 10.0, T, h - B - 60.0);
    let vals = lines.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let hi = vals.clone().fold(0.0f64, f64::max);
    let lo = vals.filter(|v| *v > 0.0).fold(f64::MAX, f64::min);
    let (ylo, yhi) = if log {
        let lo = if lo > hi { 0.1 } else { lo };
        (lo.log10().floor(), hi.max(lo * 10.0).log10().ceil())
    } else {
        (0.0, nice_step(hi * 1.1) * 5.0)
    };
    let py = |v: f64| {
        let f = if log {
            (v.max(1e-9).log10() - ylo) / (yhi - ylo)
        } else {
            v / yhi
        };
        b - f.clamp(0.0, 1.0) * (b - t)
    };
    let n = streams.len().max(1);
    let px = |s: usize| {
        let i = streams.iter().position(|&x| x == s).unwrap_or(0);
        l + (i as f64 + 0.5) / n as f64 * (r - l)
    };
    let ticks: Vec<f64> = if log {
        (ylo as i32..=yhi as i32)
            .flat_map(|d| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(d)))
            .filter(|v| v.log10() <= yhi + 1e-9)
            .collect()
    } else {
        (0..=5).map(|i| yhi / 5.0 * i as f64).collect()
    };
    for v in ticks {
        let y = py(v);
        o.push_str(&format!(
            "<line x1=\"{l:.1}\" y1=\"{y:.1}\" x2=\"{r:.1}\" y2=\"{y:.1}\" stroke=\"#e4e4e4\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            l - 6.0,
            y + 4.0,
            trim_num(v)
        ));
    }
    for &s in streams {
        o.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{s}</text>\n",
            px(s),
            b + 18.0
        ));
    }
    o.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">streams</text>\n<text transform=\"translate({:.1} {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
        (l + r) / 2.0,
        b + 36.0,
        x0 + 14.0,
        (t + b) / 2.0,
        esc(ylabel)
    ));
    for (i, s) in lines.iter().enumerate() {
        let color = COLORS[s.color % COLORS.len()];
        let pts: Vec<(f64, f64)> = s.points.iter().map(|&(x, v)| (px(x), py(v))).collect();
        polyline(o, color, s.dashed, &pts);
        for (x, y) in &pts {
            o.push_str(&format!(
                "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"3\" fill=\"{color}\"/>\n"
            ));
        }
        // Legend under the panel, two columns.
        let lx = l + (i % 2) as f64 * (r - l) / 2.0;
        legend(
            o,
            lx,
            b + 56.0 + (i / 2) as f64 * 16.0,
            color,
            s.dashed,
            &s.label,
        );
    }
}

fn dash_attr(dashed: bool) -> &'static str {
    if dashed {
        " stroke-dasharray=\"6 4\""
    } else {
        ""
    }
}

/// One series' line through `pts` (pixel coordinates).
fn polyline(o: &mut String, color: &str, dashed: bool, pts: &[(f64, f64)]) {
    let pts: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
    o.push_str(&format!(
        "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{} points=\"{}\"/>\n",
        dash_attr(dashed),
        pts.join(" ")
    ));
}

/// A legend entry at `(x, y)`: a short line in the series' style and its label.
fn legend(o: &mut String, x: f64, y: f64, color: &str, dashed: bool, label: &str) {
    o.push_str(&format!(
        "<line x1=\"{x:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"{color}\" stroke-width=\"2\"{}/>\n<text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
        x + 30.0,
        dash_attr(dashed),
        x + 36.0,
        y + 4.0,
        esc(label)
    ));
}

/// A round tick step (1, 2 or 5 × 10^k) for about five ticks up to `hi`.
fn nice_step(hi: f64) -> f64 {
    if hi <= 0.0 || !hi.is_finite() {
        return 0.2;
    }
    let raw = hi / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

/// A tick label without trailing zeros (0.5, 2, 1.25).
fn trim_num(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn fmt_us(v: f64) -> String {
    if v >= 1_000_000.0 {
        format!("{} s", v / 1_000_000.0)
    } else if v >= 1000.0 {
        format!("{} ms", v / 1000.0)
    } else {
        format!("{v} µs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_is_well_formed() {
        let mut h = crate::rr::new_hist();
        for v in 1..10_000u64 {
            h.record(v * 1000).unwrap();
        }
        let s = Series {
            label: "a <b>".into(),
            points: percentile_points(&h),
            dashed: true,
        };
        let svg = percentile_plot("t", &[s]);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("a &lt;b&gt;"));
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn streams_plot_is_well_formed() {
        let line = |label: &str, pts: &[(usize, f64)], dashed| Line {
            label: label.into(),
            points: pts.to_vec(),
            color: 0,
            dashed,
        };
        let g = [line("tunnel", &[(1, 2.1), (8, 1.4), (64, 1.1)], false)];
        let c = [
            line("tunnel relay", &[(1, 2.0), (8, 2.4), (64, 2.7)], false),
            line("tunnel edge", &[(1, 1.5), (8, 1.8), (64, 2.3)], true),
        ];
        let svg = streams_plot("t & u", &[1, 8, 64], &g, &c);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("t &amp; u") && svg.contains(">64</text>"));
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }
}

//! Hand-written SVG line charts for report.html: no JavaScript, no external files, readable
//! when printed. Linear or logarithmic axes, a legend, optional vertical markers (phases) and a
//! horizontal limit line (the knee's p95 bound).

use std::fmt::Write;

pub const WIDTH: f64 = 820.0;
pub const HEIGHT: f64 = 340.0;
const LEFT: f64 = 72.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 48.0;

/// Colours that stay apart for colour-blind readers (Okabe–Ito).
pub const COLORS: [&str; 6] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9",
];

#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Optional text next to each point (e.g. the offered rate of a sweep step).
    pub labels: Vec<String>,
    /// Optional vertical bars `(x, low, high)` in the series' colour (e.g. the min–max of a
    /// sweep step's repeated runs).
    pub whiskers: Vec<(f64, f64, f64)>,
}

#[derive(Clone, Debug, Default)]
pub struct Axis {
    pub label: String,
    pub log: bool,
    /// Fixed ticks `(value, label)`; `None`: computed.
    pub ticks: Option<Vec<(f64, String)>>,
}

impl Axis {
    pub fn linear(label: &str) -> Axis {
        Axis {
            label: label.into(),
            ..Axis::default()
        }
    }

    pub fn log(label: &str) -> Axis {
        Axis {
            label: label.into(),
            log: true,
            ticks: None,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Chart {
    pub title: String,
    pub x: Axis,
    pub y: Axis,
    pub series: Vec<Series>,
    /// Vertical lines at x with a label (e.g. "measure").
    pub vmarks: Vec<(f64, String)>,
    /// A horizontal line at y with a label (e.g. "p95 limit").
    pub hline: Option<(f64, String)>,
}

/// 1-2-5 ticks covering `[lo, hi]`.
pub fn nice_ticks(lo: f64, hi: f64, want: usize) -> Vec<f64> {
    if hi.is_nan() || lo.is_nan() || hi <= lo {
        return vec![lo];
    }
    let raw = (hi - lo) / want.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    let mut t = Vec::new();
    let mut v = first;
    while v <= hi + step * 1e-9 && t.len() < 50 {
        t.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        v += step;
    }
    t
}

/// A short label: 1.5k, 2M, 0.25.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if a >= 1e4 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = if v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

struct Scale {
    lo: f64,
    hi: f64,
    log: bool,
    from: f64,
    to: f64,
}

impl Scale {
    fn map(&self, v: f64) -> f64 {
        let (lo, hi, v) = if self.log {
            (self.lo.log10(), self.hi.log10(), v.max(self.lo).log10())
        } else {
            (self.lo, self.hi, v)
        };
        let f = if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
        self.from + f * (self.to - self.from)
    }
}

fn range(values: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && (!log || *v > 0.0)) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return if log { (1.0, 10.0) } else { (0.0, 1.0) };
    }
    if log {
        // Whole decades: easy to read.
        (
            10f64.powf(lo.log10().floor()),
            10f64.powf(hi.log10().ceil().max(lo.log10().floor() + 1.0)),
        )
    } else {
        let lo = lo.min(0.0);
        let hi = if hi > lo { hi * 1.05 } else { lo + 1.0 };
        (lo, hi)
    }
}

fn ticks_for(axis: &Axis, lo: f64, hi: f64) -> Vec<(f64, String)> {
    if let Some(t) = &axis.ticks {
        return t.clone();
    }
    if axis.log {
        let mut t = Vec::new();
        let mut v = lo;
        while v <= hi * 1.000_001 && t.len() < 20 {
            t.push((v, fmt_num(v)));
            v *= 10.0;
        }
        t
    } else {
        nice_ticks(lo, hi, 6)
            .into_iter()
            .map(|v| (v, fmt_num(v)))
            .collect()
    }
}

/// Renders `c` as a standalone `<svg>` element.
pub fn render(c: &Chart) -> String {
    let all = || c.series.iter().flat_map(|s| s.points.iter());
    let (mut xlo, mut xhi) = range(all().map(|p| p.0), c.x.log);
    if let Some(t) = &c.x.ticks {
        xlo = xlo.min(t.iter().map(|t| t.0).fold(f64::INFINITY, f64::min));
        xhi = xhi.max(t.iter().map(|t| t.0).fold(f64::NEG_INFINITY, f64::max));
    }
    let bars = || c.series.iter().flat_map(|s| s.whiskers.iter());
    let mut ys: Vec<f64> = all()
        .map(|p| p.1)
        .chain(bars().flat_map(|w| [w.1, w.2]))
        .collect();
    if let Some((y, _)) = &c.hline {
        ys.push(*y);
    }
    let (ylo, yhi) = range(ys.into_iter(), c.y.log);
    let sx = Scale {
        lo: xlo,
        hi: xhi,
        log: c.x.log,
        from: LEFT,
        to: WIDTH - RIGHT,
    };
    let sy = Scale {
        lo: ylo,
        hi: yhi,
        log: c.y.log,
        from: HEIGHT - BOTTOM,
        to: TOP,
    };
    let mut o = String::new();
    let _ = write!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = write!(
        o,
        r#"<text x="{LEFT}" y="20" font-size="15" font-weight="bold">{}</text>"#,
        esc(&c.title)
    );
    // Grid and ticks.
    for (v, label) in ticks_for(&c.y, ylo, yhi) {
        if v < ylo * 0.999_999 || v > yhi * 1.000_001 + 1e-12 {
            continue;
        }
        let y = sy.map(v);
        let _ = write!(
            o,
            r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            esc(&label)
        );
    }
    for (v, label) in ticks_for(&c.x, xlo, xhi) {
        let x = sx.map(v);
        let _ = write!(
            o,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{TOP}" y2="{}" stroke="#eee"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            HEIGHT - BOTTOM,
            HEIGHT - BOTTOM + 16.0,
            esc(&label)
        );
    }
    let _ = write!(
        o,
        r##"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="#888"/>"##,
        WIDTH - RIGHT - LEFT,
        HEIGHT - BOTTOM - TOP
    );
    let _ = write!(
        o,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (LEFT + WIDTH - RIGHT) / 2.0,
        HEIGHT - 10.0,
        esc(&c.x.label)
    );
    let _ = write!(
        o,
        r#"<text transform="translate(16 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
        (TOP + HEIGHT - BOTTOM) / 2.0,
        esc(&c.y.label)
    );
    for (v, label) in &c.vmarks {
        let x = sx.map(*v);
        let _ = write!(
            o,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{TOP}" y2="{}" stroke="#999" stroke-dasharray="4 3"/><text x="{:.1}" y="{}" fill="#666" font-size="11">{}</text>"##,
            HEIGHT - BOTTOM,
            x + 3.0,
            TOP + 12.0,
            esc(label)
        );
    }
    if let Some((v, label)) = &c.hline {
        let y = sy.map(*v);
        let _ = write!(
            o,
            r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#c00" stroke-dasharray="6 3"/><text x="{}" y="{:.1}" fill="#c00" font-size="11" text-anchor="end">{}</text>"##,
            WIDTH - RIGHT,
            WIDTH - RIGHT - 4.0,
            y - 4.0,
            esc(label)
        );
    }
    for (i, s) in c.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite() && (!c.y.log || *y > 0.0))
            .map(|(x, y)| format!("{:.1},{:.1}", sx.map(*x), sy.map(*y)))
            .collect();
        if pts.len() == 1 || s.points.len() <= 12 {
            for p in &pts {
                let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                let _ = write!(o, r#"<circle cx="{x}" cy="{y}" r="3" fill="{color}"/>"#);
            }
        }
        for &(x, lo, hi) in &s.whiskers {
            let fine = |v: f64| v.is_finite() && (!c.y.log || v > 0.0);
            if !(x.is_finite() && fine(lo) && fine(hi)) {
                continue;
            }
            let (x, y1, y2) = (sx.map(x), sy.map(lo), sy.map(hi));
            let _ = write!(
                o,
                r#"<g class="whisker" stroke="{color}" stroke-width="1.2"><line x1="{x:.1}" x2="{x:.1}" y1="{y1:.1}" y2="{y2:.1}"/><line x1="{:.1}" x2="{:.1}" y1="{y1:.1}" y2="{y1:.1}"/><line x1="{:.1}" x2="{:.1}" y1="{y2:.1}" y2="{y2:.1}"/></g>"#,
                x - 4.0,
                x + 4.0,
                x - 4.0,
                x + 4.0
            );
        }
        if pts.len() > 1 {
            let _ = write!(
                o,
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{}"/>"#,
                pts.join(" ")
            );
        }
        for ((x, y), label) in s.points.iter().zip(&s.labels) {
            if x.is_finite() && y.is_finite() && (!c.y.log || *y > 0.0) {
                let _ = write!(
                    o,
                    r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#444">{}</text>"##,
                    sx.map(*x) + 4.0,
                    sy.map(*y) - 5.0,
                    esc(label)
                );
            }
        }
        let ly = TOP + 14.0 + 18.0 * i as f64;
        let lx = WIDTH - RIGHT + 12.0;
        let _ = write!(
            o,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            esc(&s.name)
        );
    }
    o.push_str("</svg>");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_and_labels() {
        assert_eq!(
            nice_ticks(0.0, 10.0, 5),
            vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
        );
        assert_eq!(
            nice_ticks(0.0, 95_000.0, 6),
            vec![0.0, 20_000.0, 40_000.0, 60_000.0, 80_000.0]
        );
        assert_eq!(fmt_num(20_000.0), "20k");
        assert_eq!(fmt_num(1_500_000.0), "1.5M");
        assert_eq!(fmt_num(0.25), "0.25");
        assert_eq!(fmt_num(3.0), "3");
        assert_eq!(range([0.3, 42.0].into_iter(), true), (0.1, 100.0));
    }

    #[test]
    fn renders_a_chart() {
        let c = Chart {
            title: "a < b".into(),
            x: Axis::linear("t (s)"),
            y: Axis::log("ms"),
            series: vec![Series {
                name: "p99".into(),
                points: vec![(0.0, 1.0), (1.0, 10.0), (2.0, 0.0)],
                labels: vec!["first".into()],
                whiskers: vec![(1.0, 5.0, 500.0), (2.0, 0.0, 3.0)],
            }],
            vmarks: vec![(1.0, "measure".into())],
            hline: Some((100.0, "limit".into())),
        };
        let s = render(&c);
        assert!(s.starts_with("<svg") && s.ends_with("</svg>"));
        assert!(s.contains("a &lt; b"));
        assert!(s.contains("<polyline"));
        // One whisker; the one reaching 0 on the log axis is dropped. Its top widens the
        // y range to the decade above 500.
        assert_eq!(s.matches(r#"class="whisker""#).count(), 1, "{s}");
        assert!(s.contains(">1000<"), "{s}");
        assert!(s.contains("measure") && s.contains("limit") && s.contains(">first<"));
        // Zero is dropped on a log axis instead of producing NaN.
        assert!(!s.contains("NaN"));
        assert!(!render(&Chart::default()).contains("NaN"));
    }
}

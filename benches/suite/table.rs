//! Results: samples per measure (median, min–max), one row per measure with bento, the
//! plain-tools baseline, their ratio and the goal's verdict; printed as a Markdown table and
//! written into docs/benchmarks.md between markers, so the published table is the runner's.

use std::fmt::Write as _;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Unit {
    Bytes,
    Secs,
    Count,
    PerSec,
    KiB,
}

#[derive(Debug, Clone, Default)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    pub fn one(v: f64) -> Samples {
        Samples(vec![v])
    }
    pub fn push(&mut self, v: f64) {
        self.0.push(v);
    }
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }
    pub fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
    pub fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }
    pub fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }
}

pub fn fmt_value(v: f64, unit: Unit) -> String {
    if v.is_nan() {
        return "—".into();
    }
    match unit {
        Unit::Bytes if v < 100_000.0 => format!("{} B", thousands(v.round() as u64)),
        Unit::Bytes if v < 1e9 => format!("{:.2} MB", v / 1e6),
        Unit::Bytes => format!("{:.2} GB", v / 1e9),
        Unit::Secs if v < 1.0 => format!("{:.0} ms", v * 1000.0),
        Unit::Secs if v < 100.0 => format!("{v:.2} s"),
        Unit::Secs => format!("{v:.0} s"),
        Unit::Count => thousands(v.round() as u64),
        Unit::PerSec => format!("{v:.1}/s"),
        Unit::KiB => format!("{:.1} MiB", v / 1024.0),
    }
}

fn fmt_range(v: f64, unit: Unit, median: f64) -> String {
    // The range shows numbers only, in the median's unit (ms stays ms up to the max).
    if unit == Unit::Secs && median < 1.0 {
        return format!("{:.0}", v * 1000.0);
    }
    let s = fmt_value(v, unit);
    match s.rsplit_once(' ') {
        Some((n, _)) if unit != Unit::Count && unit != Unit::PerSec => n.to_owned(),
        _ => s,
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn cell(s: &Option<Samples>, unit: Unit) -> String {
    match s {
        None => "—".into(),
        Some(s) if s.0.is_empty() => "—".into(),
        Some(s) if s.0.len() == 1 => fmt_value(s.median(), unit),
        Some(s) => {
            let (lo, hi, m) = (s.min(), s.max(), s.median());
            if fmt_range(lo, unit, m) == fmt_range(hi, unit, m) {
                format!("{} (n={})", fmt_value(s.median(), unit), s.0.len())
            } else {
                format!(
                    "{} ({}–{}, n={})",
                    fmt_value(s.median(), unit),
                    fmt_range(lo, unit, m),
                    fmt_range(hi, unit, m),
                    s.0.len()
                )
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub measure: String,
    pub unit: Unit,
    pub bento: Option<Samples>,
    pub baseline: Option<Samples>,
    /// The goal in words and whether it was met (None: no goal on this row).
    pub goal: Option<(String, bool)>,
    /// Shown instead of values (a scenario that failed or is not available).
    pub note: Option<String>,
}

impl Row {
    pub fn new(scenario: &str, measure: &str, unit: Unit) -> Row {
        Row {
            scenario: scenario.into(),
            measure: measure.into(),
            unit,
            bento: None,
            baseline: None,
            goal: None,
            note: None,
        }
    }
    pub fn bento(mut self, s: Samples) -> Row {
        self.bento = Some(s);
        self
    }
    pub fn baseline(mut self, s: Samples) -> Row {
        self.baseline = Some(s);
        self
    }
    pub fn goal(mut self, text: impl Into<String>, met: bool) -> Row {
        self.goal = Some((text.into(), met));
        self
    }
    pub fn note(mut self, text: impl Into<String>) -> Row {
        self.note = Some(text.into());
        self
    }

    /// baseline ÷ bento, by medians ("how many times cheaper bento is"); for a rate
    /// (higher is better) bento ÷ baseline.
    fn ratio(&self) -> String {
        let (Some(b), Some(p)) = (&self.bento, &self.baseline) else {
            return "—".into();
        };
        let (b, p) = (b.median(), p.median());
        let r = if self.unit == Unit::PerSec {
            b / p
        } else {
            p / b
        };
        if !r.is_finite() {
            "—".into()
        } else if r >= 10.0 {
            format!("{r:.0}×")
        } else {
            format!("{r:.2}×")
        }
    }
}

/// The table in Markdown.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| scenario | measure | bento | baseline (plain tools) | baseline ÷ bento | goal |\n\
         | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        let goal = match &r.goal {
            None => String::new(),
            Some((text, true)) => format!("met: {text}"),
            Some((text, false)) => format!("**missed**: {text}"),
        };
        if let Some(note) = &r.note {
            let _ = writeln!(
                out,
                "| {} | {} | {note} | | | {goal} |",
                r.scenario, r.measure
            );
        } else {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {goal} |",
                r.scenario,
                r.measure,
                cell(&r.bento, r.unit),
                cell(&r.baseline, r.unit),
                r.ratio()
            );
        }
    }
    out
}

pub const BEGIN: &str =
    "<!-- bench-results:begin (written by bench/run.sh; do not edit by hand) -->";
pub const END: &str = "<!-- bench-results:end -->";

/// Replaces the text between the markers in `doc` with `body`.
pub fn write_doc(doc: &Path, body: &str) -> std::io::Result<()> {
    let text = std::fs::read_to_string(doc)?;
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        return Err(std::io::Error::other(format!(
            "{} lacks the markers {BEGIN} … {END}",
            doc.display()
        )));
    };
    let new = format!("{}{BEGIN}\n{body}{}", &text[..b], &text[e..]);
    std::fs::write(doc, new)
}

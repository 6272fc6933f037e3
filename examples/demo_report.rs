//! The forgetting demo's table and plot, from cf-eval's and cf-kl's reports.
//!
//!     demo_report RUNS_DIR base RUN... > results.md     (also writes RUNS_DIR/../results.svg)

use anyhow::{Context, Result};
use serde_json::Value;
use std::fmt::Write;
use std::path::Path;

fn read(p: &Path) -> Result<Value> {
    let t = std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?;
    serde_json::from_str(&t).with_context(|| format!("{}: invalid JSON", p.display()))
}

struct Row {
    name: String,
    capitals: f64,
    sums: f64,
    new: f64,
    kl: Option<(f64, f64)>,
}

impl Row {
    fn old(&self) -> f64 {
        (self.capitals + self.sums) / 2.0
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = Path::new(&args[0]);
    let mut rows = Vec::new();
    for name in &args[1..] {
        let e = read(&dir.join(format!("{name}.eval.json")))?;
        let acc = |t: &str| e["results"][t]["acc,none"].as_f64().unwrap_or(f64::NAN);
        let kl = match read(&dir.join(format!("{name}.kl.json"))) {
            Ok(k) => Some((
                k["kl_token"].as_f64().unwrap_or(f64::NAN),
                k["kl_token_stderr"].as_f64().unwrap_or(f64::NAN),
            )),
            Err(_) => None,
        };
        rows.push(Row {
            name: name.clone(),
            capitals: acc("old_capitals"),
            sums: acc("old_sums"),
            new: acc("new_eval"),
            kl,
        });
    }
    let mut md = String::new();
    writeln!(md, "| run | capitals (old) | sums (old, held out) | old mean | new task | KL(base ‖ run), nats/sample |")?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    for r in &rows {
        let kl = r.kl.map_or("0 (the base)".to_string(), |(k, s)| {
            format!("{k:.2} ± {s:.2}")
        });
        writeln!(
            md,
            "| {} | {:.3} | {:.3} | {:.3} | {:.3} | {kl} |",
            r.name,
            r.capitals,
            r.sums,
            r.old(),
            r.new
        )?;
    }
    print!("{md}");

    // Old-skill accuracy against new-task accuracy, one point per run.
    let (w, h, m) = (560.0, 420.0, 60.0);
    let x = |v: f64| m + v * (w - 2.0 * m);
    let y = |v: f64| h - m - v * (h - 2.0 * m);
    let mut svg = String::new();
    writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    )?;
    writeln!(svg, r#"<rect width="{w}" height="{h}" fill="white"/>"#)?;
    writeln!(
        svg,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="14">Forgetting vs learning (one point per run)</text>"#,
        w / 2.0
    )?;
    for t in 0..=4 {
        let v = t as f64 / 4.0;
        writeln!(
            svg,
            r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#ddd"/>"##,
            x(0.0),
            y(v),
            x(1.0),
            y(v)
        )?;
        writeln!(
            svg,
            r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#ddd"/>"##,
            x(v),
            y(0.0),
            x(v),
            y(1.0)
        )?;
        writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end">{v:.2}</text>"#,
            x(0.0) - 6.0,
            y(v) + 4.0
        )?;
        writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{v:.2}</text>"#,
            x(v),
            y(0.0) + 18.0
        )?;
    }
    writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">new-task accuracy</text>"#,
        w / 2.0,
        h - 16.0
    )?;
    writeln!(
        svg,
        r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">old-skill accuracy (mean)</text>"#,
        h / 2.0,
        h / 2.0
    )?;
    for r in &rows {
        let color = match r.name.as_str() {
            "base" => "#555",
            "plain" => "#d62728",
            n if n.starts_with("cf") => "#2ca02c",
            _ => "#1f77b4",
        };
        writeln!(
            svg,
            r#"<circle cx="{:.1}" cy="{:.1}" r="5" fill="{color}"/>"#,
            x(r.new),
            y(r.old())
        )?;
        writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            x(r.new) + 8.0,
            y(r.old()) - 6.0,
            r.name
        )?;
    }
    writeln!(svg, "</svg>")?;
    let svg_path = dir.parent().unwrap_or(dir).join("results.svg");
    std::fs::write(&svg_path, svg)
        .with_context(|| format!("{}: cannot write", svg_path.display()))?;
    Ok(())
}

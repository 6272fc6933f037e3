//! The forgetting demo's table and plot, with 95% intervals, from cf-eval's per-question logs
//! (`--log-samples`) and cf-kl's per-record values (`--per-record`) of every seed's run.
//!
//!     demo_report RUNS_DIR SEEDS base RUN... > results.md
//!
//! SEEDS is a comma-separated list (1,2,3). A run's files are RUNS_DIR/s{SEED}/{RUN}.samples.jsonl
//! and RUNS_DIR/s{SEED}/{RUN}.kl.jsonl; the base's is RUNS_DIR/base.samples.jsonl. Also writes
//! RUNS_DIR/../results.svg (old-skill against new-task accuracy, with error bars) and
//! RUNS_DIR/../results.json (every number and its interval).
//!
//! The intervals. Every seed's model answers the same questions (and cf-kl scores the same
//! held-out samples), so a number is the mean of a seeds × items table a[s][q], and it varies
//! with both the seed (training and sampling) and the choice of items. Its standard error is
//! taken as SE² = var_s(row means)/k + var_q(column means)/n, the two-way (crossed) clustered
//! error, which bounds the exact variance from above (the seed × item interaction is counted in
//! both terms); the 95% interval is mean ± t·SE with Welch–Satterthwaite degrees of freedom, so
//! 3 seeds give wide intervals where seeds disagree. The same on the paired differences a − a_plain
//! gives the "Δ old vs plain" column. An interval is cut to where the quantity can lie (an
//! accuracy in [0, 1], a KL ≥ 0). See Miller (2024), "Adding Error Bars to Evals",
//! arXiv 2411.00640, for clustered and paired standard errors on evaluations.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use statrs::distribution::{ContinuousCDF, StudentsT};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

/// The evaluation sets: cf-eval's task names.
const OLD: [&str; 2] = ["old_capitals", "old_sums"];
const NEW: &str = "new_eval";

#[derive(Clone, Copy)]
struct Est {
    mean: f64,
    lo: f64,
    hi: f64,
}

impl Est {
    /// The interval cut to where the quantity can lie (an accuracy in [0, 1], a KL ≥ 0).
    fn within(self, lo: f64, hi: f64) -> Est {
        Est {
            mean: self.mean,
            lo: self.lo.max(lo),
            hi: self.hi.min(hi),
        }
    }
    fn json(&self) -> Value {
        json!({"mean": self.mean, "ci95": [self.lo, self.hi]})
    }
    fn pct(&self) -> String {
        format!(
            "{:.1} [{:.1}, {:.1}]",
            100.0 * self.mean,
            100.0 * self.lo,
            100.0 * self.hi
        )
    }
    fn plain(&self, digits: usize) -> String {
        format!(
            "{:.d$} [{:.d$}, {:.d$}]",
            self.mean,
            self.lo,
            self.hi,
            d = digits
        )
    }
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

fn var(x: &[f64]) -> f64 {
    let m = mean(x);
    x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (x.len() as f64 - 1.0)
}

/// The mean of a seeds × items table and its 95% interval (see the module's comment).
fn crossed(a: &[Vec<f64>]) -> Result<Est> {
    let (k, n) = (a.len(), a[0].len());
    if n < 2 || a.iter().any(|r| r.len() != n) {
        bail!("every seed needs the same items, at least 2");
    }
    let rows: Vec<f64> = a.iter().map(|r| mean(r)).collect();
    let cols: Vec<f64> = (0..n)
        .map(|q| a.iter().map(|r| r[q]).sum::<f64>() / k as f64)
        .collect();
    let m = mean(&rows);
    let (sa, sb) = (
        if k > 1 { var(&rows) / k as f64 } else { 0.0 },
        var(&cols) / n as f64,
    );
    let se = (sa + sb).sqrt();
    if se == 0.0 {
        return Ok(Est {
            mean: m,
            lo: m,
            hi: m,
        });
    }
    let mut denom = sb * sb / (n as f64 - 1.0);
    if k > 1 {
        denom += sa * sa / (k as f64 - 1.0);
    }
    let dof = (sa + sb).powi(2) / denom;
    let t = StudentsT::new(0.0, 1.0, dof)?.inverse_cdf(0.975);
    Ok(Est {
        mean: m,
        lo: m - t * se,
        hi: m + t * se,
    })
}

fn lines(p: &Path) -> Result<Vec<Value>> {
    let t = std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?;
    t.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: invalid JSON", p.display(), i + 1))
        })
        .collect()
}

/// Per task, each question's accuracy (0 or 1) in doc_id order, from cf-eval's --log-samples.
fn per_question(p: &Path) -> Result<BTreeMap<String, Vec<f64>>> {
    let mut by: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for (i, r) in lines(p)?.iter().enumerate() {
        let (Some(task), Some(doc), Some(acc)) =
            (r["task"].as_str(), r["doc_id"].as_u64(), r["acc"].as_f64())
        else {
            bail!(
                "{}:{}: no task, doc_id or acc (a cf-eval --log-samples file?)",
                p.display(),
                i + 1
            );
        };
        by.entry(task.to_string()).or_default().push((doc, acc));
    }
    Ok(by
        .into_iter()
        .map(|(t, mut v)| {
            v.sort_by_key(|x| x.0);
            (t, v.into_iter().map(|x| x.1).collect())
        })
        .collect())
}

struct Run {
    name: String,
    /// seeds × questions, per task
    acc: BTreeMap<String, Vec<Vec<f64>>>,
    /// seeds × held-out samples: cf-kl's kl_token per record
    kl: Option<Vec<Vec<f64>>>,
}

impl Run {
    fn task(&self, t: &str) -> Result<&Vec<Vec<f64>>> {
        self.acc
            .get(t)
            .with_context(|| format!("{}: no questions of task {t}", self.name))
    }
    /// seeds × (the old skills' questions, concatenated)
    fn old(&self) -> Result<Vec<Vec<f64>>> {
        let (a, b) = (self.task(OLD[0])?, self.task(OLD[1])?);
        Ok(a.iter()
            .zip(b)
            .map(|(x, y)| x.iter().chain(y).copied().collect())
            .collect())
    }
}

fn load(dir: &Path, seeds: &[String], name: &str) -> Result<Run> {
    let mut acc: BTreeMap<String, Vec<Vec<f64>>> = BTreeMap::new();
    let mut kl = Vec::new();
    let seed_dirs: Vec<_> = if name == "base" {
        vec![dir.to_path_buf()]
    } else {
        seeds.iter().map(|s| dir.join(format!("s{s}"))).collect()
    };
    for d in &seed_dirs {
        for (t, v) in per_question(&d.join(format!("{name}.samples.jsonl")))? {
            acc.entry(t).or_default().push(v);
        }
        if name != "base" {
            let p = d.join(format!("{name}.kl.jsonl"));
            let v = lines(&p)?
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    r["kl_token"].as_f64().with_context(|| {
                        format!(
                            "{}:{}: no kl_token (cf-kl --per-record?)",
                            p.display(),
                            i + 1
                        )
                    })
                })
                .collect::<Result<Vec<f64>>>()?;
            kl.push(v);
        }
    }
    Ok(Run {
        name: name.to_string(),
        acc,
        kl: (name != "base").then_some(kl),
    })
}

struct Row {
    name: String,
    caps: Est,
    sums: Est,
    old: Est,
    vs_plain: Option<Est>,
    new: Est,
    kl: Option<Est>,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        bail!("usage: demo_report RUNS_DIR SEEDS base RUN...");
    }
    let dir = Path::new(&args[0]);
    let seeds: Vec<String> = args[1].split(',').map(str::to_string).collect();
    let runs: Vec<Run> = args[2..]
        .iter()
        .map(|n| load(dir, &seeds, n))
        .collect::<Result<_>>()?;
    let plain = runs.iter().find(|r| r.name == "plain");
    let mut rows = Vec::new();
    for r in &runs {
        let vs_plain = match plain {
            Some(p) if r.name != "plain" && r.name != "base" => {
                let (a, b) = (r.old()?, p.old()?);
                let d: Vec<Vec<f64>> = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| x.iter().zip(y).map(|(u, v)| u - v).collect())
                    .collect();
                Some(crossed(&d)?.within(-1.0, 1.0))
            }
            _ => None,
        };
        rows.push(Row {
            name: r.name.clone(),
            caps: crossed(r.task(OLD[0])?)?.within(0.0, 1.0),
            sums: crossed(r.task(OLD[1])?)?.within(0.0, 1.0),
            old: crossed(&r.old()?)?.within(0.0, 1.0),
            vs_plain,
            new: crossed(r.task(NEW)?)?.within(0.0, 1.0),
            kl: r
                .kl
                .as_ref()
                .map(|k| Ok::<_, anyhow::Error>(crossed(k)?.within(0.0, f64::INFINITY)))
                .transpose()?,
        });
    }

    let questions = |t: &str| runs[0].acc.get(t).map_or(0, |v| v[0].len());
    let mut md = String::new();
    writeln!(
        md,
        "Accuracy in % (mean over {} seeds) [95% interval]; {} + {} old-skill and {} new-task questions.\n",
        seeds.len(),
        questions(OLD[0]),
        questions(OLD[1]),
        questions(NEW)
    )?;
    writeln!(md, "| run | capitals (old) | sums (old, held out) | old mean | Δ old vs plain | new task | KL(base ‖ run), nats/sample |")?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    for r in &rows {
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            r.caps.pct(),
            r.sums.pct(),
            r.old.pct(),
            r.vs_plain.map_or("".into(), |e| {
                let s = e.pct();
                if e.lo > 0.0 || e.hi < 0.0 {
                    format!("**{s}**")
                } else {
                    s
                }
            }),
            r.new.pct(),
            r.kl.map_or("0 (the base)".into(), |e| e.plain(2)),
        )?;
    }
    writeln!(
        md,
        "\nBold: the interval of the difference from plain fine-tuning excludes 0."
    )?;
    print!("{md}");

    let report = json!({
        "seeds": seeds,
        "questions": {OLD[0]: questions(OLD[0]), OLD[1]: questions(OLD[1]), NEW: questions(NEW)},
        "interval": "95%, mean ± t·SE, SE² = var(seed means)/k + var(item means)/n, Welch–Satterthwaite dof",
        "runs": rows.iter().map(|r| json!({
            "name": r.name,
            "old_capitals": r.caps.json(),
            "old_sums": r.sums.json(),
            "old_mean": r.old.json(),
            "old_vs_plain": r.vs_plain.map(|e| e.json()),
            "new_task": r.new.json(),
            "kl_token": r.kl.map(|e| e.json()),
        })).collect::<Vec<_>>(),
    });
    let parent = dir.parent().unwrap_or(dir);
    let json_path = parent.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("{}: cannot write", json_path.display()))?;
    let svg_path = parent.join("results.svg");
    std::fs::write(&svg_path, plot(&rows, seeds.len())?)
        .with_context(|| format!("{}: cannot write", svg_path.display()))?;
    Ok(())
}

/// Old-skill accuracy against new-task accuracy, one point per run with its intervals as bars.
fn plot(rows: &[Row], seeds: usize) -> Result<String> {
    let (w, h, m) = (640.0, 480.0, 60.0);
    let x = |v: f64| m + v.clamp(0.0, 1.0) * (w - 2.0 * m);
    let y = |v: f64| h - m - v.clamp(0.0, 1.0) * (h - 2.0 * m);
    let mut svg = String::new();
    writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    )?;
    writeln!(svg, r#"<rect width="{w}" height="{h}" fill="white"/>"#)?;
    writeln!(
        svg,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="14">Forgetting vs learning: mean of {seeds} seeds, bars are 95% intervals</text>"#,
        w / 2.0
    )?;
    for t in 0..=4 {
        let v = t as f64 / 4.0;
        let (x0, x1, y0, y1) = (x(0.0), x(1.0), y(0.0), y(1.0));
        writeln!(
            svg,
            r##"<line x1="{x0}" y1="{}" x2="{x1}" y2="{}" stroke="#ddd"/>"##,
            y(v),
            y(v)
        )?;
        writeln!(
            svg,
            r##"<line x1="{}" y1="{y0}" x2="{}" y2="{y1}" stroke="#ddd"/>"##,
            x(v),
            x(v)
        )?;
        writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end">{v:.2}</text>"#,
            x0 - 6.0,
            y(v) + 4.0
        )?;
        writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{v:.2}</text>"#,
            x(v),
            y0 + 18.0
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
        r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">old-skill accuracy (mean of the two)</text>"#,
        h / 2.0,
        h / 2.0
    )?;
    for r in rows {
        let color = match r.name.as_str() {
            "base" => "#555",
            "plain" => "#d62728",
            n if n.starts_with("cf") => "#2ca02c",
            n if n.starts_with("wise") => "#9467bd",
            _ => "#1f77b4",
        };
        let (cx, cy) = (x(r.new.mean), y(r.old.mean));
        writeln!(
            svg,
            r#"<line x1="{:.1}" y1="{cy:.1}" x2="{:.1}" y2="{cy:.1}" stroke="{color}" stroke-width="1.5"/>"#,
            x(r.new.lo),
            x(r.new.hi)
        )?;
        writeln!(
            svg,
            r#"<line x1="{cx:.1}" y1="{:.1}" x2="{cx:.1}" y2="{:.1}" stroke="{color}" stroke-width="1.5"/>"#,
            y(r.old.lo),
            y(r.old.hi)
        )?;
        writeln!(
            svg,
            r#"<circle cx="{cx:.1}" cy="{cy:.1}" r="4" fill="{color}"/>"#
        )?;
        writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" fill="{color}">{}</text>"#,
            cx + 6.0,
            cy - 5.0,
            r.name
        )?;
    }
    writeln!(svg, "</svg>")?;
    Ok(svg)
}

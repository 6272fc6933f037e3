//! Progress of long work on stderr: a bar with an ETA when stderr is a terminal (indicatif),
//! and when it is a file or pipe a plain line every CF_PROGRESS_SECS seconds (default 30),
//! so a log shows the run is alive and how long it has left. Nothing with `-q`.

use crate::cli::LogArgs;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

pub struct Progress {
    bar: Option<ProgressBar>,
    plain: Option<std::cell::RefCell<Plain>>,
}

struct Plain {
    tool: String,
    unit: String,
    total: Option<u64>,
    done: u64,
    t0: Instant,
    last: Instant,
    every: Duration,
}

fn eta(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

impl Progress {
    /// Progress over `total` units (None: unknown, shown as a count and a rate).
    pub fn new(tool: &str, unit: &str, total: Option<u64>, log: &LogArgs) -> Progress {
        Progress::with_plain(tool, unit, total, log, true)
    }

    /// As [`Progress::new`]; `plain: false` for a tool that prints its own periodic lines
    /// when stderr is not a terminal (cf-train's --log-every).
    pub fn with_plain(
        tool: &str,
        unit: &str,
        total: Option<u64>,
        log: &LogArgs,
        plain: bool,
    ) -> Progress {
        if log.quiet {
            return Progress {
                bar: None,
                plain: None,
            };
        }
        if std::io::stderr().is_terminal() {
            let bar = match total {
                Some(n) => ProgressBar::new(n).with_style(
                    ProgressStyle::with_template(&format!(
                        "{tool}: {{bar:30}} {{pos}}/{{len}} {unit} {{msg}} [{{elapsed}} < {{eta}}]"
                    ))
                    .expect("valid template"),
                ),
                None => ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template(&format!(
                        "{tool}: {{spinner}} {{pos}} {unit} {{msg}} [{{elapsed}}, {{per_sec}}]"
                    ))
                    .expect("valid template"),
                ),
            };
            return Progress {
                bar: Some(bar),
                plain: None,
            };
        }
        if !plain {
            return Progress {
                bar: None,
                plain: None,
            };
        }
        let secs: f64 = crate::env::var(crate::env::CF_PROGRESS_SECS)
            .and_then(|v| v.parse().ok())
            .unwrap_or(30.0);
        let now = Instant::now();
        Progress {
            bar: None,
            plain: Some(std::cell::RefCell::new(Plain {
                tool: tool.to_string(),
                unit: unit.to_string(),
                total,
                done: 0,
                t0: now,
                last: now,
                every: Duration::from_secs_f64(secs.max(0.0)),
            })),
        }
    }

    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
        if let Some(p) = &self.plain {
            let mut p = p.borrow_mut();
            let p = &mut *p;
            p.done += n;
            if p.last.elapsed() >= p.every {
                p.last = Instant::now();
                let secs = p.t0.elapsed().as_secs_f64().max(1e-9);
                let rate = p.done as f64 / secs;
                let (count, left) = match p.total {
                    Some(t) if rate > 0.0 => (
                        format!("{}/{t}", p.done),
                        format!(", {} left", eta(t.saturating_sub(p.done) as f64 / rate)),
                    ),
                    Some(t) => (format!("{}/{t}", p.done), String::new()),
                    None => (p.done.to_string(), String::new()),
                };
                eprintln!("{}: {count} {} ({rate:.1}/s{left})", p.tool, p.unit);
            }
        }
    }

    /// A note beside the bar (e.g. tokens/s); plain lines do not carry it.
    pub fn set_message(&self, m: String) {
        if let Some(b) = &self.bar {
            b.set_message(m);
        }
    }

    /// Whether a bar is drawn (stderr is a terminal): lines printed meanwhile go through
    /// [`Progress::println`] so they do not tear it.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

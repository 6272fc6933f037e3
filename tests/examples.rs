//! The examples run, shortened, so they cannot rot.

use crate::util::*;
use std::process::Command;

#[test]
fn the_forgetting_experiment_runs_end_to_end() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("forgetting");
    let bin_dir = bin("cf-sample").parent().unwrap().to_path_buf();
    let run = |base_epochs: &str, seeds: &str| {
        Command::new(root().join("examples/forgetting/run.sh"))
            .arg("--quick")
            .arg(&out)
            .env("CF_BIN", &bin_dir)
            .env("BASE_EPOCHS", base_epochs)
            .env("SEEDS", seeds)
            .output()
            .unwrap()
    };
    let o = run("1", "1 2");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(
        o.status.success(),
        "exit {:?}\n{stdout}\n{stderr}",
        o.status.code()
    );
    let table = std::fs::read_to_string(out.join("results.md")).unwrap();
    let runs = [
        "base",
        "plain",
        "cf-1x",
        "cf-2x",
        "cf-4x",
        "cf-1x-t0.7",
        "cf-2x-t0.7",
        "cf-4x-t0.7",
        "contextual-4x",
        "replay-4x",
        "lora",
        "l2",
        "wise-0.25",
        "wise-0.5",
        "wise-0.75",
    ];
    for r in runs {
        assert!(
            table.lines().any(|l| l.starts_with(&format!("| {r} |"))),
            "no row for {r}:\n{table}"
        );
    }
    assert!(table.contains("mean over 2 seeds"), "{table}");
    assert!(
        table.contains("20 + 20 old-skill and 20 new-task questions"),
        "{table}"
    );
    // One point and two error bars per run.
    let svg = std::fs::read_to_string(out.join("results.svg")).unwrap();
    assert_eq!(svg.matches("<circle").count(), runs.len());
    // Every number has an interval around it; the intervals come from both seeds' runs.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let rows = report["runs"].as_array().unwrap();
    assert_eq!(rows.len(), runs.len());
    let mut widths = 0.0;
    for row in rows {
        for k in [
            "old_capitals",
            "old_sums",
            "old_mean",
            "new_task",
            "kl_token",
            "old_vs_plain",
        ] {
            let e = &row[k];
            if e.is_null() {
                let name = row["name"].as_str().unwrap();
                assert!(
                    (k == "kl_token" && name == "base")
                        || (k == "old_vs_plain" && (name == "base" || name == "plain")),
                    "{name}: no {k}"
                );
                continue;
            }
            let (m, lo, hi) = (
                e["mean"].as_f64().unwrap(),
                e["ci95"][0].as_f64().unwrap(),
                e["ci95"][1].as_f64().unwrap(),
            );
            assert!(lo <= m && m <= hi && m.is_finite(), "{row}");
            widths += hi - lo;
        }
    }
    assert!(widths > 0.0, "every interval is empty");
    // Each seed's runs were measured by both tools, question by question.
    for s in ["s1", "s2"] {
        for r in &runs[1..] {
            let kl: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(out.join(format!("runs/{s}/{r}.kl.json"))).unwrap(),
            )
            .unwrap();
            assert!(kl["kl_token"].as_f64().unwrap() >= 0.0);
            let logged =
                std::fs::read_to_string(out.join(format!("runs/{s}/{r}.samples.jsonl"))).unwrap();
            assert_eq!(logged.lines().count(), 60, "{s}/{r}");
        }
    }
    // Run again with another base (and one seed): the base folder is replaced, not refused.
    let o = run("2", "1");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn the_makefile_redoes_only_what_changed() {
    // examples/forgetting/Makefile: every target a tool's output. Built once, it is up to
    // date; a changed task file redoes the mixes and what follows them, not the base model or
    // its samples.
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("f");
    let cf = bin("cf-sample").parent().unwrap().to_path_buf();
    let make = |extra: &[&str]| {
        let mut c = Command::new("make");
        c.arg("-C")
            .arg(root().join("examples/forgetting"))
            .arg(format!("OUT={}", out.display()))
            .arg(format!("CF={}", cf.display()))
            .args(["BASE_EPOCHS=1", "EPOCHS=1", "SAMPLES=16"])
            .args(extra);
        c.output().unwrap()
    };
    let o = make(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "plain.eval.json",
        "cf-4x.eval.json",
        "plain.kl.json",
        "cf-4x.kl.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    assert_eq!(
        make(&["-q"]).status.code(),
        Some(0),
        "not up to date after a build"
    );
    // A newer task file.
    let t = out.join("data/new_train.jsonl");
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    std::fs::File::options()
        .append(true)
        .open(&t)
        .unwrap()
        .set_modified(later)
        .unwrap();
    let plan = String::from_utf8_lossy(&make(&["-n"]).stdout).to_string();
    assert!(
        plan.contains("cf-mix") && plan.contains("cf-train") && plan.contains("cf-eval"),
        "{plan}"
    );
    assert!(
        !plan.contains("cf-sample"),
        "the samples were redone:\n{plan}"
    );
    assert!(
        !plan.contains("base-init"),
        "the base was retrained:\n{plan}"
    );
}

#[test]
fn the_demo_report_intervals_are_the_crossed_standard_errors() {
    // demo_report's numbers on tiny hand-made logs, against the formula worked by hand:
    // SE² = var(seed means)/k + var(item means)/n, t with Welch–Satterthwaite dof.
    let d = tempfile::tempdir().unwrap();
    let runs = d.path().join("runs");
    let log = |path: std::path::PathBuf, tasks: [(&str, [f64; 4]); 3]| {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut s = String::new();
        for (t, accs) in tasks {
            for (i, a) in accs.iter().enumerate() {
                s += &format!("{{\"task\":\"{t}\",\"doc_id\":{i},\"acc\":{a}}}\n");
            }
        }
        std::fs::write(path, s).unwrap();
    };
    let kl = |path: std::path::PathBuf, v: [f64; 4]| {
        let s: String = v
            .iter()
            .map(|x| format!("{{\"kl_token\":{x}}}\n"))
            .collect();
        std::fs::write(path, s).unwrap();
    };
    let ones = [1.0; 4];
    log(
        runs.join("base.samples.jsonl"),
        [
            ("old_capitals", ones),
            ("old_sums", ones),
            ("new_eval", [0.0, 1.0, 0.0, 0.0]),
        ],
    );
    // plain: both seeds score 3 of 4 capitals, on different questions (the seed term is 0).
    log(
        runs.join("s1/plain.samples.jsonl"),
        [
            ("old_capitals", [1.0, 0.0, 1.0, 1.0]),
            ("old_sums", ones),
            ("new_eval", ones),
        ],
    );
    log(
        runs.join("s2/plain.samples.jsonl"),
        [
            ("old_capitals", [1.0, 1.0, 0.0, 1.0]),
            ("old_sums", ones),
            ("new_eval", ones),
        ],
    );
    // x: the seeds disagree on every sum (the item term is 0: one degree of freedom).
    log(
        runs.join("s1/x.samples.jsonl"),
        [
            ("old_capitals", ones),
            ("old_sums", ones),
            ("new_eval", ones),
        ],
    );
    log(
        runs.join("s2/x.samples.jsonl"),
        [
            ("old_capitals", ones),
            ("old_sums", [0.0; 4]),
            ("new_eval", ones),
        ],
    );
    for s in ["s1", "s2"] {
        kl(
            runs.join(format!("{s}/plain.kl.jsonl")),
            [1.0, 2.0, 3.0, 4.0],
        );
        kl(runs.join(format!("{s}/x.kl.jsonl")), [0.5, 0.5, 0.5, 0.5]);
    }
    let o = Command::new(
        bin("cf-sample")
            .parent()
            .unwrap()
            .join("examples/demo_report"),
    )
    .arg(&runs)
    .arg("1,2")
    .args(["base", "plain", "x"])
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("results.json")).unwrap())
            .unwrap();
    let est = |run: usize, k: &str| {
        let e = &r["runs"][run][k];
        (
            e["mean"].as_f64().unwrap(),
            e["ci95"][0].as_f64().unwrap(),
            e["ci95"][1].as_f64().unwrap(),
        )
    };
    let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-9, "{a} vs {b}");
    // t quantiles (scipy.stats.t.ppf(0.975, dof)).
    let (t1, t3) = (12.706204736174698, 3.182446305284263);
    // plain capitals: item means 1, .5, .5, 1: var 1/12, SE² = 1/48, dof 3; cut at 1.
    let (m, lo, hi) = est(1, "old_capitals");
    close(m, 0.75);
    close(lo, 0.75 - t3 * (1.0f64 / 48.0).sqrt());
    close(hi, 1.0);
    // plain KL 1..4 on both seeds: SE² = (5/3)/4, dof 3.
    let (m, lo, hi) = est(1, "kl_token");
    close(m, 2.5);
    close(lo, 2.5 - t3 * (5.0f64 / 12.0).sqrt());
    close(hi, 2.5 + t3 * (5.0f64 / 12.0).sqrt());
    // x sums: seed means 1 and 0: SE² = 0.5/2, dof 1; cut to [0, 1].
    let (m, lo, hi) = est(2, "old_sums");
    close(m, 0.5);
    assert!(t1 * 0.5 > 1.0);
    close(lo, 0.0);
    close(hi, 1.0);
    // x against plain on the 8 old questions: differences s1 [0,1,0,0, 0,0,0,0], s2 [0,0,1,0,
    // -1,-1,-1,-1]: seed means 1/8 and -3/8, item means 0, .5, .5, 0, -.5 ×4.
    let (m, lo, hi) = est(2, "old_vs_plain");
    let rows = [0.125f64, -0.375];
    let items = [0.0f64, 0.5, 0.5, 0.0, -0.5, -0.5, -0.5, -0.5];
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    let var = |x: &[f64]| {
        let m = mean(x);
        x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() as f64 - 1.0)
    };
    let (a, b) = (var(&rows) / 2.0, var(&items) / 8.0);
    close(m, mean(&rows));
    let dof = (a + b).powi(2) / (a * a / 1.0 + b * b / 7.0);
    assert!(dof > 1.0 && dof < 7.0, "{dof}");
    // The half-width over the SE is the t quantile at that dof: between t(7) and t(1).
    let ratio = (hi - lo) / 2.0 / (a + b).sqrt();
    assert!(ratio > 2.3646 && ratio < t1, "{ratio}");
    assert!(r["runs"][0]["kl_token"].is_null() && r["runs"][1]["old_vs_plain"].is_null());
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("| plain | 75.0 ["), "{table}");
}

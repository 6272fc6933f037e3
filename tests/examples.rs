//! The examples run, shortened, so they cannot rot.

use crate::util::*;
use std::process::Command;

#[test]
fn the_forgetting_experiment_runs_end_to_end() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("forgetting");
    let bin_dir = bin("cf-sample").parent().unwrap().to_path_buf();
    let o = Command::new(root().join("examples/forgetting/run.sh"))
        .arg(&out)
        .env("CF_BIN", &bin_dir)
        .env("BASE_EPOCHS", "1")
        .env("EPOCHS", "1")
        .env("CF_SAMPLES", "16")
        .output()
        .unwrap();
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
        "cf-4x",
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
    let svg = std::fs::read_to_string(out.join("results.svg")).unwrap();
    assert_eq!(svg.matches("<circle").count(), runs.len());
    // Every run was measured by both tools.
    for r in &runs[1..] {
        let kl: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(format!("runs/{r}.kl.json"))).unwrap(),
        )
        .unwrap();
        assert!(kl["kl_token"].as_f64().unwrap() >= 0.0);
        let ev: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(format!("runs/{r}.eval.json"))).unwrap(),
        )
        .unwrap();
        assert!(ev["compare"]["rows"].as_array().unwrap().len() >= 3);
    }
    // Run again with another base: the base folder is replaced, not refused.
    let o = Command::new(root().join("examples/forgetting/run.sh"))
        .arg(&out)
        .env("CF_BIN", &bin_dir)
        .env("BASE_EPOCHS", "2")
        .env("EPOCHS", "1")
        .env("CF_SAMPLES", "16")
        .output()
        .unwrap();
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

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
}

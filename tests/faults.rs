//! Faults that must not lose work or give silent wrong output: concurrent and stale runs,
//! non-finite weights, changed settings on resume, closed stdout, outputs checked before work,
//! all-or-none outputs, file modes, signals.

use crate::util::*;
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn train(dir: &Path, args: &[&str]) -> Run {
    let m = fixture("llama");
    let mut a = vec!["--model", m.to_str().unwrap(), "d.jsonl", "-q"];
    a.extend_from_slice(args);
    run("cf-train", &a, dir, None)
}

/// Every file below `dir` with its bytes, for "nothing changed" checks.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Hidden temporary files or folders left anywhere below `dir`.
fn temps(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if name.ends_with(".tmp") {
                out.push(p.clone());
            }
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

fn one_line_error(r: &Run, tool: &str, needle: &str) {
    assert_eq!(r.code, 2, "{r}");
    assert_eq!(r.stderr.lines().count(), 1, "not one line: {r}");
    assert!(r.stderr.starts_with(&format!("{tool}: error: ")), "{r}");
    assert!(r.stderr.contains(needle), "expected {needle:?}: {r}");
    assert!(!r.stderr.contains("panicked"), "{r}");
}

#[test]
fn a_run_owns_its_output_folder() {
    let d = tempfile::tempdir().unwrap();
    text_data(d.path(), 6);
    // Another run holds the folder's lock: a second run is refused and writes nothing.
    std::fs::create_dir(d.path().join("o")).unwrap();
    let lock = std::fs::File::create(d.path().join("o/.cf-train.lock")).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    let r = train(d.path(), &["-o", "o", "--max-steps", "1"]);
    one_line_error(
        &r,
        "cf-train",
        "another cf-train run is writing to this folder",
    );
    assert!(!d.path().join("o/model.safetensors").exists());
    drop(lock);
    // A finished run with checkpoints.
    let ok = |r: Run| assert_eq!(r.code, 0, "{r}");
    ok(train(
        d.path(),
        &["-o", "o", "--max-steps", "3", "--save-every", "1"],
    ));
    let before = snapshot(&d.path().join("o"));
    // A fresh run into it is refused, and nothing of the earlier run changes.
    let r = train(d.path(), &["-o", "o", "--max-steps", "2", "--lr", "1e-3"]);
    one_line_error(
        &r,
        "cf-train",
        "holds 2 checkpoint(s) of an earlier run: --resume continues it, --overwrite replaces it",
    );
    assert_eq!(snapshot(&d.path().join("o")), before);
    // Stale temporaries from a killed run are removed once the lock is held.
    std::fs::create_dir(d.path().join("o/.checkpoint-9.abcd.tmp")).unwrap();
    std::fs::write(
        d.path().join("o/.checkpoint-9.abcd.tmp/model.safetensors"),
        b"half",
    )
    .unwrap();
    std::fs::write(d.path().join("o/.model.safetensors.x1.tmp"), b"half").unwrap();
    let r = train(
        d.path(),
        &["-o", "o", "--max-steps", "2", "--lr", "1e-3", "--overwrite"],
    );
    assert_eq!(r.code, 0, "{r}");
    assert!(temps(d.path()).is_empty(), "{:?}", temps(d.path()));
    assert!(
        !d.path().join("o/checkpoint-1").exists(),
        "--overwrite removes the earlier run's checkpoints"
    );
}

#[test]
fn non_finite_weights_are_never_saved() {
    // A learning rate of 1e38 takes the weights to inf after a finite loss and gradient.
    let d = tempfile::tempdir().unwrap();
    text_data(d.path(), 6);
    let r = train(
        d.path(),
        &[
            "-o",
            "o",
            "--lr",
            "1e38",
            "--save-every",
            "1",
            "--max-steps",
            "4",
            "--max-grad-norm",
            "0",
        ],
    );
    assert_eq!(r.code, 2, "{r}");
    assert!(
        r.stderr.contains("not finite") || r.stderr.contains("the loss is"),
        "{r}"
    );
    // Whatever checkpoints exist hold only finite weights (a folder with nothing saved in it
    // is removed again).
    for e in std::fs::read_dir(d.path().join("o")).into_iter().flatten() {
        let p = e.unwrap().path();
        if p.join("model.safetensors").is_file() {
            let t = candle_core::safetensors::load(
                p.join("model.safetensors"),
                &candle_core::Device::Cpu,
            )
            .unwrap();
            for (k, v) in t {
                let v: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
                assert!(
                    v.iter().all(|x| x.is_finite()),
                    "{}: {k} is not finite",
                    p.display()
                );
            }
        }
    }
    assert!(!d.path().join("o/model.safetensors").exists());
}

#[test]
fn resume_refuses_changed_settings_and_metrics_describe_one_run() {
    let d = tempfile::tempdir().unwrap();
    text_data(d.path(), 6);
    let base = [
        "-o",
        "o",
        "--max-steps",
        "4",
        "--save-every",
        "2",
        "--batch-size",
        "2",
        "--metrics",
        "m.jsonl",
    ];
    let r = train(d.path(), &base);
    assert_eq!(r.code, 0, "{r}");
    // Resuming from checkpoint-2 with the same flags redoes steps 3 and 4: the metrics file
    // holds each step once.
    let mut a = base.to_vec();
    a.extend(["--resume-from", "o/checkpoint-2"]);
    let r = train(d.path(), &a);
    assert_eq!(r.code, 0, "{r}");
    let steps: Vec<u64> = std::fs::read_to_string(d.path().join("m.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, [1, 2, 3, 4]);
    for (flag, value) in [
        ("--lr", "2e-5"),
        ("--batch-size", "3"),
        ("--weight-decay", "0.1"),
    ] {
        let mut a = base.to_vec();
        a.extend(["--resume-from", "o/checkpoint-2", flag, value]);
        let r = train(d.path(), &a);
        one_line_error(&r, "cf-train", "the run was started with other settings");
        assert!(
            r.stderr.contains(&format!("{flag} ")) && r.stderr.contains("(was "),
            "{r}"
        );
    }
    // A fresh run with the same metrics file starts it afresh.
    let r = train(
        d.path(),
        &["-o", "o2", "--max-steps", "1", "--metrics", "m.jsonl"],
    );
    assert_eq!(r.code, 0, "{r}");
    assert_eq!(
        std::fs::read_to_string(d.path().join("m.jsonl"))
            .unwrap()
            .lines()
            .count(),
        1
    );
}

#[test]
fn closed_stdout_is_an_error_not_lost_data() {
    let d = tempfile::tempdir().unwrap();
    let fx = fixture("llama");
    let mc = root().join("fixtures/eval/mc.jsonl");
    std::fs::write(d.path().join("a.jsonl"), "{\"text\": \"x\"}\n").unwrap();
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "cf-sample",
            vec![
                "--model".into(),
                fx.display().to_string(),
                "-n".into(),
                "2".into(),
                "--max-tokens".into(),
                "3".into(),
            ],
        ),
        ("cf-mix", vec!["a.jsonl".into()]),
        (
            "cf-eval",
            vec![
                "--model".into(),
                fx.display().to_string(),
                "--task".into(),
                mc.display().to_string(),
            ],
        ),
        (
            "cf-kl",
            vec![
                "--base".into(),
                fx.display().to_string(),
                "--model".into(),
                fx.display().to_string(),
                "a.jsonl".into(),
            ],
        ),
    ];
    for (tool, args) in cases {
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "exec '{}' {} >&-",
                bin(tool).display(),
                quoted.join(" ")
            ))
            .current_dir(d.path())
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{tool}: {err}");
        assert!(err.contains("stdout is closed"), "{tool}: {err}");
    }
}

#[test]
fn outputs_are_checked_before_any_work() {
    let d = tempfile::tempdir().unwrap();
    let fx = fixture("llama");
    let mc = root().join("fixtures/eval/mc.jsonl");
    let nope = "missing-dir/out.json";
    // A model that does not exist: the output path is what fails, so nothing was loaded first.
    let r = run(
        "cf-eval",
        &[
            "--model",
            "no-such-model",
            "--task",
            mc.to_str().unwrap(),
            "-o",
            nope,
        ],
        d.path(),
        None,
    );
    one_line_error(
        &r,
        "cf-eval",
        "-o missing-dir/out.json: cannot write in missing-dir",
    );
    let r = run(
        "cf-eval",
        &[
            "--model",
            "no-such-model",
            "--task",
            mc.to_str().unwrap(),
            "--log-samples",
            "missing-dir/s.jsonl",
        ],
        d.path(),
        None,
    );
    one_line_error(&r, "cf-eval", "--log-samples missing-dir/s.jsonl");
    let r = run(
        "cf-sample",
        &["--model", "no-such-model", "-o", "missing-dir/s.jsonl"],
        d.path(),
        None,
    );
    one_line_error(&r, "cf-sample", "missing-dir");
    std::fs::write(d.path().join("r.jsonl"), "{\"token_ids\": [5, 6]}\n").unwrap();
    // cf-kl without --base and records without logprob: said before --model is loaded.
    let r = run(
        "cf-kl",
        &["--model", "no-such-model", "r.jsonl"],
        d.path(),
        None,
    );
    one_line_error(&r, "cf-kl", "r.jsonl:1: no \"logprob\" field; give --base");
    let r = run(
        "cf-kl",
        &[
            "--model",
            "no-such-model",
            "--base",
            fx.to_str().unwrap(),
            "r.jsonl",
            "--per-record",
            "missing-dir/p.jsonl",
        ],
        d.path(),
        None,
    );
    one_line_error(&r, "cf-kl", "missing-dir");
    // cf-mix: a --report that cannot be written fails before -o is written.
    std::fs::write(d.path().join("a.jsonl"), "{\"text\": \"x\"}\n").unwrap();
    let r = run(
        "cf-mix",
        &[
            "a.jsonl",
            "-o",
            "mix.jsonl",
            "--report",
            "missing-dir/r.json",
        ],
        d.path(),
        None,
    );
    one_line_error(&r, "cf-mix", "missing-dir");
    assert!(
        !d.path().join("mix.jsonl").exists(),
        "-o must not land without --report"
    );
    assert!(temps(d.path()).is_empty());
}

#[test]
fn outputs_get_the_modes_cp_would_give() {
    let d = tempfile::tempdir().unwrap();
    text_data(d.path(), 6);
    let fx = fixture("llama");
    // Under umask 022 (a shell's `umask 022; cf-...`): files 0644, folders 0755; an existing
    // 0644 file keeps 0644 when overwritten.
    let sh = |cmd: String| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("umask 022; {cmd}"))
            .current_dir(d.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(d.path().join("mix.jsonl"), "old").unwrap();
    std::fs::set_permissions(
        d.path().join("mix.jsonl"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    sh(format!(
        "'{}' d.jsonl -o mix.jsonl --report rep.json -q",
        bin("cf-mix").display()
    ));
    sh(format!(
        "'{}' --model '{}' -n 1 --max-tokens 2 -o s.parquet -q",
        bin("cf-sample").display(),
        fx.display()
    ));
    sh(format!(
        "'{}' --model '{}' d.jsonl -o ft --max-steps 2 --save-every 1 -q",
        bin("cf-train").display(),
        fx.display()
    ));
    let mode = |p: &str| {
        std::fs::metadata(d.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    for f in [
        "mix.jsonl",
        "rep.json",
        "s.parquet",
        "ft/model.safetensors",
        "ft/config.json",
        "ft/tokenizer.json",
        "ft/checkpoint-1/optimizer.safetensors",
    ] {
        assert_eq!(mode(f), 0o644, "{f}");
    }
    for f in ["ft", "ft/checkpoint-1"] {
        assert_eq!(mode(f), 0o755, "{f}");
    }
}

#[test]
fn an_interrupted_tool_leaves_no_temporary_files() {
    // cf-sample writing a large -o: SIGINT (Ctrl-C) and SIGTERM while the temporary file
    // exists. The tool removes it and exits 130; the output never appears.
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let d = tempfile::tempdir().unwrap();
        let fx = fixture("llama");
        let mut child = Command::new(bin("cf-sample"))
            .args([
                "--model",
                fx.to_str().unwrap(),
                "-n",
                "100000",
                "--max-tokens",
                "64",
                "-o",
                "s.jsonl",
                "-q",
            ])
            .current_dir(d.path())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = std::time::Instant::now();
        while temps(d.path()).is_empty() {
            assert!(t0.elapsed().as_secs() < 30, "no temporary output appeared");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(130), "signal {sig}");
        assert!(
            temps(d.path()).is_empty(),
            "left behind: {:?}",
            temps(d.path())
        );
        assert!(!d.path().join("s.jsonl").exists());
    }
}

#[test]
fn a_bus_error_under_the_memory_map_is_one_line() {
    // A file shrinking under cf-mix's memory map raises SIGBUS. The signal is sent here
    // directly (a truncation race cannot be timed reliably in a test); the handler is the same:
    // one line, the unfinished output removed, exit 2.
    let d = tempfile::tempdir().unwrap();
    let child = Command::new(bin("cf-mix"))
        .args(["-", "-o", "mix.jsonl"])
        .current_dir(d.path())
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while temps(d.path()).is_empty() {
        assert!(t0.elapsed().as_secs() < 30, "no temporary output appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGBUS) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("cf-mix: error: an input file changed while it was being read"),
        "{err}"
    );
    assert!(temps(d.path()).is_empty() && !d.path().join("mix.jsonl").exists());
}

#[test]
fn a_huge_request_costs_only_the_shard_it_draws() {
    // 10^12 samples in 10^6 shards: the last shard starts at once (no job list of 10^12).
    let d = tempfile::tempdir().unwrap();
    let fx = fixture("llama");
    let mut child = Command::new(bin("cf-sample"))
        .args([
            "--model",
            fx.to_str().unwrap(),
            "-n",
            "1000000000000",
            "--shard",
            "1000000/1000000",
            "--max-tokens",
            "2",
            "-q",
        ])
        .current_dir(d.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let rec: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(rec["index"], 999_999_000_000u64);
}

#[test]
fn progress_and_verbose_lines() {
    // stderr is not a terminal here: progress comes as plain lines (every CF_PROGRESS_SECS), and
    // -v says what was loaded.
    let d = tempfile::tempdir().unwrap();
    let fx = fixture("llama");
    let mc = root().join("fixtures/eval/mc.jsonl");
    let r = run_env(
        "cf-eval",
        &[
            "--model",
            fx.to_str().unwrap(),
            "--task",
            mc.to_str().unwrap(),
            "-v",
        ],
        d.path(),
        None,
        &[("CF_PROGRESS_SECS", "0")],
    );
    assert_eq!(r.code, 0, "{r}");
    assert!(r.stderr.contains("cf-eval: 8/8 mc documents"), "{r}");
    assert!(r.stderr.contains("left"), "{r}");
    assert!(
        r.stderr.contains("cf-eval: loaded") && r.stderr.contains("parameters"),
        "{r}"
    );
    let r = run_env(
        "cf-eval",
        &[
            "--model",
            fx.to_str().unwrap(),
            "--task",
            mc.to_str().unwrap(),
            "-v",
        ],
        d.path(),
        None,
        &[("CF_THREADS", "1")],
    );
    assert!(r.stderr.contains("(1 threads)"), "CF_THREADS: {r}");
    let r = run_env(
        "cf-eval",
        &[
            "--model",
            fx.to_str().unwrap(),
            "--task",
            mc.to_str().unwrap(),
        ],
        d.path(),
        None,
        &[("CF_PROGRESS_SECS", "0")],
    );
    assert!(!r.stderr.contains("cf-eval: loaded"), "-v only: {r}");
    let r = run_env(
        "cf-eval",
        &[
            "--model",
            fx.to_str().unwrap(),
            "--task",
            mc.to_str().unwrap(),
            "-q",
        ],
        d.path(),
        None,
        &[("CF_PROGRESS_SECS", "0")],
    );
    assert!(r.stderr.is_empty(), "-q: {r}");
}

#[test]
fn a_huge_record_is_trained_in_bounded_memory() {
    // 40 MB of text in one record: the tokenizer alone would take ~8 GB for it. Cut before
    // tokenizing (only --max-length tokens are kept), the run fits a 3 GB address space.
    let d = tempfile::tempdir().unwrap();
    let big = "The cat sees the moon. ".repeat(40_000_000 / 23);
    std::fs::write(
        d.path().join("d.jsonl"),
        json!({"text": big}).to_string() + "\n",
    )
    .unwrap();
    let fx = fixture("llama");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v 3000000; exec '{}' --model '{}' d.jsonl -o o --max-steps 1 --max-length 64 -q",
            bin("cf-train").display(),
            fx.display()
        ))
        .current_dir(d.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(d.path().join("o/model.safetensors").is_file());
}

//! cf-mix, through the real binary.

use crate::util::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

fn write_jsonl(dir: &Path, name: &str, n: usize, f: impl Fn(usize) -> Value) {
    let text: String = (0..n).map(|i| f(i).to_string() + "\n").collect();
    std::fs::write(dir.join(name), text).unwrap();
}

fn mix(dir: &Path, args: &[&str]) -> Run {
    run("cf-mix", args, dir, None)
}

fn lines(out: &Run) -> Vec<Value> {
    assert_eq!(out.code, 0, "{out}");
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn per_source(recs: &[Value]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in recs {
        *m.entry(r["source"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    m
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_jsonl(
        dir.path(),
        "a.jsonl",
        10,
        |i| json!({"prompt": format!("q{i}"), "completion": format!("a{i}"), "i": i}),
    );
    write_jsonl(
        dir.path(),
        "b.jsonl",
        4,
        |i| json!({"token_ids": vec![1; i + 1], "i": i}),
    );
    write_jsonl(
        dir.path(),
        "c.jsonl",
        6,
        |i| json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": format!("m{i}")}], "i": i}),
    );
    dir
}

#[test]
fn shares_oversample_by_default_cap_and_total() {
    let d = setup();
    let out = mix(d.path(), &["a.jsonl=1", "b.jsonl=1", "--seed", "1"]);
    let r = lines(&out);
    assert_eq!(
        per_source(&r),
        HashMap::from([("a".into(), 10), ("b".into(), 10)])
    );
    assert!(
        out.stderr
            .contains("warning: b: 4 records oversampled to 10 (each used up to 3 times)"),
        "{out}"
    );

    let r = lines(&mix(d.path(), &["a.jsonl=1", "b.jsonl=1", "--cap"]));
    assert_eq!(
        per_source(&r),
        HashMap::from([("a".into(), 4), ("b".into(), 4)])
    );
    let mut b_ids: Vec<u64> = r
        .iter()
        .filter(|x| x["source"] == "b")
        .map(|x| x["i"].as_u64().unwrap())
        .collect();
    b_ids.sort();
    assert_eq!(b_ids, vec![0, 1, 2, 3], "--cap uses each record once");

    let r = lines(&mix(d.path(), &["a.jsonl=1", "b.jsonl=1", "--total", "7"]));
    assert_eq!(
        per_source(&r),
        HashMap::from([("a".into(), 4), ("b".into(), 3)])
    );

    // 3:1 — a is the limiting source for using everything once: b = 10 needs a = 30.
    let r = lines(&mix(d.path(), &["a.jsonl=3", "b.jsonl=1"]));
    assert_eq!(
        per_source(&r),
        HashMap::from([("a".into(), 12), ("b".into(), 4)])
    );
}

#[test]
fn all_counts_and_per() {
    let d = setup();
    let out = mix(
        d.path(),
        &[
            "a.jsonl=all",
            "b.jsonl=n:3",
            "c.jsonl=per:0.5",
            "--report",
            "r.json",
        ],
    );
    let r = lines(&out);
    // per:0.5 of the 13 fixed records is 6.5, rounded so the mix holds round(19.5) = 20.
    assert_eq!(
        per_source(&r),
        HashMap::from([("a".into(), 10), ("b".into(), 3), ("c".into(), 7)])
    );
    let rep: Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("r.json")).unwrap()).unwrap();
    assert_eq!(rep["records_out"], 20);
    let c = &rep["sources"][2];
    assert_eq!(
        (
            c["records_in"].as_u64(),
            c["records_out"].as_u64(),
            c["max_repeats"].as_u64()
        ),
        (Some(6), Some(7), Some(2))
    );
    // n: larger than the source: oversampled with a warning, or clipped by --cap.
    let out = mix(d.path(), &["b.jsonl=n:9"]);
    assert_eq!(lines(&out).len(), 9);
    assert!(out.stderr.contains("oversampled"), "{out}");
    assert_eq!(lines(&mix(d.path(), &["b.jsonl=n:9", "--cap"])).len(), 4);
    // Shares cannot be mixed with the other forms.
    let out = mix(d.path(), &["a.jsonl=1", "b.jsonl=all"]);
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("give every source a share"), "{out}");
}

#[test]
fn token_ratios() {
    let d = setup();
    // b's records hold 1+2+3+4 = 10 tokens (token_ids); a is counted with the tokenizer.
    let tok = fixture("olmo");
    let out = mix(
        d.path(),
        &[
            "a.jsonl=all",
            "b.jsonl=per:0.5",
            "--by",
            "tokens",
            "--tokenizer",
            tok.to_str().unwrap(),
            "--report",
            "r.json",
            "-q",
        ],
    );
    let r = lines(&out);
    let rep: Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("r.json")).unwrap()).unwrap();
    let a_tokens = rep["sources"][0]["tokens_in"].as_u64().unwrap();
    assert!(a_tokens > 20, "{rep}");
    assert_eq!(rep["sources"][0]["tokens_out"].as_u64(), Some(a_tokens));
    let b_target = 0.5 * a_tokens as f64;
    let b_out = rep["sources"][1]["tokens_out"].as_u64().unwrap() as f64;
    // Whole records: the budget is reached, and passed by less than one record (≤ 4 tokens).
    assert!(
        b_out >= b_target && b_out < b_target + 4.0,
        "b: {b_out} tokens for a budget of {b_target}"
    );
    let b_recs: usize = r.iter().filter(|x| x["source"] == "b").count();
    assert_eq!(
        b_recs as u64,
        rep["sources"][1]["records_out"].as_u64().unwrap()
    );
    // Without a tokenizer, records without token_ids cannot be counted.
    let out = mix(d.path(), &["a.jsonl=1", "--by", "tokens"]);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr
            .contains("a.jsonl:1: no \"token_ids\": --by tokens needs --tokenizer"),
        "{out}"
    );
}

#[test]
fn same_seed_same_bytes() {
    let d = setup();
    let a = mix(
        d.path(),
        &["a.jsonl=1", "b.jsonl=1", "c.jsonl=2", "--seed", "5", "-q"],
    );
    let b = mix(
        d.path(),
        &["a.jsonl=1", "b.jsonl=1", "c.jsonl=2", "--seed", "5", "-q"],
    );
    let c = mix(
        d.path(),
        &["a.jsonl=1", "b.jsonl=1", "c.jsonl=2", "--seed", "6", "-q"],
    );
    assert_eq!(a.stdout, b.stdout);
    assert_ne!(a.stdout, c.stdout);
    for f in ["x.parquet", "y.parquet"] {
        assert_eq!(
            mix(
                d.path(),
                &["a.jsonl=1", "b.jsonl=1", "--seed", "5", "-q", "-o", f]
            )
            .code,
            0
        );
    }
    assert_eq!(
        std::fs::read(d.path().join("x.parquet")).unwrap(),
        std::fs::read(d.path().join("y.parquet")).unwrap()
    );
}

#[test]
fn parquet_and_stdin_sources_and_fields_pass_through() {
    let d = setup();
    // JSONL → Parquet → mixed again from Parquet and from stdin: the same records.
    assert_eq!(mix(d.path(), &["c.jsonl", "-o", "c.parquet", "-q"]).code, 0);
    // (c.parquet is itself a shuffle, so compare the records in order of their "i".)
    let sorted = |mut v: Vec<Value>| {
        v.sort_by_key(|x| x["i"].as_u64());
        v
    };
    let from_jsonl = sorted(lines(&mix(d.path(), &["c.jsonl", "--seed", "3", "-q"])));
    let from_parquet = sorted(lines(&mix(d.path(), &["c:c.parquet", "--seed", "3", "-q"])));
    let piped = run(
        "cf-mix",
        &["c:-", "--seed", "3", "-q"],
        d.path(),
        Some(&std::fs::read(d.path().join("c.parquet")).unwrap()),
    );
    let from_stdin = sorted(lines(&piped));
    assert_eq!(from_jsonl, from_parquet);
    assert_eq!(from_jsonl, from_stdin);
    assert_eq!(from_jsonl[0]["messages"][1]["role"], "assistant");
    let stdin_jsonl = run(
        "cf-mix",
        &["-", "-q"],
        d.path(),
        Some(std::fs::read(d.path().join("a.jsonl")).unwrap().as_slice()),
    );
    let r = lines(&stdin_jsonl);
    assert_eq!(r.len(), 10);
    assert_eq!(r[0]["source"], "stdin");
    assert!(r
        .iter()
        .all(|x| x["prompt"].is_string() && x["completion"].is_string()));
}

#[test]
fn map_weight_and_labels() {
    let d = setup();
    let r = lines(&mix(
        d.path(),
        &[
            "task:a.jsonl",
            "cf:b.jsonl",
            "--map",
            "prompt=question",
            "--weight",
            "cf=0.25",
            "-q",
        ],
    ));
    for x in &r {
        match x["source"].as_str().unwrap() {
            "task" => {
                assert!(x.get("prompt").is_none() && x["question"].is_string());
                assert!(x.get("weight").is_none());
            }
            "cf" => assert_eq!(x["weight"], 0.25),
            other => panic!("source {other}"),
        }
    }
    let out = mix(d.path(), &["a.jsonl", "--weight", "zzz=1"]);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr
            .contains("--weight zzz: no source is labelled \"zzz\""),
        "{out}"
    );
    let out = mix(d.path(), &["a.jsonl", "x/a.jsonl"]);
    assert!(
        out.stderr.contains("two sources are labelled \"a\""),
        "{out}"
    );
}

#[test]
fn bad_rows_are_named_and_skipping_is_counted() {
    let d = setup();
    std::fs::write(
        d.path().join("bad.jsonl"),
        "{\"text\": \"a\"}\n{\"text\": \n[1]\n{\"text\": \"d\"}\n",
    )
    .unwrap();
    let out = mix(d.path(), &["bad.jsonl", "-o", "m.jsonl"]);
    assert_eq!(out.code, 2);
    assert_eq!(
        out.stderr.trim(),
        "cf-mix: error: bad.jsonl:2: invalid JSON at column 9"
    );
    assert!(!d.path().join("m.jsonl").exists(), "no output on error");
    let out = mix(d.path(), &["bad.jsonl", "--skip-bad"]);
    assert_eq!(lines(&out).len(), 2);
    assert!(out.stderr.contains("bad: skipped 2 bad records"), "{out}");
}

#[test]
fn large_parquet_output_streams_in_row_groups() {
    let d = tempfile::tempdir().unwrap();
    write_jsonl(
        d.path(),
        "big.jsonl",
        20000,
        |i| json!({"text": format!("doc {i}"), "n": i}),
    );
    assert_eq!(
        mix(
            d.path(),
            &["big.jsonl", "-o", "big.parquet", "-q", "--seed", "2"]
        )
        .code,
        0
    );
    let back: Vec<_> = cf_common::record::open(
        Some(d.path().join("big.parquet").to_str().unwrap()),
        Default::default(),
    )
    .unwrap()
    .map(|r| r.unwrap())
    .collect();
    assert_eq!(back.len(), 20000);
    let groups: std::collections::BTreeSet<usize> = back
        .iter()
        .map(|(loc, _)| match loc.pos {
            cf_common::record::Pos::Row { group, .. } => group,
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(groups.len(), 3, "8192 rows per group");
    let mut ns: Vec<u64> = back.iter().map(|(_, r)| r["n"].as_u64().unwrap()).collect();
    assert_ne!(ns[..10], (0..10).collect::<Vec<_>>()[..], "shuffled");
    ns.sort();
    assert_eq!(ns, (0..20000).collect::<Vec<_>>());
}

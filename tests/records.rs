//! Records: JSONL and Parquet in and out, locations in errors, skipping, atomic outputs.

use cf_common::record::{self, Output, Pos, ReadOptions, Writer};
use serde_json::json;

fn recs() -> Vec<record::Record> {
    vec![
        json!({"text": "hello", "token_ids": [1, 2, 3], "logprob": -3.5, "extra": {"a": [1.5, 2]}}),
        json!({"text": "wörld", "token_ids": [], "logprob": -1, "only_here": true}),
    ]
    .into_iter()
    .map(|v| v.as_object().unwrap().clone())
    .collect()
}

fn write(path: &std::path::Path, rs: &[record::Record]) {
    let mut w = Writer::create(&Output::parse(Some(path.to_str().unwrap())).unwrap()).unwrap();
    for r in rs {
        w.write(r).unwrap();
    }
    w.finish().unwrap();
}

fn read(path: &std::path::Path) -> Vec<record::Record> {
    record::open(Some(path.to_str().unwrap()), ReadOptions::default())
        .unwrap()
        .map(|r| r.unwrap().1)
        .collect()
}

#[test]
fn jsonl_and_parquet_carry_the_same_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (j, p) = (dir.path().join("a.jsonl"), dir.path().join("a.parquet"));
    write(&j, &recs());
    write(&p, &recs());
    let (from_j, from_p) = (read(&j), read(&p));
    assert_eq!(from_j, recs());
    assert_eq!(from_p.len(), 2);
    for (a, b) in from_j.iter().zip(&from_p) {
        assert_eq!(a["text"], b["text"]);
        assert_eq!(a["token_ids"], b["token_ids"]);
        assert_eq!(a["logprob"].as_f64(), b["logprob"].as_f64());
    }
    // Fields missing from a row read back as null; nested values survive.
    assert_eq!(from_p[0]["only_here"], serde_json::Value::Null);
    assert_eq!(from_p[0]["extra"], json!({"a": [1.5, 2.0]}));
    assert_eq!(&std::fs::read(&p).unwrap()[..4], b"PAR1");
}

#[test]
fn errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("bad.jsonl");
    std::fs::write(&j, "{\"text\": \"a\"}\n\n{\"text\": oops}\n[1,2]\n").unwrap();
    let name = j.to_str().unwrap();
    let mut r = record::open(Some(name), ReadOptions::default()).unwrap();
    let (loc, _) = r.next().unwrap().unwrap();
    assert_eq!(loc.pos, Pos::Line(1));
    let err = cf_common::exit::one_line(&r.next().unwrap().unwrap_err());
    assert_eq!(
        err,
        format!("{name}:3: invalid JSON at column 10: expected value")
    );
    assert!(r.next().is_none(), "a reader stops after its first error");

    // Skipping is opt-in and counted.
    let mut r = record::open(Some(name), ReadOptions { skip_bad: true }).unwrap();
    let good: Vec<_> = r.by_ref().map(|x| x.unwrap()).collect();
    assert_eq!(good.len(), 1);
    assert_eq!(r.skipped(), 2);
}

#[test]
fn a_tool_rejecting_a_record_gets_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let j = dir.path().join("sft.jsonl");
    std::fs::write(&j, "{\"text\": \"a\"}\n{\"prompt\": \"b\"}\n").unwrap();
    let mut r = record::open(Some(j.to_str().unwrap()), ReadOptions::default()).unwrap();
    r.next().unwrap().unwrap();
    let (loc, rec) = r.next().unwrap().unwrap();
    assert!(rec.get("text").is_none());
    let e = r
        .reject(&loc, anyhow::anyhow!("missing field \"text\""))
        .unwrap_err();
    assert_eq!(
        cf_common::exit::one_line(&e),
        format!("{}:2: missing field \"text\"", j.display())
    );
}

#[test]
fn outputs_are_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("out.parquet");
    {
        let mut w = Writer::create(&Output::parse(Some(p.to_str().unwrap())).unwrap()).unwrap();
        w.write(&recs()[0]).unwrap();
        // dropped without finish(): as on an error
    }
    assert!(!p.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "temporary file left behind"
    );
    std::fs::write(&p, b"old").unwrap();
    {
        let mut w = Writer::create(&Output::parse(Some(p.to_str().unwrap())).unwrap()).unwrap();
        w.write(&recs()[0]).unwrap();
    }
    assert_eq!(
        std::fs::read(&p).unwrap(),
        b"old",
        "a failed write must leave the old file intact"
    );
}

#[test]
fn unknown_extension_is_refused() {
    let e = Output::parse(Some("out.csv")).unwrap_err();
    assert!(
        e.to_string().contains("out.csv: cannot tell the format"),
        "{e}"
    );
}

#[test]
fn corrupt_parquet_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.parquet");
    std::fs::write(&p, b"PAR1 this is not parquet").unwrap();
    let e = record::open(Some(p.to_str().unwrap()), ReadOptions::default())
        .err()
        .unwrap();
    assert!(cf_common::exit::one_line(&e)
        .starts_with(&format!("{}: not a readable Parquet file", p.display())));
}

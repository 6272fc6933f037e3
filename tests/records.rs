//! Records: JSONL and Parquet in and out, locations in errors, skipping, atomic outputs.

use crate::util::*;
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

#[test]
fn compressed_inputs_are_read() {
    // Parquet compressed with gzip, lz4 or brotli, and JSONL as .jsonl.gz / .jsonl.zst (and on
    // stdin), read by cf-mix as the plain file is.
    use parquet::arrow::ArrowWriter;
    use parquet::basic::{BrotliLevel, Compression, GzipLevel};
    use parquet::file::properties::WriterProperties;
    let d = tempfile::tempdir().unwrap();
    let lines = "{\"text\":\"a\",\"n\":1}\n{\"text\":\"b\",\"n\":2}\n";
    std::fs::write(d.path().join("plain.jsonl"), lines).unwrap();
    let want = run("cf-mix", &["plain.jsonl", "-q"], d.path(), None).stdout;
    assert_eq!(want.lines().count(), 2);
    let schema = std::sync::Arc::new(arrow_schema::Schema::new(vec![
        arrow_schema::Field::new("text", arrow_schema::DataType::Utf8, true),
        arrow_schema::Field::new("n", arrow_schema::DataType::Int64, true),
    ]));
    let batch = arrow_array::RecordBatch::try_new(
        schema.clone(),
        vec![
            std::sync::Arc::new(arrow_array::StringArray::from(vec!["a", "b"])),
            std::sync::Arc::new(arrow_array::Int64Array::from(vec![1, 2])),
        ],
    )
    .unwrap();
    for (name, c) in [
        ("gzip", Compression::GZIP(GzipLevel::default())),
        ("lz4", Compression::LZ4_RAW),
        ("brotli", Compression::BROTLI(BrotliLevel::default())),
    ] {
        let f = std::fs::File::create(d.path().join(format!("{name}.parquet"))).unwrap();
        let props = WriterProperties::builder().set_compression(c).build();
        let mut w = ArrowWriter::try_new(f, schema.clone(), Some(props)).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let r = run(
            "cf-mix",
            &[&format!("plain:{name}.parquet"), "-q"],
            d.path(),
            None,
        );
        assert_eq!(r.code, 0, "{name}: {r}");
        assert_eq!(r.stdout, want, "{name}");
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, lines.as_bytes()).unwrap();
    let gz = gz.finish().unwrap();
    std::fs::write(d.path().join("plain.jsonl.gz"), &gz).unwrap();
    std::fs::write(
        d.path().join("plain.jsonl.zst"),
        zstd::encode_all(lines.as_bytes(), 3).unwrap(),
    )
    .unwrap();
    for f in ["plain.jsonl.gz", "plain.jsonl.zst"] {
        let r = run("cf-mix", &[&format!("plain:{f}"), "-q"], d.path(), None);
        assert_eq!(r.stdout, want, "{f}: {r}");
    }
    let r = run("cf-mix", &["plain:-", "-q"], d.path(), Some(&gz));
    assert_eq!(r.stdout, want, "gzip on stdin: {r}");
}

#[test]
fn a_field_keeps_its_type_whatever_the_flags() {
    // cf-sample's top_p, top_k and min_p are null unless set: in Parquet they are still float
    // and int columns, so runs with other flags concatenate.
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let d = tempfile::tempdir().unwrap();
    let fx = fixture("llama");
    let types = |extra: &[&str], out: &str| -> Vec<(String, String)> {
        let mut a = vec![
            "--model",
            fx.to_str().unwrap(),
            "-n",
            "2",
            "--max-tokens",
            "2",
            "-o",
            out,
            "-q",
        ];
        a.extend_from_slice(extra);
        let r = run("cf-sample", &a, d.path(), None);
        assert_eq!(r.code, 0, "{r}");
        let reader =
            SerializedFileReader::new(std::fs::File::open(d.path().join(out)).unwrap()).unwrap();
        let schema = reader.metadata().file_metadata().schema_descr_ptr();
        let mut v: Vec<(String, String)> = schema
            .columns()
            .iter()
            .filter(|c| ["top_p", "top_k", "min_p", "temperature"].contains(&c.name()))
            .map(|c| (c.name().to_string(), format!("{:?}", c.physical_type())))
            .collect();
        v.sort();
        v
    };
    let plain = types(&[], "a.parquet");
    let set = types(
        &["--top-p", "0.9", "--top-k", "5", "--min-p", "0.1"],
        "b.parquet",
    );
    assert_eq!(plain, set);
    assert!(
        plain.iter().any(|(n, t)| n == "top_p" && t == "DOUBLE"),
        "{plain:?}"
    );
    assert!(
        plain.iter().any(|(n, t)| n == "top_k" && t == "INT64"),
        "{plain:?}"
    );
}

#[test]
fn stdin_with_a_ratio_is_a_source() {
    // `cf-mix sft.jsonl=1 -=1`, as cf-mix --help writes it.
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("sft.jsonl"),
        "{\"text\":\"a\"}\n{\"text\":\"b\"}\n",
    )
    .unwrap();
    let r = run(
        "cf-mix",
        &["sft.jsonl=1", "-=1", "--seed", "3", "-q"],
        d.path(),
        Some(b"{\"text\":\"c\"}\n"),
    );
    assert_eq!(r.code, 0, "{r}");
    assert_eq!(r.stdout.lines().count(), 4);
    assert_eq!(r.stdout.matches("\"source\":\"stdin\"").count(), 2, "{r}");
}

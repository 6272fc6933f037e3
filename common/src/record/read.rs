//! Reading records from JSONL or Parquet, each tagged with where it came from.

use super::{arrow_json, Format, Record};
use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::reader::ChunkReader;
use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::sync::Arc;

/// Where a record sits in its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pos {
    /// 1-based line of a JSONL file.
    Line(usize),
    /// 0-based row group and 0-based row within it, of a Parquet file.
    Row { group: usize, row: usize },
}

/// A record's location: `sft.jsonl:17` or `cfs.parquet: row group 0, row 5`.
#[derive(Clone, Debug)]
pub struct Loc {
    pub file: Arc<str>,
    pub pos: Pos,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pos {
            Pos::Line(n) => write!(f, "{}:{}", self.file, n),
            Pos::Row { group, row } => write!(f, "{}: row group {}, row {}", self.file, group, row),
        }
    }
}

/// How a reader treats bad rows.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadOptions {
    /// Skip (and count) rows that cannot be read instead of failing. Off by default.
    pub skip_bad: bool,
}

enum Inner {
    Jsonl {
        lines: Box<dyn BufRead>,
        line: usize,
        buf: String,
    },
    Parquet {
        src: ParquetSource,
        group: usize,
        groups: usize,
        rows: VecDeque<Record>,
        row: usize,
    },
}

#[derive(Clone)]
enum ParquetSource {
    File(Arc<File>),

    Bytes(Bytes),
}

/// An iterator of `(Loc, Record)`, failing with the location of the first bad row unless
/// [`ReadOptions::skip_bad`] is set.
pub struct Reader {
    name: Arc<str>,
    inner: Inner,
    opts: ReadOptions,
    skipped: usize,
    done: bool,
    /// A record read ahead by [`Reader::peek`].
    peeked: Option<Option<Result<(Loc, Record)>>>,
}

/// Open a path (`-` or none for stdin) for reading records.
pub fn open(path: Option<&str>, opts: ReadOptions) -> Result<Reader> {
    match path {
        None | Some("-") => open_stdin(opts),
        Some(p) => {
            let path = Path::new(p);
            let file = File::open(path).with_context(|| format!("{p}: cannot open"))?;
            // No telling extension (a pipe such as <(cf-sample ...)): sniff, as for stdin.
            let Some(format) = Format::from_path(path) else {
                return open_stream(p.into(), Box::new(file), opts);
            };
            let inner = match format {
                Format::Jsonl => jsonl(Box::new(BufReader::with_capacity(1 << 16, file))),
                Format::Parquet => parquet(ParquetSource::File(Arc::new(file)), p)?,
            };
            Ok(Reader {
                name: p.into(),
                inner,
                opts,
                skipped: 0,
                done: false,
                peeked: None,
            })
        }
    }
}

fn open_stdin(opts: ReadOptions) -> Result<Reader> {
    open_stream("<stdin>".into(), Box::new(io::stdin()), opts)
}

/// A stream whose format is told by its first bytes: `PAR1` is Parquet, anything else JSONL.
fn open_stream(
    name: Arc<str>,
    mut stream: Box<dyn Read + Send>,
    opts: ReadOptions,
) -> Result<Reader> {
    let mut head = Vec::with_capacity(4);
    while head.len() < 4 {
        let mut b = [0u8; 4];
        let n = stream
            .read(&mut b[..4 - head.len()])
            .with_context(|| format!("{name}: cannot read"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&b[..n]);
    }
    // Compressed JSONL (or Parquet): .jsonl.gz, .jsonl.zst, or either on stdin.
    if head.starts_with(&[0x1f, 0x8b]) {
        let d = flate2::read::MultiGzDecoder::new(io::Cursor::new(head).chain(stream));
        return open_stream(name, Box::new(d), opts);
    }
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let d = zstd::stream::read::Decoder::new(io::Cursor::new(head).chain(stream))
            .with_context(|| format!("{name}: cannot read zstd"))?;
        return open_stream(name, Box::new(d), opts);
    }
    let inner = if head == b"PAR1" {
        // Parquet needs random access: hold the whole stream in memory.
        let mut all = head;
        stream
            .read_to_end(&mut all)
            .with_context(|| format!("{name}: cannot read"))?;
        parquet(ParquetSource::Bytes(Bytes::from(all)), &name)?
    } else {
        jsonl(Box::new(BufReader::with_capacity(
            1 << 16,
            io::Cursor::new(head).chain(stream),
        )))
    };
    Ok(Reader {
        name,
        inner,
        opts,
        skipped: 0,
        done: false,
        peeked: None,
    })
}

fn jsonl(lines: Box<dyn BufRead>) -> Inner {
    Inner::Jsonl {
        lines,
        line: 0,
        buf: String::new(),
    }
}

fn parquet(src: ParquetSource, name: &str) -> Result<Inner> {
    let groups = match &src {
        ParquetSource::File(f) => f
            .as_ref()
            .try_clone()
            .map_err(anyhow::Error::from)
            .and_then(row_groups),
        ParquetSource::Bytes(b) => row_groups(b.clone()),
    }
    .with_context(|| format!("{name}: not a readable Parquet file"))?;
    Ok(Inner::Parquet {
        src,
        group: 0,
        groups,
        rows: VecDeque::new(),
        row: 0,
    })
}

fn row_groups<T: ChunkReader + 'static>(src: T) -> Result<usize> {
    Ok(ParquetRecordBatchReaderBuilder::try_new(src)?
        .metadata()
        .num_row_groups())
}

fn read_group<T: ChunkReader + 'static>(src: T, group: usize) -> Result<VecDeque<Record>> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(src)?
        .with_row_groups(vec![group])
        .with_batch_size(4096)
        .build()?;
    let mut rows = VecDeque::new();
    for batch in reader {
        rows.extend(arrow_json::batch_to_records(&batch?)?);
    }
    Ok(rows)
}

/// serde_json's message without its " at line 1 column N" tail (the line is ours to give).
fn json_error(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let msg = match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg,
    };
    format!("invalid JSON at column {}: {}", e.column(), msg)
}

impl Reader {
    /// The input's name as it appears in messages (`<stdin>` for standard input).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Rows skipped so far because they were bad (only with `skip_bad`).
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// A tool found a record it cannot use: count it when skipping is on, else fail with the
    /// record's location.
    pub fn reject(&mut self, loc: &Loc, err: anyhow::Error) -> Result<()> {
        if self.opts.skip_bad {
            self.skipped += 1;
            Ok(())
        } else {
            Err(err.context(loc.to_string()))
        }
    }

    fn next_jsonl(&mut self) -> Option<Result<(Loc, Record)>> {
        let Inner::Jsonl { lines, line, buf } = &mut self.inner else {
            unreachable!()
        };
        loop {
            buf.clear();
            match lines.read_line(buf) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => {
                    let loc = Loc {
                        file: self.name.clone(),
                        pos: Pos::Line(*line + 1),
                    };
                    return Some(Err(anyhow!(e).context(format!("{loc}: cannot read"))));
                }
            }
            *line += 1;
            let text = buf.trim_end_matches(['\n', '\r']);
            if text.trim().is_empty() {
                continue;
            }
            let loc = Loc {
                file: self.name.clone(),
                pos: Pos::Line(*line),
            };
            let parsed = match serde_json::from_str::<serde_json::Value>(text) {
                Ok(serde_json::Value::Object(map)) => Ok(map),
                Ok(other) => Err(anyhow!("expected a JSON object, found {}", kind(&other))),
                Err(e) => Err(anyhow!(json_error(&e))),
            };
            match parsed {
                Ok(rec) => return Some(Ok((loc, rec))),
                Err(e) if self.opts.skip_bad => {
                    let _ = e;
                    self.skipped += 1;
                }
                Err(e) => return Some(Err(e.context(loc.to_string()))),
            }
        }
    }

    fn next_parquet(&mut self) -> Option<Result<(Loc, Record)>> {
        let Inner::Parquet {
            src,
            group,
            groups,
            rows,
            row,
        } = &mut self.inner
        else {
            unreachable!()
        };
        while rows.is_empty() {
            if *group >= *groups {
                return None;
            }
            let got = match src.clone() {
                ParquetSource::File(f) => f
                    .as_ref()
                    .try_clone()
                    .map_err(anyhow::Error::from)
                    .and_then(|f| read_group(f, *group)),
                ParquetSource::Bytes(b) => read_group(b, *group),
            };
            match got {
                Ok(r) => *rows = r,
                Err(e) => {
                    let g = *group;
                    *group = *groups;
                    return Some(Err(e.context(format!("{}: row group {g}", self.name))));
                }
            }
            *group += 1;
            *row = 0;
        }
        let rec = rows.pop_front()?;
        let loc = Loc {
            file: self.name.clone(),
            pos: Pos::Row {
                group: *group - 1,
                row: *row,
            },
        };
        *row += 1;
        Some(Ok((loc, rec)))
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

impl Reader {
    /// The next record without taking it (a check before expensive work, e.g. loading a model).
    pub fn peek(&mut self) -> Option<&Result<(Loc, Record)>> {
        if self.peeked.is_none() {
            let next = self.next();
            self.peeked = Some(next);
        }
        self.peeked.as_ref().and_then(|p| p.as_ref())
    }
}

impl Iterator for Reader {
    type Item = Result<(Loc, Record)>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(p) = self.peeked.take() {
            return p;
        }
        if self.done {
            return None;
        }
        let item = match self.inner {
            Inner::Jsonl { .. } => self.next_jsonl(),
            Inner::Parquet { .. } => self.next_parquet(),
        };
        if matches!(item, None | Some(Err(_))) {
            self.done = true;
        }
        item
    }
}

/// Read every record of an input into memory (small inputs: references, task files).
pub fn read_all(path: Option<&str>, opts: ReadOptions) -> Result<Vec<(Loc, Record)>> {
    let reader = open(path, opts)?;
    reader.collect()
}

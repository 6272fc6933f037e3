//! Sources of a mix: the `[LABEL:]PATH[=RATIO]` specs, and each source's index of records
//! (byte offsets into a memory-mapped JSONL file), so memory grows with the number of records,
//! not their size.

use anyhow::{anyhow, bail, Context, Result};
use cf_common::record::{self, Format, Loc, Pos, ReadOptions, Record};
use cf_common::tokenizer::Tok;
use memmap2::Mmap;
use serde_json::Value;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

/// How much of a source goes into the mix.
#[derive(Clone, Debug, PartialEq)]
pub enum Ratio {
    /// A share of the whole mix; shares are normalised over the sources that have one.
    Share(f64),
    /// Every record exactly once.
    All,
    /// Exactly N records (or tokens, with --by tokens).
    Count(u64),
    /// R records (or tokens) per record (token) of the `all` and `n:` sources together.
    Per(f64),
}

impl Ratio {
    pub fn describe(&self) -> String {
        match self {
            Ratio::Share(w) => format!("share {w}"),
            Ratio::All => "all".into(),
            Ratio::Count(n) => format!("n:{n}"),
            Ratio::Per(r) => format!("per:{r}"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub label: String,
    pub path: String,
    pub ratio: Ratio,
}

pub fn parse_spec(s: &str) -> Result<Spec> {
    let bad = |why: &str| {
        anyhow!(
            "source {s:?}: {why} (expected [LABEL:]PATH[=RATIO], RATIO one of W, all, n:N, per:R)"
        )
    };
    let (left, ratio) = match s.rsplit_once('=') {
        Some((l, r)) => (l, r),
        None => (s, "all"),
    };
    let ratio = if ratio == "all" {
        Ratio::All
    } else if let Some(n) = ratio.strip_prefix("n:") {
        Ratio::Count(n.parse().map_err(|_| bad("n:N needs a whole number"))?)
    } else if let Some(r) = ratio.strip_prefix("per:") {
        let r: f64 = r.parse().map_err(|_| bad("per:R needs a number"))?;
        if !(r >= 0.0 && r.is_finite()) {
            return Err(bad("per:R needs R >= 0"));
        }
        Ratio::Per(r)
    } else {
        let w: f64 = ratio.parse().map_err(|_| bad("unknown ratio"))?;
        if !(w > 0.0 && w.is_finite()) {
            return Err(bad("a share must be > 0"));
        }
        Ratio::Share(w)
    };
    // A label is what comes before the first ':' unless that is part of a path ("./a:b").
    let (label, path) = match left.split_once(':') {
        Some((l, p)) if !l.is_empty() && !l.contains('/') && !p.is_empty() => {
            (l.to_string(), p.to_string())
        }
        _ => {
            let stem = if left == "-" {
                "stdin".to_string()
            } else {
                Path::new(left)
                    .file_name()
                    .and_then(|f| f.to_str())
                    .map(|f| f.split('.').next().unwrap_or(f).to_string())
                    .unwrap_or_else(|| left.to_string())
            };
            (stem, left.to_string())
        }
    };
    if path.is_empty() {
        return Err(bad("empty path"));
    }
    Ok(Spec { label, path, ratio })
}

/// One indexed source: where each good record's line sits in a JSONL file.
pub struct Source {
    pub spec: Spec,
    /// Memory map of the JSONL file holding the records (the input itself, or a spool of a
    /// Parquet file or of stdin).
    map: Mmap,
    /// (offset, length) of each record's line, and its 1-based line or Parquet position.
    pub lines: Vec<(u64, u32)>,
    pub locs: Vec<Pos>,
    /// Tokens per record, when counted.
    pub tokens: Option<Vec<u32>>,
    pub skipped: usize,
    /// Kept so a spooled file lives as long as its map.
    _spool: Option<tempfile::NamedTempFile>,
}

/// Token count of a record in any of the usual shapes.
fn count_tokens(rec: &Record, tok: Option<&Tok>) -> Result<u32> {
    if let Some(Value::Array(ids)) = rec.get("token_ids") {
        return Ok(ids.len() as u32);
    }
    let tok = tok.ok_or_else(|| {
        anyhow!("no \"token_ids\": --by tokens needs --tokenizer to count tokens")
    })?;
    let mut text = String::new();
    let mut push = |v: &Value| {
        if let Some(s) = v.as_str() {
            text.push_str(s);
        }
    };
    let mut found = false;
    for k in [
        "text",
        "prompt",
        "completion",
        "instruction",
        "input",
        "output",
    ] {
        if let Some(v) = rec.get(k) {
            found = true;
            match v {
                Value::Array(turns) => turns
                    .iter()
                    .for_each(|t| push(t.get("content").unwrap_or(&Value::Null))),
                other => push(other),
            }
        }
    }
    for (k, field) in [("messages", "content"), ("conversations", "value")] {
        if let Some(Value::Array(turns)) = rec.get(k) {
            found = true;
            turns
                .iter()
                .for_each(|t| push(t.get(field).unwrap_or(&Value::Null)));
        }
    }
    if !found {
        bail!("no text to count tokens of (expected token_ids, text, prompt/completion, messages, conversations or instruction/output)");
    }
    Ok(tok.encode(&text, false)?.len() as u32)
}

impl Source {
    /// Index a source: validate every record, note where it is, count its tokens if asked.
    pub fn index(
        spec: Spec,
        tok: Option<&Tok>,
        need_tokens: bool,
        skip_bad: bool,
    ) -> Result<Source> {
        // Plain JSONL files are memory-mapped; everything else (Parquet, compressed JSONL,
        // stdin, pipes) is read once into a spool.
        let is_jsonl_file =
            spec.path != "-" && Format::from_path(Path::new(&spec.path)) == Some(Format::Jsonl);
        let (file, spool) = if is_jsonl_file {
            (
                File::open(&spec.path).with_context(|| format!("{}: cannot open", spec.path))?,
                None,
            )
        } else {
            // Parquet and stdin: one pass through the record reader into a JSONL spool file.
            let mut spool = cf_common::temp::spool()?;
            let mut reader = record::open(Some(&spec.path), ReadOptions { skip_bad })?;
            {
                let mut w = std::io::BufWriter::new(spool.as_file_mut());
                for r in reader.by_ref() {
                    let (loc, rec) = r?;
                    let pos = match loc.pos {
                        Pos::Row { group, row } => format!("{group}:{row}"),
                        Pos::Line(n) => n.to_string(),
                    };
                    // The original position travels with the line, as a prefix.
                    writeln!(w, "{pos}\t{}", Value::Object(rec))?;
                }
                w.flush()?;
            }
            let f = spool.reopen()?;
            (f, Some(spool))
        };
        // SAFETY: the mapped file is an input the user gave us or our own spool; neither is
        // written while we read it (a user truncating an input mid-run would be a user error,
        // surfacing as bad records, not undefined behaviour in practice on Linux).
        let map =
            unsafe { Mmap::map(&file) }.with_context(|| format!("{}: cannot map", spec.path))?;
        let name: Arc<str> = spec.path.as_str().into();
        let mut src = Source {
            spec,
            map,
            lines: Vec::new(),
            locs: Vec::new(),
            tokens: need_tokens.then(Vec::new),
            skipped: 0,
            _spool: spool,
        };
        let bytes: &[u8] = &src.map;
        let mut start = 0usize;
        let mut line_no = 0usize;
        while start < bytes.len() {
            let end = memchr(b'\n', &bytes[start..]).map_or(bytes.len(), |i| start + i);
            line_no += 1;
            let mut body = &bytes[start..end];
            if body.last() == Some(&b'\r') {
                body = &body[..body.len() - 1];
            }
            let (pos, body_off) = if src._spool.is_some() {
                let tab = memchr(b'\t', body).unwrap_or(0);
                let p = std::str::from_utf8(&body[..tab]).unwrap_or("0");
                let pos = match p.split_once(':') {
                    Some((g, r)) => Pos::Row {
                        group: g.parse().unwrap_or(0),
                        row: r.parse().unwrap_or(0),
                    },
                    None => Pos::Line(p.parse().unwrap_or(0)),
                };
                (pos, tab + 1)
            } else {
                (Pos::Line(line_no), 0)
            };
            let body = &body[body_off.min(body.len())..];
            if !body.iter().all(u8::is_ascii_whitespace) {
                let loc = Loc {
                    file: name.clone(),
                    pos,
                };
                let checked = match serde_json::from_slice::<Value>(body) {
                    Ok(Value::Object(rec)) => match &src.tokens {
                        Some(_) => count_tokens(&rec, tok).map(Some),
                        None => Ok(None),
                    },
                    Ok(_) => Err(anyhow!("expected a JSON object")),
                    Err(e) => Err(anyhow!("invalid JSON at column {}", e.column())),
                };
                match checked {
                    Ok(n) => {
                        src.lines
                            .push(((start + body_off) as u64, body.len() as u32));
                        src.locs.push(pos);
                        if let (Some(t), Some(n)) = (src.tokens.as_mut(), n) {
                            t.push(n);
                        }
                    }
                    Err(_) if skip_bad => src.skipped += 1,
                    Err(e) => return Err(e.context(loc.to_string())),
                }
            }
            start = end + 1;
        }
        Ok(src)
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn total_tokens(&self) -> Option<u64> {
        self.tokens
            .as_ref()
            .map(|t| t.iter().map(|&x| x as u64).sum())
    }

    /// Record i, parsed.
    pub fn record(&self, i: usize) -> Result<Record> {
        let (off, len) = self.lines[i];
        let body = &self.map[off as usize..off as usize + len as usize];
        match serde_json::from_slice::<Value>(body)? {
            Value::Object(m) => Ok(m),
            _ => bail!("{}: record {i} changed while mixing", self.spec.path),
        }
    }
}

use memchr::memchr;

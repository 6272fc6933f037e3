//! Records: the contract between the tools. JSONL and Parquet, from files or stdin, to files
//! (atomically) or stdout.
//!
//! A record is a JSON object. Fields a tool does not know pass through untouched. The format
//! comes from the file extension (`.jsonl`, `.ndjson`, `.parquet`); stdin is sniffed (`PAR1`
//! means Parquet); stdout is JSONL. Every field any tool writes is documented in [`schema`].

mod arrow_json;
mod read;
pub mod schema;
mod write;

pub use arrow_json::SchemaInfer;
pub use read::{open, read_all, Loc, Pos, ReadOptions, Reader};
pub use write::{write_atomic, Output, Writer};

use std::path::Path;

/// One record: a JSON object whose field order is kept.
pub type Record = serde_json::Map<String, serde_json::Value>;

/// The two on-disk formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Parquet,
}

impl Format {
    /// The format a path's extension names, if any.
    pub fn from_path(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" | "ndjson" => Some(Format::Jsonl),
            "parquet" | "pq" => Some(Format::Parquet),
            _ => None,
        }
    }

    /// Like [`Format::from_path`], but a path with no known extension is an error naming it.
    pub fn require(path: &Path) -> anyhow::Result<Format> {
        Format::from_path(path).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: cannot tell the format from the extension (use .jsonl or .parquet)",
                path.display()
            )
        })
    }
}

/// A record's list of token ids (`token_ids`, `prefix_ids`), each checked against the
/// vocabulary size. None when the field is absent or null.
pub fn token_ids(rec: &Record, field: &str, vocab: usize) -> anyhow::Result<Option<Vec<u32>>> {
    let Some(v) = rec.get(field).filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let arr = v
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("\"{field}\" is not a list of token ids"))?;
    arr.iter()
        .enumerate()
        .map(|(i, x)| match x.as_u64() {
            Some(id) if (id as usize) < vocab => Ok(id as u32),
            Some(id) => Err(anyhow::anyhow!(
                "{field}[{i}] = {id} is outside the vocabulary (0..{vocab})"
            )),
            None => Err(anyhow::anyhow!("{field}[{i}] is not a token id")),
        })
        .collect::<anyhow::Result<Vec<u32>>>()
        .map(Some)
}

/// Rows per Parquet row group when writing.
pub const PARQUET_ROW_GROUP: usize = 8192;

//! Writing records: JSONL or Parquet to a file, atomically, or JSONL to stdout.
//!
//! A file is written to a temporary file beside it and renamed into place by
//! [`Writer::finish`]; a writer dropped before that (an error, a panic) removes the temporary
//! file, so make and just never see a half-written output.

use super::{arrow_json, Format, Record, PARQUET_ROW_GROUP};
use anyhow::{Context, Result};
use arrow_schema::Schema;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tempfile::NamedTempFile;

/// Where records go: a file (format from its extension) or stdout (JSONL).
#[derive(Clone, Debug)]
pub struct Output {
    pub path: Option<PathBuf>,
    pub format: Format,
}

impl Output {
    /// `None` or `-` is stdout; anything else a file whose extension names the format.
    pub fn parse(path: Option<&str>) -> Result<Output> {
        match path {
            None | Some("-") => Ok(Output {
                path: None,
                format: Format::Jsonl,
            }),
            Some(p) => Ok(Output {
                path: Some(PathBuf::from(p)),
                format: Format::require(Path::new(p))?,
            }),
        }
    }

    /// The output's name in messages.
    pub fn name(&self) -> String {
        self.path
            .as_ref()
            .map_or("<stdout>".to_string(), |p| p.display().to_string())
    }
}

struct ParquetSink(ArrowWriter<Sink>);

enum Sink {
    Stdout(BufWriter<io::Stdout>),
    File {
        tmp: BufWriter<NamedTempFile>,
        dest: PathBuf,
    },
    /// Lent to a streaming Parquet writer until finish().
    Taken,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Stdout(w) => w.write(buf),
            Sink::File { tmp, .. } => tmp.write(buf),
            Sink::Taken => Err(io::Error::other(
                "output already handed to the Parquet writer",
            )),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Stdout(w) => w.flush(),
            Sink::File { tmp, .. } => tmp.flush(),
            Sink::Taken => Ok(()),
        }
    }
}

/// A record sink. Call [`Writer::finish`] to complete it.
pub struct Writer {
    sink: Sink,
    /// A Parquet schema known in advance: rows are then written a row group at a time.
    schema: Option<Arc<Schema>>,
    parquet: Option<ParquetSink>,
    format: Format,
    name: String,
    buffered: Vec<Record>,
    flush_each: bool,
    written: usize,
}

impl Writer {
    pub fn create(out: &Output) -> Result<Writer> {
        let name = out.name();
        let sink = match &out.path {
            None => Sink::Stdout(BufWriter::with_capacity(1 << 16, crate::exit::stdout()?)),
            Some(dest) => {
                let tmp = crate::temp::file_beside(dest)?;
                Sink::File {
                    tmp: BufWriter::with_capacity(1 << 16, tmp),
                    dest: dest.clone(),
                }
            }
        };
        Ok(Writer {
            sink,
            schema: None,
            parquet: None,
            format: out.format,
            name,
            buffered: Vec::new(),
            flush_each: false,
            written: 0,
        })
    }

    /// Flush after every record, so a reader of the stream (`| head`, `tail -f`) sees each one
    /// as soon as it exists. For tools whose records come slowly (sampling, scoring).
    pub fn flush_each(mut self, yes: bool) -> Self {
        self.flush_each = yes;
        self
    }

    /// Declare the schema of every record to come (from [`super::SchemaInfer`]), so Parquet is
    /// written in row groups as records arrive instead of being held until the end.
    pub fn with_schema(mut self, schema: Arc<Schema>) -> Self {
        self.schema = Some(schema);
        self
    }

    /// Records written (or buffered, for Parquet) so far.
    pub fn count(&self) -> usize {
        self.written
    }

    fn out(&mut self) -> &mut dyn Write {
        &mut self.sink
    }

    pub fn write(&mut self, rec: &Record) -> Result<()> {
        self.written += 1;
        match self.format {
            Format::Parquet => {
                // Without a declared schema it is inferred from every record, so the file is
                // written at the end.
                self.buffered.push(rec.clone());
                if self.schema.is_some() && self.buffered.len() >= PARQUET_ROW_GROUP {
                    self.flush_group()?;
                }
                Ok(())
            }
            Format::Jsonl => {
                let flush = self.flush_each;
                let name = self.name.clone();
                let w = self.out();
                serde_json::to_writer(&mut *w, rec)
                    .map_err(io::Error::from)
                    .and_then(|_| w.write_all(b"\n"))
                    .and_then(|_| if flush { w.flush() } else { Ok(()) })
                    .with_context(|| format!("{name}: cannot write"))
            }
        }
    }

    fn flush_group(&mut self) -> Result<()> {
        let name = self.name.clone();
        let schema = self.schema.clone().expect("flush_group needs a schema");
        let records = std::mem::take(&mut self.buffered);
        if self.parquet.is_none() {
            let props = WriterProperties::builder()
                .set_compression(Compression::ZSTD(ZstdLevel::default()))
                .set_max_row_group_row_count(Some(PARQUET_ROW_GROUP))
                .build();
            let sink = std::mem::replace(&mut self.sink, Sink::Taken);
            let w = ArrowWriter::try_new(sink, schema.clone(), Some(props))
                .with_context(|| format!("{name}: cannot write Parquet"))?;
            self.parquet = Some(ParquetSink(w));
        }
        let batch = arrow_json::records_to_batch(&schema, &records)
            .with_context(|| format!("{name}: cannot write Parquet"))?;
        let w = &mut self.parquet.as_mut().unwrap().0;
        w.write(&batch)
            .with_context(|| format!("{name}: cannot write Parquet"))?;
        w.flush()
            .with_context(|| format!("{name}: cannot write Parquet"))?;
        Ok(())
    }

    /// Complete the output: write a Parquet file, flush, and rename the file into place.
    pub fn finish(mut self) -> Result<()> {
        let name = self.name.clone();
        if self.format == Format::Parquet && self.schema.is_some() {
            if !self.buffered.is_empty() || self.parquet.is_none() {
                self.flush_group()?;
            }
            // into_inner flushes the last row group and writes the footer.
            let w = self.parquet.take().unwrap().0;
            self.sink = w
                .into_inner()
                .with_context(|| format!("{name}: cannot write Parquet"))?;
        } else if self.format == Format::Parquet {
            let records = std::mem::take(&mut self.buffered);
            write_parquet(&mut self.sink, &records)
                .with_context(|| format!("{name}: cannot write Parquet"))?;
        }
        match self.sink {
            Sink::Taken => unreachable!("the Parquet writer returned the sink"),
            Sink::Stdout(mut w) => w.flush().with_context(|| format!("{name}: cannot write")),
            Sink::File { tmp, dest } => {
                let tmp = tmp
                    .into_inner()
                    .map_err(|e| e.into_error())
                    .with_context(|| format!("{name}: cannot write"))?;
                crate::temp::persist(tmp, &dest)
            }
        }
    }
}

fn write_parquet<W: Write + Send>(w: &mut W, records: &[Record]) -> Result<()> {
    let schema = arrow_json::schema_for(records);
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(PARQUET_ROW_GROUP))
        .build();
    let mut writer = ArrowWriter::try_new(w, schema.clone(), Some(props))?;
    for chunk in records.chunks(PARQUET_ROW_GROUP) {
        writer.write(&arrow_json::records_to_batch(&schema, chunk)?)?;
    }
    writer.close()?;
    Ok(())
}

/// Write bytes to `dest` atomically (temp file beside it, then rename).
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = crate::temp::file_beside(dest)?;
    tmp.write_all(bytes)
        .with_context(|| format!("{}: cannot write", dest.display()))?;
    crate::temp::persist(tmp, dest)
}

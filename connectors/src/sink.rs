//! Writers for the replay's outputs: segment membership changes (JSONL or Parquet) and
//! dead letters (JSONL).
//!
//! Owns the file formats of [`SegmentChange`] (the record itself is `herald_operators::change`). Every writer streams through
//! [`OutputFile`]: a local file is written through a buffer to a temporary file and
//! renamed into place when complete; a remote object is uploaded when complete.

use std::io::Write;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use herald_operators::time::format_rfc3339_ms;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use serde::Serialize;

use crate::error::ConnectorError;
use crate::events::DeadLetter;
use crate::store::OutputFile;

/// Rows per record batch (and at most per row group) in Parquet output.
const PARQUET_BATCH_ROWS: usize = 128 * 1024;

pub use herald_operators::change::SegmentChange;

#[derive(Serialize)]
struct ChangeLine<'a> {
    segment: &'a str,
    user_id: &'a str,
    diff: i64,
    time: String,
    /// The segment's definition version, for segments changed through the API.
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u32>,
}

#[derive(Serialize)]
struct DeadLetterLine<'a> {
    source: &'a str,
    line: u64,
    batch_index: Option<usize>,
    reason: &'a str,
    detail: &'a str,
    raw: &'a str,
}

fn io_err(location: &str) -> impl Fn(std::io::Error) -> ConnectorError + '_ {
    move |e| ConnectorError::io(location, e)
}

/// Writes changes as JSON lines, in the given order, one object a line:
/// `{"segment":"vip","user_id":"u1","diff":1,"time":"2026-03-01T10:00:00.000Z"}`.
pub fn write_changes_jsonl(
    url_or_path: &str,
    changes: &[SegmentChange],
) -> Result<(), ConnectorError> {
    write_jsonl(url_or_path, changes, change_line)
}

/// Writes `items` as JSON lines, each encoded by `line` (which appends its newline).
pub(crate) fn write_jsonl<T>(
    url_or_path: &str,
    items: &[T],
    line: fn(&T, &mut Vec<u8>),
) -> Result<(), ConnectorError> {
    let mut out = OutputFile::create(url_or_path)?;
    let mut buf = Vec::with_capacity(256);
    for item in items {
        buf.clear();
        line(item, &mut buf);
        out.write_all(&buf).map_err(io_err(url_or_path))?;
    }
    out.finish()
}

/// Appends one change as a JSON line (with its newline) to `out`: the format of the
/// change files and of the Kafka changelog's values.
pub fn change_line(c: &SegmentChange, out: &mut Vec<u8>) {
    change_line_versioned(c, None, out)
}

/// [`change_line`] with the segment's definition version, when it has one
/// (`"version":N`, after the other fields).
pub fn change_line_versioned(c: &SegmentChange, version: Option<u32>, out: &mut Vec<u8>) {
    let line = ChangeLine {
        segment: &c.segment,
        user_id: &c.user_id,
        diff: c.diff,
        time: format_rfc3339_ms(c.time),
        version,
    };
    // Serialising a struct of strings and integers into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &line);
    out.push(b'\n');
}

/// Appends one dead letter as a JSON line (with its newline) to `out`.
pub fn dead_letter_line(d: &DeadLetter, out: &mut Vec<u8>) {
    let line = DeadLetterLine {
        source: &d.source,
        line: d.line,
        batch_index: d.batch_index,
        reason: d.reason.as_str(),
        detail: &d.detail,
        raw: &d.raw,
    };
    let _ = serde_json::to_writer(&mut *out, &line);
    out.push(b'\n');
}

/// Writes dead letters as JSON lines, one object a line:
/// `{"source":…,"line":…,"batch_index":…|null,"reason":"invalid_json","detail":…,"raw":…}`.
pub fn write_dead_letters_jsonl(
    url_or_path: &str,
    dead_letters: &[DeadLetter],
) -> Result<(), ConnectorError> {
    write_jsonl(url_or_path, dead_letters, dead_letter_line)
}

/// The Arrow schema of change files: `segment` Utf8, `user_id` Utf8, `diff` Int64,
/// `time` Timestamp(Millisecond, "UTC"), none nullable.
pub fn changes_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("segment", DataType::Utf8, false),
        Field::new("user_id", DataType::Utf8, false),
        Field::new("diff", DataType::Int64, false),
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
    ]))
}

/// Maps a Parquet writer error: an I/O failure underneath is external, anything else
/// (a schema problem) is reported as input.
pub(crate) fn parquet_write_err(location: &str, e: ParquetError) -> ConnectorError {
    match e {
        ParquetError::External(inner) => match inner.downcast::<std::io::Error>() {
            Ok(io) => ConnectorError::io(location, *io),
            Err(other) => ConnectorError::input(location, format!("cannot write Parquet: {other}")),
        },
        other => ConnectorError::input(location, format!("cannot write Parquet: {other}")),
    }
}

/// Writes changes as a Parquet file (zstd-compressed) with the [`changes_schema`], in the
/// given order.
pub fn write_changes_parquet(
    url_or_path: &str,
    changes: &[SegmentChange],
) -> Result<(), ConnectorError> {
    write_parquet(url_or_path, changes_schema(), changes, |chunk| {
        vec![
            Arc::new(StringArray::from_iter_values(
                chunk.iter().map(|c| c.segment.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                chunk.iter().map(|c| c.user_id.as_str()),
            )),
            Arc::new(Int64Array::from_iter_values(chunk.iter().map(|c| c.diff))),
            Arc::new(
                TimestampMillisecondArray::from_iter_values(chunk.iter().map(|c| c.time))
                    .with_timezone("UTC"),
            ),
        ]
    })
}

/// How Herald writes its Parquet tables: zstd-compressed.
fn parquet_props() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build()
}

/// Record batches as the bytes of one Parquet file, written as [`write_parquet`] writes.
pub(crate) fn parquet_bytes(
    schema: Arc<Schema>,
    batches: &[RecordBatch],
) -> Result<Vec<u8>, ParquetError> {
    let mut bytes = Vec::new();
    let mut w = ArrowWriter::try_new(&mut bytes, schema, Some(parquet_props()))?;
    for b in batches {
        w.write(b)?;
    }
    w.close()?;
    Ok(bytes)
}

/// Writes `items` as a zstd-compressed Parquet file with `schema`, in record batches of
/// at most [`PARQUET_BATCH_ROWS`] rows whose columns `columns` builds.
pub(crate) fn write_parquet<T>(
    url_or_path: &str,
    schema: Arc<Schema>,
    items: &[T],
    columns: impl Fn(&[T]) -> Vec<ArrayRef>,
) -> Result<(), ConnectorError> {
    let props = parquet_props();
    let mut out = OutputFile::create(url_or_path)?;
    let err = |e| parquet_write_err(url_or_path, e);
    let mut writer =
        ArrowWriter::try_new(&mut out, Arc::clone(&schema), Some(props)).map_err(err)?;
    for chunk in items.chunks(PARQUET_BATCH_ROWS) {
        let batch = RecordBatch::try_new(Arc::clone(&schema), columns(chunk)).map_err(|e| {
            ConnectorError::input(url_or_path, format!("cannot build a record batch: {e}"))
        })?;
        writer.write(&batch).map_err(err)?;
    }
    writer.close().map_err(err)?;
    out.finish()
}

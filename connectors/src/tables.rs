//! The warehouse tables: everything Herald accepts and decides, as rows an analyst queries.
//!
//! Owns the five table definitions ([`EVENTS`], [`SEGMENT_CHANGES`], [`JOURNEY_EVENTS`],
//! [`MESSAGES`], [`DELIVERY_OUTCOMES`]), the conversion of Herald's records into their
//! rows, and the two ways rows leave:
//!
//! - [`write_partitioned`]: zstd Parquet files under
//!   `PREFIX/TABLE/date=YYYY-MM-DD/hour=HH/STEM.parquet` (Hive-style partitions, which
//!   Snowflake external tables, BigQuery, Athena, Spark and DuckDB read as columns), each
//!   file published atomically ([`crate::store::OutputFile`]).
//! - [`load_postgres`]: a binary `COPY` into a temporary staging table, then
//!   `INSERT … ON CONFLICT DO NOTHING` into the table (created, with its schema, if
//!   missing), in one transaction. Every table has a primary key made of the row's
//!   identity, so loading the same rows again (a replay, a retry) adds nothing.
//!
//! The events table keeps each accepted event whole (`properties`, `context` and `traits`
//! as JSON text), so [`read_archived_events`] gives back exactly the events that were
//! accepted: replaying the archive rebuilds every segment and journey.
//! The delivery outcomes table is derived from the notification feedback events
//! (`Message Sent`, `Delivered`, `Failed`, `Opened`, `Clicked`), see [`outcome_row`].
//!
//! Does not own when rows are flushed (the service's exporter decides that).

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Int64Array, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use herald_operators::event::{Event, EventType};
use herald_operators::journey::{JourneyRow, MessageAction};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{Map, Value as Json};

use crate::error::ConnectorError;
use crate::sink::{write_parquet, SegmentChange};
use crate::store::read_all;

/// A column's type. JSON is text in Parquet and `jsonb` in PostgreSQL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColType {
    /// UTF-8 text.
    Text,
    /// 64-bit integer.
    Int,
    /// Instant, ms since the epoch, UTC.
    Time,
    /// A JSON document, as text.
    Json,
}

/// One column of a table.
#[derive(Clone, Copy, Debug)]
pub struct Column {
    /// Its name (the same in Parquet and PostgreSQL).
    pub name: &'static str,
    /// Its type.
    pub ty: ColType,
    /// Whether it may be NULL.
    pub nullable: bool,
}

/// One table.
#[derive(Clone, Copy, Debug)]
pub struct Table {
    /// Its name: the directory under the prefix and the PostgreSQL table.
    pub name: &'static str,
    /// Its columns, in order.
    pub columns: &'static [Column],
    /// The primary key: the columns that identify a row.
    pub key: &'static [&'static str],
    /// The index of the `Time` column that chooses the row's partition.
    pub partition_by: usize,
}

/// A cell of a row. JSON columns hold [`Cell::Text`].
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    /// NULL.
    Null,
    /// Text (or JSON text).
    Text(String),
    /// An integer.
    Int(i64),
    /// An instant (ms).
    Time(i64),
}

/// A row: one cell per column of its table.
pub type Row = Vec<Cell>;

const fn col(name: &'static str, ty: ColType, nullable: bool) -> Column {
    Column { name, ty, nullable }
}

use ColType::{Int, Json as J, Text, Time};

/// Every accepted event, whole, partitioned by the instant Herald received it.
pub const EVENTS: Table = Table {
    name: "events",
    columns: &[
        col("message_id", Text, false),
        col("user_id", Text, false),
        col("type", Text, false),
        col("event", Text, true),
        col("timestamp", Time, false),
        col("received_at", Time, false),
        col("properties", J, false),
        col("context", J, false),
        col("traits", J, false),
    ],
    key: &["message_id"],
    partition_by: 5,
};

/// Segment membership changes: `diff` +1 entered, -1 left, at `time`, by `version` of
/// the segment's definition (1: the segment file's; later ones through the definitions
/// API; NULL in rows written before Herald kept it).
pub const SEGMENT_CHANGES: Table = Table {
    name: "segment_changes",
    columns: &[
        col("segment", Text, false),
        col("user_id", Text, false),
        col("diff", Int, false),
        col("time", Time, false),
        col("version", Int, true),
    ],
    key: &["segment", "user_id", "time", "diff"],
    partition_by: 3,
};

/// Journey events: entered, step, sent, suppressed, deferred, converted, exited,
/// completed; `seq` orders a user's rows at one instant.
pub const JOURNEY_EVENTS: Table = Table {
    name: "journey_events",
    columns: &[
        col("journey", Text, false),
        col("user_id", Text, false),
        col("instance", Int, false),
        col("seq", Int, false),
        col("kind", Text, false),
        col("step_path", Text, true),
        col("variant", Text, true),
        col("message_id", Text, true),
        col("reason", Text, true),
        col("time", Time, false),
    ],
    key: &["journey", "user_id", "instance", "time", "seq"],
    partition_by: 9,
};

/// Message actions, one per message a journey decided to send.
pub const MESSAGES: Table = Table {
    name: "messages",
    columns: &[
        col("message_id", Text, false),
        col("journey", Text, false),
        col("user_id", Text, false),
        col("instance", Int, false),
        col("step_path", Text, false),
        col("variant", Text, true),
        col("channel", Text, false),
        col("template", Text, false),
        col("address", Text, true),
        col("traits", J, false),
        col("event", J, true),
        col("time", Time, false),
    ],
    key: &["message_id"],
    partition_by: 11,
};

/// What became of each message: sent, delivered, failed, opened, clicked.
pub const DELIVERY_OUTCOMES: Table = Table {
    name: "delivery_outcomes",
    columns: &[
        col("id", Text, false),
        col("message_id", Text, false),
        col("user_id", Text, false),
        col("outcome", Text, false),
        col("channel", Text, true),
        col("journey", Text, true),
        col("template", Text, true),
        col("variant", Text, true),
        col("step_path", Text, true),
        col("attempts", Int, true),
        col("reason", Text, true),
        col("detail", J, false),
        col("time", Time, false),
    ],
    key: &["id"],
    partition_by: 12,
};

/// Every table, in a fixed order.
pub const TABLES: [&Table; 5] = [
    &EVENTS,
    &SEGMENT_CHANGES,
    &JOURNEY_EVENTS,
    &MESSAGES,
    &DELIVERY_OUTCOMES,
];

fn text(s: &str) -> Cell {
    Cell::Text(s.to_string())
}

fn opt_text(s: Option<&str>) -> Cell {
    s.filter(|s| !s.is_empty()).map_or(Cell::Null, text)
}

fn json_text(m: &Map<String, Json>) -> Cell {
    // A map of JSON values always serialises.
    Cell::Text(serde_json::to_string(m).unwrap_or_else(|_| "{}".into()))
}

/// The [`EVENTS`] row of an accepted event received at `received_at` (ms).
pub fn event_row(ev: &Event, received_at: i64) -> Row {
    vec![
        text(&ev.message_id),
        text(&ev.user),
        text(ev.kind.as_str()),
        opt_text(ev.event.as_deref()),
        Cell::Time(ev.timestamp),
        Cell::Time(received_at),
        json_text(&ev.properties),
        json_text(&ev.context),
        json_text(&ev.traits),
    ]
}

/// The [`SEGMENT_CHANGES`] row of a change.
pub fn change_row(c: &SegmentChange, version: u32) -> Row {
    vec![
        text(&c.segment),
        text(&c.user_id),
        Cell::Int(c.diff),
        Cell::Time(c.time),
        Cell::Int(version.into()),
    ]
}

/// The [`JOURNEY_EVENTS`] row of a journey event.
pub fn journey_row(r: &JourneyRow) -> Row {
    vec![
        text(&r.journey),
        text(&r.user_id),
        Cell::Int(r.instance.into()),
        Cell::Int(r.seq.into()),
        text(r.kind.as_str()),
        opt_text(Some(&r.step_path)),
        opt_text(r.variant.as_deref()),
        opt_text(r.message_id.as_deref()),
        opt_text(r.reason.as_deref()),
        Cell::Time(r.time),
    ]
}

/// The [`MESSAGES`] row of a message action.
pub fn message_row(m: &MessageAction) -> Row {
    vec![
        text(&m.message_id),
        text(&m.journey),
        text(&m.user_id),
        Cell::Int(m.instance.into()),
        text(&m.step_path),
        opt_text(m.variant.as_deref()),
        text(&m.channel),
        text(&m.template),
        opt_text(m.address.as_deref()),
        json_text(&m.traits),
        m.event
            .as_ref()
            .map_or(Cell::Null, |e| Cell::Text(e.to_string())),
        Cell::Time(m.time),
    ]
}

/// The [`DELIVERY_OUTCOMES`] row of a notification feedback event (`Message Sent`,
/// `Message Delivered`, `Message Failed`, `Message Opened`, `Message Clicked` with a
/// `message_id` property); `None` for any other event. The row's `id` is the event's
/// `messageId`, so a repeated feedback event is one row.
pub fn outcome_row(ev: &Event) -> Option<Row> {
    if ev.kind != EventType::Track {
        return None;
    }
    let outcome = match ev.event.as_deref()? {
        "Message Sent" => "sent",
        "Message Delivered" => "delivered",
        "Message Failed" => "failed",
        "Message Opened" => "opened",
        "Message Clicked" => "clicked",
        _ => return None,
    };
    let p = &ev.properties;
    let message_id = p.get("message_id")?.as_str()?;
    let s = |k: &str| opt_text(p.get(k).and_then(Json::as_str));
    Some(vec![
        text(&ev.message_id),
        text(message_id),
        text(&ev.user),
        text(outcome),
        s("channel"),
        s("journey"),
        s("template"),
        s("variant"),
        s("step"),
        p.get("attempts")
            .and_then(Json::as_i64)
            .map_or(Cell::Null, Cell::Int),
        s("reason"),
        json_text(p),
        Cell::Time(ev.timestamp),
    ])
}

/// About how many bytes a row takes in memory (for file-size bounds).
pub fn row_bytes(row: &Row) -> usize {
    row.iter()
        .map(|c| match c {
            Cell::Text(s) => s.len() + 24,
            _ => 16,
        })
        .sum()
}

/// The partition of an instant: `date=YYYY-MM-DD/hour=HH` (UTC).
pub fn partition(ms: i64) -> String {
    let t = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
    t.format("date=%Y-%m-%d/hour=%H").to_string()
}

fn arrow_type(ty: ColType) -> DataType {
    match ty {
        ColType::Text | ColType::Json => DataType::Utf8,
        ColType::Int => DataType::Int64,
        ColType::Time => DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
    }
}

/// The Arrow schema of a table's Parquet files.
pub fn schema(table: &Table) -> Arc<Schema> {
    Arc::new(Schema::new(
        table
            .columns
            .iter()
            .map(|c| Field::new(c.name, arrow_type(c.ty), c.nullable))
            .collect::<Vec<_>>(),
    ))
}

fn arrays(table: &Table, rows: &[&Row]) -> Vec<ArrayRef> {
    table
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| -> ArrayRef {
            match c.ty {
                ColType::Text | ColType::Json => {
                    Arc::new(StringArray::from_iter(rows.iter().map(|r| match &r[i] {
                        Cell::Text(s) => Some(s.as_str()),
                        _ => None,
                    })))
                }
                ColType::Int => Arc::new(Int64Array::from_iter(rows.iter().map(|r| match r[i] {
                    Cell::Int(v) => Some(v),
                    _ => None,
                }))),
                ColType::Time => Arc::new(
                    TimestampMillisecondArray::from_iter(rows.iter().map(|r| match r[i] {
                        Cell::Time(v) => Some(v),
                        _ => None,
                    }))
                    .with_timezone("UTC"),
                ),
            }
        })
        .collect()
}

/// Writes `rows` of `table` under `prefix`, one Parquet file per partition they fall in,
/// named `STEM.parquet`; returns the locations written. `stem` must be unique for the
/// writer (process, run and sequence number), so no file is ever overwritten.
pub fn write_partitioned(
    prefix: &str,
    table: &Table,
    rows: &[Row],
    stem: &str,
) -> Result<Vec<String>, ConnectorError> {
    let mut parts: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        let ms = match r[table.partition_by] {
            Cell::Time(ms) => ms,
            _ => 0,
        };
        parts.entry(partition(ms)).or_default().push(i);
    }
    let base = prefix.trim_end_matches('/');
    let mut written = Vec::with_capacity(parts.len());
    for (part, idx) in parts {
        let location = format!("{base}/{}/{part}/{stem}.parquet", table.name);
        let chunk: Vec<&Row> = idx.iter().map(|&i| &rows[i]).collect();
        write_parquet(&location, schema(table), &chunk, |c| arrays(table, c))?;
        written.push(location);
    }
    Ok(written)
}

/// Cuts one writer's Parquet files of every table under `prefix` back to a checkpoint at
/// instant `at` (ms), for a restart that derives what followed it again: the files of
/// the writer whose names start with `writer` (as `part-p0-`) lose
///
/// * in `events`: the events fed again (`refed`, the message ids of the ingest log's
///   records from `at` on) in the copy received from `at` on, and the journeys'
///   `update_trait` writes applied from `at` on (they are derived again);
/// * in `delivery_outcomes`: the rows of the outcome events fed again (partitioned by
///   the outcome's own instant, so read from the partition of `refed_from`, the earliest
///   timestamp among them);
/// * in `segment_changes`, `journey_events` and `messages`: every row at or after `at`
///   (their instants are the dataflow's).
///
/// Only partitions from the first that can hold such rows are read; a file left with no
/// row is removed, one left with some rewritten whole ([`crate::store::write_all`] is
/// atomic). Returns the rows removed per table.
pub fn cut_to_checkpoint(
    prefix: &str,
    writer: &str,
    at: i64,
    refed: &std::collections::HashSet<String>,
    refed_from: i64,
) -> Result<Vec<(&'static str, u64)>, ConnectorError> {
    let times = |b: &RecordBatch, col: usize| -> Option<TimestampMillisecondArray> {
        b.column(col)
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .cloned()
    };
    let strings = |b: &RecordBatch, name: &str| -> Option<StringArray> {
        b.column_by_name(name)?
            .as_any()
            .downcast_ref::<StringArray>()
            .cloned()
    };
    let mut out = Vec::new();
    for table in TABLES {
        let (from, drop): (i64, Box<RowsToDrop>) = match table.name {
            "events" => (
                at,
                Box::new(|b: &RecordBatch| {
                    let (ids, ctx) = (strings(b, "message_id")?, strings(b, "context")?);
                    let received = times(b, EVENTS.partition_by)?;
                    let marker = format!(
                        "\"{}\":true",
                        herald_operators::journey::compile::JOURNEY_WRITE_KEY
                    );
                    Some(
                        (0..b.num_rows())
                            .map(|i| {
                                let later = received.value(i) >= at;
                                Some(
                                    later
                                        && (refed.contains(ids.value(i))
                                            || ctx.value(i).contains(&marker)),
                                )
                            })
                            .collect(),
                    )
                }),
            ),
            "delivery_outcomes" => (
                refed_from.min(at),
                Box::new(|b: &RecordBatch| {
                    let ids = strings(b, "id")?;
                    Some(
                        (0..b.num_rows())
                            .map(|i| Some(refed.contains(ids.value(i))))
                            .collect(),
                    )
                }),
            ),
            _ => (
                at,
                Box::new(move |b: &RecordBatch| {
                    let t = times(b, table.partition_by)?;
                    Some(t.iter().map(|t| Some(t.is_some_and(|t| t >= at))).collect())
                }),
            ),
        };
        let removed = cut_files(prefix, table, writer, &partition(from), &*drop)?;
        out.push((table.name, removed));
    }
    Ok(out)
}

/// Which rows of a record batch go (true), or `None` for a batch not of the table.
type RowsToDrop<'a> = dyn Fn(&RecordBatch) -> Option<arrow::array::BooleanArray> + 'a;

/// Removes from one writer's files of `table`, in partitions from `from` on, the rows
/// `drop` marks; see [`cut_to_checkpoint`].
fn cut_files(
    prefix: &str,
    table: &Table,
    writer: &str,
    from: &str,
    drop: &RowsToDrop,
) -> Result<u64, ConnectorError> {
    let base = format!("{}/{}/", prefix.trim_end_matches('/'), table.name);
    let mut removed = 0;
    for file in crate::store::list(&base)? {
        let Some(rest) = file.rfind("/date=").map(|i| &file[i + 1..]) else {
            continue;
        };
        let (part, name) = match rest.rsplit_once('/') {
            Some(x) => x,
            None => continue,
        };
        if part < from || !name.starts_with(writer) || !name.ends_with(".parquet") {
            continue;
        }
        let bad = |what: String| ConnectorError::input(&file, what);
        let builder = ParquetRecordBatchReaderBuilder::try_new(read_all(&file)?)
            .map_err(|e| bad(format!("not a readable Parquet file: {e}")))?;
        let schema = Arc::clone(builder.schema());
        let reader = builder
            .build()
            .map_err(|e| bad(format!("not a readable Parquet file: {e}")))?;
        let (mut kept, mut dropped) = (Vec::new(), 0);
        for batch in reader {
            let batch = batch.map_err(|e| bad(format!("cannot read a row group: {e}")))?;
            let gone =
                drop(&batch).ok_or_else(|| bad(format!("not a `{}` table file", table.name)))?;
            let keep = arrow::compute::not(&gone)
                .map_err(|e| bad(format!("cannot filter a row group: {e}")))?;
            let batch = arrow::compute::filter_record_batch(&batch, &keep)
                .map_err(|e| bad(format!("cannot filter a row group: {e}")))?;
            dropped += (gone.len() - batch.num_rows()) as u64;
            if batch.num_rows() > 0 {
                kept.push(batch);
            }
        }
        if dropped == 0 {
            continue;
        }
        removed += dropped;
        if kept.is_empty() {
            crate::store::remove(&file)?;
            continue;
        }
        crate::store::write_all(
            &file,
            crate::sink::parquet_bytes(schema, &kept)
                .map_err(|e| bad(format!("cannot rewrite: {e}")))?,
        )?;
    }
    Ok(removed)
}

#[cfg(feature = "postgres")]
mod pg;
#[cfg(feature = "postgres")]
pub(crate) use pg::load_rows;
#[cfg(feature = "postgres")]
pub use pg::{check_pg_schema, create_postgres_tables, create_table_sql, load_postgres};

/// The number of rows in a Parquet file (from its footer).
pub fn parquet_rows(location: &str) -> Result<u64, ConnectorError> {
    let bytes = read_all(location)?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| {
        ConnectorError::input(location, format!("not a readable Parquet file: {e}"))
    })?;
    Ok(builder.metadata().file_metadata().num_rows().max(0) as u64)
}

/// Whether a source names an events archive (one `.parquet` file, or a directory or
/// prefix ending in `/`) rather than a JSONL file.
pub fn is_archive(source: &str) -> bool {
    let lower = source.to_ascii_lowercase();
    lower.ends_with(".parquet")
        || source.ends_with('/')
        || (!source.contains("://") && std::path::Path::new(source).is_dir())
}

/// Reads the events of an events archive: one Parquet file, or every `*.parquet` under a
/// directory or prefix (sorted by name; names starting with `.` or `_` are skipped), in
/// file and row order. Errors name the file: a missing column, a column of the wrong
/// type, an unknown `type`, JSON text that does not parse to an object.
pub fn read_archived_events(location: &str) -> Result<Vec<(Event, i64)>, ConnectorError> {
    let mut out = Vec::new();
    for_each_archived_event(location, &mut |ev, received| out.push((ev, received)))?;
    Ok(out)
}

/// [`read_archived_events`], handing each event and the instant (ms) Herald received it
/// to `f` as it is read, so that the archive is never held whole.
pub fn for_each_archived_event(
    location: &str,
    f: &mut dyn FnMut(Event, i64),
) -> Result<(), ConnectorError> {
    for file in &crate::store::parquet_files(location)? {
        match read_archive_file(file, f) {
            // Gone since it was listed: a restart's cut removed a file that held only
            // rows it derives again.
            Err(ConnectorError::NotFound { .. }) => {}
            r => r?,
        }
    }
    Ok(())
}

fn read_archive_file(file: &str, out: &mut dyn FnMut(Event, i64)) -> Result<(), ConnectorError> {
    let bytes = read_all(file)?;
    let bad = |what: String| ConnectorError::input(file, what);
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(|e| bad(format!("not a readable Parquet file: {e}")))?
        .build()
        .map_err(|e| bad(format!("not a readable Parquet file: {e}")))?;
    for batch in reader {
        let batch = batch.map_err(|e| bad(format!("cannot read a row group: {e}")))?;
        let strings = |name: &str| -> Result<&StringArray, ConnectorError> {
            batch
                .column_by_name(name)
                .ok_or_else(|| bad(format!("no `{name}` column: not an events archive file")))?
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(|| bad(format!("column `{name}` is not a string column")))
        };
        let times = |name: &str| -> Result<&TimestampMillisecondArray, ConnectorError> {
            batch
                .column_by_name(name)
                .ok_or_else(|| bad(format!("no `{name}` column: not an events archive file")))?
                .as_any()
                .downcast_ref::<TimestampMillisecondArray>()
                .ok_or_else(|| bad(format!("column `{name}` is not a millisecond timestamp")))
        };
        let (message_id, user, kind, event) = (
            strings("message_id")?,
            strings("user_id")?,
            strings("type")?,
            strings("event")?,
        );
        let (timestamp, received) = (times("timestamp")?, times("received_at")?);
        let (properties, context, traits) = (
            strings("properties")?,
            strings("context")?,
            strings("traits")?,
        );
        let object = |a: &StringArray, i: usize, name: &str| -> Result<Map<String, Json>, _> {
            if a.is_null(i) {
                return Ok(Map::new());
            }
            match serde_json::from_str::<Json>(a.value(i)) {
                Ok(Json::Object(m)) => Ok(m),
                _ => Err(bad(format!(
                    "`{name}` of message {} is not a JSON object",
                    message_id.value(i)
                ))),
            }
        };
        for i in 0..batch.num_rows() {
            let kind_name = kind.value(i);
            let Some(kind) = EventType::parse(kind_name) else {
                return Err(bad(format!("unknown event type '{kind_name}'")));
            };
            let ev = Event {
                user: user.value(i).to_string(),
                kind,
                event: (!event.is_null(i)).then(|| event.value(i).to_string()),
                message_id: message_id.value(i).to_string(),
                timestamp: timestamp.value(i),
                properties: object(properties, i, "properties")?,
                context: object(context, i, "context")?,
                traits: object(traits, i, "traits")?,
            };
            out(ev, received.value(i));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_fits_its_table() {
        let ev = Event {
            user: "u1".into(),
            kind: EventType::Track,
            event: Some("Message Failed".into()),
            message_id: "herald-failed-m1".into(),
            timestamp: 1_700_000_000_123,
            properties: serde_json::json!({"message_id": "m1", "channel": "sms", "attempts": 3, "reason": "400"})
                .as_object()
                .cloned()
                .unwrap(),
            context: Map::new(),
            traits: Map::new(),
        };
        let rows = [
            (&EVENTS, event_row(&ev, 1)),
            (&DELIVERY_OUTCOMES, outcome_row(&ev).unwrap()),
            (
                &SEGMENT_CHANGES,
                change_row(
                    &SegmentChange {
                        segment: "s".into(),
                        user_id: "u".into(),
                        diff: 1,
                        time: 5,
                    },
                    1,
                ),
            ),
        ];
        for (t, r) in rows {
            assert_eq!(r.len(), t.columns.len(), "{}", t.name);
            assert!(matches!(r[t.partition_by], Cell::Time(_)), "{}", t.name);
            for (c, col) in r.iter().zip(t.columns) {
                assert!(col.nullable || *c != Cell::Null, "{}.{}", t.name, col.name);
            }
            // The Arrow batch builds.
            arrow::record_batch::RecordBatch::try_new(schema(t), arrays(t, &[&r])).unwrap();
        }
        let o = outcome_row(&ev).unwrap();
        assert_eq!(o[3], Cell::Text("failed".into()));
        assert_eq!(o[9], Cell::Int(3));
        assert_eq!(o[10], Cell::Text("400".into()));
        let mut other = ev.clone();
        other.event = Some("Order Completed".into());
        assert!(outcome_row(&other).is_none());
    }

    #[test]
    fn a_writers_files_are_cut_back_to_what_a_restart_derives_again() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().to_str().unwrap().to_string();
        let t0 = 1_763_769_600_000;
        let ev = |i: i64| Event {
            user: format!("u{i}"),
            kind: EventType::Track,
            event: Some("Order Completed".into()),
            message_id: format!("m{i}"),
            timestamp: t0 + i,
            properties: Map::new(),
            context: Map::new(),
            traits: Map::new(),
        };
        let change = |i: i64| {
            change_row(
                &SegmentChange {
                    segment: "s".into(),
                    user_id: format!("u{i}"),
                    diff: 1,
                    time: received(i),
                },
                1,
            )
        };
        // Writers p0 and p1: six events and six changes over three hours each.
        fn received(i: i64) -> i64 {
            1_763_769_600_000 + i * 3_600_000 / 2
        }
        for writer in ["part-p0-1-000001", "part-p1-1-000001"] {
            let rows: Vec<Row> = (0..6).map(|i| event_row(&ev(i), received(i))).collect();
            write_partitioned(&prefix, &EVENTS, &rows, writer).unwrap();
            let rows: Vec<Row> = (0..6).map(change).collect();
            write_partitioned(&prefix, &SEGMENT_CHANGES, &rows, writer).unwrap();
        }
        // A restart of p0 at row 3's instant feeds m3..m5 again, and m1 (a resend whose
        // first copy, received before, stays).
        let refed: std::collections::HashSet<String> = ["m1", "m3", "m4", "m5"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let at = received(3);
        let removed = cut_to_checkpoint(&prefix, "part-p0-", at, &refed, t0).unwrap();
        assert!(removed.contains(&("events", 3)), "{removed:?}");
        assert!(removed.contains(&("segment_changes", 3)), "{removed:?}");
        let mut left: Vec<(String, i64)> = read_archived_events(&format!("{prefix}/events/"))
            .unwrap()
            .into_iter()
            .map(|(e, r)| (e.message_id, r))
            .collect();
        left.sort();
        let mut want: Vec<(String, i64)> = (0..3).map(|i| (format!("m{i}"), received(i))).collect();
        want.extend((0..6).map(|i| (format!("m{i}"), received(i))));
        want.sort();
        assert_eq!(left, want);
        let files = crate::store::list(&format!("{prefix}/events/")).unwrap();
        assert_eq!(
            files.iter().filter(|f| f.contains("part-p0-")).count(),
            2,
            "{files:?}"
        );
        // Delivery outcomes: the rows of the outcome events fed again go, wherever their
        // own instant puts them; the others stay.
        let outcome = |id: &str, ts: i64| Event {
            user: "u1".into(),
            kind: EventType::Track,
            event: Some("Message Sent".into()),
            message_id: id.into(),
            timestamp: ts,
            properties: serde_json::json!({"message_id": "m1", "channel": "sms"})
                .as_object()
                .cloned()
                .unwrap(),
            context: Map::new(),
            traits: Map::new(),
        };
        let rows: Vec<Row> = [("herald-sent-a", t0), ("herald-sent-b", t0 + 1)]
            .iter()
            .map(|(id, ts)| outcome_row(&outcome(id, *ts)).unwrap())
            .collect();
        write_partitioned(&prefix, &DELIVERY_OUTCOMES, &rows, "part-p0-1-000002").unwrap();
        let refed: std::collections::HashSet<String> = ["herald-sent-b".to_string()].into();
        let cut = cut_to_checkpoint(&prefix, "part-p0-", at, &refed, t0).unwrap();
        assert!(cut.contains(&("delivery_outcomes", 1)), "{cut:?}");
        let left: u64 = crate::store::list(&format!("{prefix}/delivery_outcomes/"))
            .unwrap()
            .iter()
            .map(|f| parquet_rows(f).unwrap())
            .sum();
        assert_eq!(left, 1);
        // Nothing at or after the instant is left: cutting again removes nothing.
        let again = cut_to_checkpoint(&prefix, "part-p0-", at, &refed, t0).unwrap();
        assert!(again.iter().all(|(_, n)| *n == 0), "{again:?}");
    }

    #[test]
    fn partitions_are_utc_date_and_hour() {
        assert_eq!(partition(0), "date=1970-01-01/hour=00");
        assert_eq!(
            partition(1_763_769_600_000 + 23 * 3_600_000 + 59_999),
            "date=2025-11-22/hour=23"
        );
    }

    #[test]
    fn tables_have_a_key_from_their_columns_and_valid_ddl() {
        for t in TABLES {
            for k in t.key {
                let c = t.columns.iter().find(|c| c.name == *k).unwrap();
                assert!(!c.nullable, "{}.{k} is in the key", t.name);
            }
            assert!(create_table_sql("herald", t).contains("PRIMARY KEY"));
        }
        assert!(check_pg_schema("herald_1").is_ok());
        assert!(check_pg_schema("drop table x; --").is_err());
        assert!(check_pg_schema("").is_err());
    }
}

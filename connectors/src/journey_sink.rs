//! Writers for journey outputs: journey events and message actions, as JSONL and Parquet.
//!
//! Rows are as `spec/journeys.md` lists them; times are RFC 3339 UTC with milliseconds in
//! JSONL and `Timestamp(ms, UTC)` in Parquet. In Parquet, a message's `traits` and `event`
//! are JSON text columns.

use std::sync::Arc;

use arrow::array::{ArrayRef, StringArray, TimestampMillisecondArray, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use herald_operators::journey::{JourneyRow, MessageAction};
use herald_operators::time::format_rfc3339_ms;
use serde::Serialize;
use serde_json::{Map, Value as Json};

use crate::error::ConnectorError;
use crate::sink::{write_jsonl, write_parquet};

#[derive(Serialize)]
struct RowLine<'a> {
    journey: &'a str,
    user_id: &'a str,
    instance: u32,
    kind: &'a str,
    step_path: Option<&'a str>,
    variant: Option<&'a str>,
    message_id: Option<&'a str>,
    reason: Option<&'a str>,
    time: String,
}

#[derive(Serialize)]
struct MessageLine<'a> {
    message_id: &'a str,
    journey: &'a str,
    user_id: &'a str,
    instance: u32,
    step_path: &'a str,
    variant: Option<&'a str>,
    channel: &'a str,
    template: &'a str,
    address: Option<&'a str>,
    traits: &'a Map<String, Json>,
    event: &'a Option<Json>,
    time: String,
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// Appends one journey event as a JSON line (with its newline).
pub fn journey_row_line(r: &JourneyRow, out: &mut Vec<u8>) {
    let line = RowLine {
        journey: &r.journey,
        user_id: &r.user_id,
        instance: r.instance,
        kind: r.kind.as_str(),
        step_path: non_empty(&r.step_path),
        variant: r.variant.as_deref(),
        message_id: r.message_id.as_deref(),
        reason: r.reason.as_deref(),
        time: format_rfc3339_ms(r.time),
    };
    let _ = serde_json::to_writer(&mut *out, &line);
    out.push(b'\n');
}

/// Appends one message action as a JSON line (with its newline): the format of
/// `messages.jsonl` and of the live message topic.
pub fn message_line(m: &MessageAction, out: &mut Vec<u8>) {
    let line = MessageLine {
        message_id: &m.message_id,
        journey: &m.journey,
        user_id: &m.user_id,
        instance: m.instance,
        step_path: &m.step_path,
        variant: m.variant.as_deref(),
        channel: &m.channel,
        template: &m.template,
        address: m.address.as_deref(),
        traits: &m.traits,
        event: &m.event,
        time: format_rfc3339_ms(m.time),
    };
    let _ = serde_json::to_writer(&mut *out, &line);
    out.push(b'\n');
}

/// Writes journey events as JSON lines, in the given order.
pub fn write_journey_rows_jsonl(
    url_or_path: &str,
    rows: &[JourneyRow],
) -> Result<(), ConnectorError> {
    write_jsonl(url_or_path, rows, journey_row_line)
}

/// Writes message actions as JSON lines, in the given order.
pub fn write_messages_jsonl(
    url_or_path: &str,
    msgs: &[MessageAction],
) -> Result<(), ConnectorError> {
    write_jsonl(url_or_path, msgs, message_line)
}

fn ts_field() -> Field {
    Field::new(
        "time",
        DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        false,
    )
}

fn strings<'a>(it: impl Iterator<Item = &'a str>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(it))
}

fn opt_strings<'a>(it: impl Iterator<Item = Option<&'a str>>) -> ArrayRef {
    Arc::new(StringArray::from_iter(it))
}

fn times(it: impl Iterator<Item = i64>) -> ArrayRef {
    Arc::new(TimestampMillisecondArray::from_iter_values(it).with_timezone("UTC"))
}

/// Writes journey events as Parquet.
pub fn write_journey_rows_parquet(
    url_or_path: &str,
    rows: &[JourneyRow],
) -> Result<(), ConnectorError> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("journey", DataType::Utf8, false),
        Field::new("user_id", DataType::Utf8, false),
        Field::new("instance", DataType::UInt32, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("step_path", DataType::Utf8, true),
        Field::new("variant", DataType::Utf8, true),
        Field::new("message_id", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, true),
        ts_field(),
    ]));
    write_parquet(url_or_path, schema, rows, |c| {
        vec![
            strings(c.iter().map(|r| r.journey.as_str())),
            strings(c.iter().map(|r| r.user_id.as_str())),
            Arc::new(UInt32Array::from_iter_values(c.iter().map(|r| r.instance))),
            strings(c.iter().map(|r| r.kind.as_str())),
            opt_strings(c.iter().map(|r| non_empty(&r.step_path))),
            opt_strings(c.iter().map(|r| r.variant.as_deref())),
            opt_strings(c.iter().map(|r| r.message_id.as_deref())),
            opt_strings(c.iter().map(|r| r.reason.as_deref())),
            times(c.iter().map(|r| r.time)),
        ]
    })
}

/// Writes message actions as Parquet (`traits` and `event` as JSON text).
pub fn write_messages_parquet(
    url_or_path: &str,
    msgs: &[MessageAction],
) -> Result<(), ConnectorError> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("message_id", DataType::Utf8, false),
        Field::new("journey", DataType::Utf8, false),
        Field::new("user_id", DataType::Utf8, false),
        Field::new("instance", DataType::UInt32, false),
        Field::new("step_path", DataType::Utf8, false),
        Field::new("variant", DataType::Utf8, true),
        Field::new("channel", DataType::Utf8, false),
        Field::new("template", DataType::Utf8, false),
        Field::new("address", DataType::Utf8, true),
        Field::new("traits", DataType::Utf8, false),
        Field::new("event", DataType::Utf8, true),
        ts_field(),
    ]));
    write_parquet(url_or_path, schema, msgs, |c| {
        let traits: Vec<String> = c
            .iter()
            .map(|m| Json::Object(m.traits.clone()).to_string())
            .collect();
        let events: Vec<Option<String>> = c
            .iter()
            .map(|m| m.event.as_ref().map(|e| e.to_string()))
            .collect();
        vec![
            strings(c.iter().map(|m| m.message_id.as_str())),
            strings(c.iter().map(|m| m.journey.as_str())),
            strings(c.iter().map(|m| m.user_id.as_str())),
            Arc::new(UInt32Array::from_iter_values(c.iter().map(|m| m.instance))),
            strings(c.iter().map(|m| m.step_path.as_str())),
            opt_strings(c.iter().map(|m| m.variant.as_deref())),
            strings(c.iter().map(|m| m.channel.as_str())),
            strings(c.iter().map(|m| m.template.as_str())),
            opt_strings(c.iter().map(|m| m.address.as_deref())),
            strings(traits.iter().map(|s| s.as_str())),
            opt_strings(events.iter().map(|s| s.as_deref())),
            times(c.iter().map(|m| m.time)),
        ]
    })
}

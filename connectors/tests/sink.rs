//! Output writers: change JSONL exact text, change Parquet read back, dead-letter JSONL,
//! and static CSV lists read from files.

use std::collections::BTreeSet;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Int64Type, TimeUnit, TimestampMillisecondType};
use herald_connectors::csvlist::read_user_list;
use herald_connectors::events::DeadLetter;
use herald_connectors::sink::{
    write_changes_jsonl, write_changes_parquet, write_dead_letters_jsonl, SegmentChange,
};
use herald_operators::event::RejectReason;
use herald_operators::time::parse_rfc3339_ms;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

fn changes() -> Vec<SegmentChange> {
    vec![
        SegmentChange {
            segment: "vip".into(),
            user_id: "u1".into(),
            diff: 1,
            time: parse_rfc3339_ms("2026-03-01T10:00:00Z").unwrap(),
        },
        SegmentChange {
            segment: "stalled_signups".into(),
            user_id: "user \"q\"\n".into(),
            diff: -1,
            time: parse_rfc3339_ms("2026-03-04T10:00:00.250Z").unwrap(),
        },
    ]
}

#[test]
fn changes_jsonl_has_the_exact_format() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out/changes.jsonl");
    write_changes_jsonl(path.to_str().unwrap(), &changes()).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        text,
        concat!(
            r#"{"segment":"vip","user_id":"u1","diff":1,"time":"2026-03-01T10:00:00.000Z"}"#,
            "\n",
            r#"{"segment":"stalled_signups","user_id":"user \"q\"\n","diff":-1,"time":"2026-03-04T10:00:00.250Z"}"#,
            "\n"
        )
    );
    write_changes_jsonl(path.to_str().unwrap(), &[]).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
}

#[test]
fn changes_parquet_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("changes.parquet");
    let url = format!("file://{}", path.display());
    write_changes_parquet(&url, &changes()).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let schema = reader.schema().clone();
    assert_eq!(schema.field(0).name(), "segment");
    assert_eq!(schema.field(1).data_type(), &DataType::Utf8);
    assert_eq!(schema.field(2).data_type(), &DataType::Int64);
    assert_eq!(
        schema.field(3).data_type(),
        &DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
    );
    let batches: Vec<_> = reader.build().unwrap().map(Result::unwrap).collect();
    assert_eq!(batches.len(), 1);
    let b = &batches[0];
    assert_eq!(b.num_rows(), 2);
    let seg = b.column(0).as_string::<i32>();
    let user = b.column(1).as_string::<i32>();
    let diff = b.column(2).as_primitive::<Int64Type>();
    let time = b.column(3).as_primitive::<TimestampMillisecondType>();
    let back: Vec<SegmentChange> = (0..b.num_rows())
        .map(|i| SegmentChange {
            segment: seg.value(i).to_string(),
            user_id: user.value(i).to_string(),
            diff: diff.value(i),
            time: time.value(i),
        })
        .collect();
    assert_eq!(back, changes());
    assert_eq!(time.null_count(), 0);
}

#[test]
fn dead_letters_are_one_json_object_a_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dead.jsonl");
    let letters = vec![
        DeadLetter {
            source: "events/a.jsonl".into(),
            line: 2,
            batch_index: None,
            reason: RejectReason::InvalidJson,
            detail: "not valid JSON: EOF".into(),
            raw: "{not json".into(),
        },
        DeadLetter {
            source: "events/a.jsonl".into(),
            line: 12,
            batch_index: Some(1),
            reason: RejectReason::MissingEvent,
            detail: "a track message needs `event`".into(),
            raw: r#"{"batch":[]}"#.into(),
        },
    ];
    write_dead_letters_jsonl(path.to_str().unwrap(), &letters).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        r#"{"source":"events/a.jsonl","line":2,"batch_index":null,"reason":"invalid_json","detail":"not valid JSON: EOF","raw":"{not json"}"#
    );
    assert_eq!(
        lines[1],
        r#"{"source":"events/a.jsonl","line":12,"batch_index":1,"reason":"missing_event","detail":"a track message needs `event`","raw":"{\"batch\":[]}"}"#
    );
}

#[test]
fn csv_lists_with_and_without_a_user_id_header() {
    let dir = tempfile::tempdir().unwrap();
    let with = dir.path().join("with.csv");
    std::fs::write(&with, "email,user_id\na@x,u1\nb@x,u2\nc@x,\n").unwrap();
    let without = dir.path().join("without.csv");
    std::fs::write(&without, "customer\r\nu7\r\n\r\nu8\r\n").unwrap();
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        read_user_list(with.to_str().unwrap()).unwrap(),
        set(&["u1", "u2"])
    );
    assert_eq!(
        read_user_list(without.to_str().unwrap()).unwrap(),
        set(&["u7", "u8"])
    );
    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "user_id,email\nu1,a\nu2,b,c\n").unwrap();
    let err = read_user_list(bad.to_str().unwrap()).unwrap_err();
    assert!(
        err.to_string().contains("bad.csv") && err.to_string().contains("line 3"),
        "{err}"
    );
}

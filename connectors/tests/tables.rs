//! The warehouse tables against a real PostgreSQL and a real S3-compatible store on
//! 127.0.0.1, and on the local filesystem: partitioned Parquet that reads back as the
//! same events, PostgreSQL loads that are idempotent, and named errors for bad input.

mod common;

use common::{pg, unique};
use herald_connectors::store::list;
use herald_connectors::tables::{
    self, create_postgres_tables, event_row, load_postgres, read_archived_events,
    write_partitioned, EVENTS, SEGMENT_CHANGES,
};
use herald_connectors::Fault;
use herald_operators::event::{parse_message, Event, Limits};

/// Events of every type over two hours (so two partitions), with nested JSON.
fn events() -> Vec<Event> {
    let lines = [
        r#"{"type":"identify","userId":"u1","messageId":"m1","timestamp":"2026-11-22T09:59:59.999Z","traits":{"plan":"pro","tags":["a","b"],"n":1.5}}"#,
        r#"{"type":"track","event":"Order Completed","userId":"u1","messageId":"m2","timestamp":"2026-11-22T10:00:00.000Z","properties":{"revenue":12.25,"items":[{"sku":"x"}]},"context":{"ip":"1.2.3.4"}}"#,
        r#"{"type":"page","name":"Home","anonymousId":"a9","messageId":"m3","timestamp":"2026-11-22T10:30:00.000Z"}"#,
        r#"{"type":"group","userId":"u2","groupId":"g","messageId":"m4","timestamp":"2026-11-22T10:31:00.000Z","traits":{"name":"Acme"}}"#,
        r#"{"type":"alias","userId":"u3","previousId":"a9","messageId":"m5","timestamp":"2026-11-22T10:32:00.000Z"}"#,
        r#"{"type":"screen","name":"Cart","userId":"u3","messageId":"m6","timestamp":"2026-11-22T10:33:00.000Z","properties":{"unicode":"ünï ✓"}}"#,
    ];
    lines
        .iter()
        .map(|l| {
            let (mut ev, rej) = parse_message(l.as_bytes(), None, Limits::default());
            assert!(rej.is_empty(), "{rej:?}");
            ev.remove(0)
        })
        .collect()
}

fn received(ev: &Event) -> i64 {
    ev.timestamp + 7 * 24 * 3_600_000
}

#[test]
#[ignore = "needs an S3-compatible server on 127.0.0.1: run scripts/test.sh"]
fn the_events_archive_reads_back_whole_from_s3_and_from_disk() {
    let bucket = std::env::var("HERALD_TEST_S3_BUCKET").unwrap_or_else(|_| "herald-test".into());
    let dir = tempfile::tempdir().unwrap();
    let evs = events();
    let rows: Vec<_> = evs.iter().map(|e| event_row(e, received(e))).collect();
    for prefix in [
        format!("s3://{bucket}/tables-{}", unique()),
        dir.path().to_str().unwrap().to_string(),
    ] {
        let written = write_partitioned(&prefix, &EVENTS, &rows, "part-t-000001").unwrap();
        let rel: Vec<String> = written
            .iter()
            .map(|w| w.strip_prefix(&prefix).unwrap().to_string())
            .collect();
        assert_eq!(
            rel,
            [
                "/events/date=2026-11-29/hour=09/part-t-000001.parquet",
                "/events/date=2026-11-29/hour=10/part-t-000001.parquet"
            ],
            "partitioned by received_at"
        );
        assert_eq!(list(&format!("{prefix}/")).unwrap().len(), 2);
        let back = read_archived_events(&format!("{prefix}/events/")).unwrap();
        let expect: Vec<(Event, i64)> = evs.iter().map(|e| (e.clone(), received(e))).collect();
        assert_eq!(back, expect, "{prefix}");
        // And through the replay reader, as a source.
        let batch = herald_connectors::events::read_events(
            &[format!("{prefix}/events/")],
            Limits::default(),
            herald_connectors::events::DEFAULT_DEDUP_HORIZON_MS,
            1,
        )
        .unwrap();
        let evs_back: Vec<Event> = batch.events.into_iter().map(|(e, _)| e).collect();
        assert_eq!(evs_back, evs);
    }

    // A Parquet file that is not an events table is refused, naming the column.
    let other = dir.path().join("other");
    let change = tables::change_row(
        &herald_connectors::sink::SegmentChange {
            segment: "s".into(),
            user_id: "u".into(),
            diff: 1,
            time: 0,
        },
        1,
    );
    let w = write_partitioned(other.to_str().unwrap(), &SEGMENT_CHANGES, &[change], "x").unwrap();
    let e = read_archived_events(&w[0]).unwrap_err();
    assert_eq!(e.fault(), Fault::Input);
    assert!(e.to_string().contains("no `message_id` column"), "{e}");
    let e = read_archived_events(&format!("{}/none.parquet", dir.path().display())).unwrap_err();
    assert!(e.to_string().contains("none.parquet"), "{e}");
}

#[test]
#[ignore = "needs PostgreSQL on 127.0.0.1: run scripts/test.sh"]
fn postgres_loads_create_the_tables_and_are_idempotent() {
    let schema = format!("herald_t{}", unique());
    create_postgres_tables(&pg(), &schema).unwrap();
    // Twice is fine (IF NOT EXISTS).
    create_postgres_tables(&pg(), &schema).unwrap();
    let evs = events();
    let mut rows: Vec<_> = evs.iter().map(|e| event_row(e, received(e))).collect();
    let first = load_postgres(&pg(), &schema, &EVENTS, &rows).unwrap();
    assert_eq!((first.sent, first.inserted), (6, 6));
    // A replay: the same rows, plus one repeated inside the batch, add nothing.
    rows.push(rows[0].clone());
    let again = load_postgres(&pg(), &schema, &EVENTS, &rows).unwrap();
    assert_eq!((again.sent, again.inserted), (7, 0));
    // JSON columns are jsonb: queryable.
    let url = pg();
    let q = format!(
        "SELECT (properties -> 'items' -> 0 ->> 'sku'), properties ->> 'unicode' \
         FROM {schema}.events WHERE message_id IN ('m2', 'm6') ORDER BY message_id"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let got: Vec<(Option<String>, Option<String>)> = rt.block_on(async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .query(&q, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    });
    assert_eq!(
        got,
        [(Some("x".into()), None), (None, Some("ünï ✓".into()))]
    );

    // Errors name the problem and never show the password.
    let e = tables::check_pg_schema("Robert'); DROP TABLE x;--").unwrap_err();
    assert_eq!(e.fault(), Fault::Input);
    let bad = "postgres://herald:s3cret@127.0.0.1:1/nowhere";
    let e = load_postgres(bad, &schema, &EVENTS, &rows).unwrap_err();
    assert_eq!(e.fault(), Fault::External);
    let text = e.to_string();
    assert!(
        text.contains("cannot connect") && !text.contains("s3cret"),
        "{text}"
    );
    let e = load_postgres(&pg(), "no_such_schema_here", &EVENTS, &rows).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
}

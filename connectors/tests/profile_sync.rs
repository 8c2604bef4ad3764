//! Profile sync against a real PostgreSQL and a real S3-compatible store on 127.0.0.1:
//! the query's result becomes a snapshot the snapshot reader reads back, typed; bad
//! queries are refused with the column or row named, and write nothing. Warehouse
//! audiences (the same query path) return the ids, with errors naming the segment.

mod common;

use std::collections::BTreeMap;

use common::{pg, sql, unique};
use herald_connectors::profile_sync::sync_profiles;
use herald_connectors::snapshot::read_snapshot;
use herald_operators::value::{Num, Type, Value};

#[test]
#[ignore = "needs PostgreSQL and an S3-compatible server on 127.0.0.1: run scripts/test.sh"]
fn a_query_becomes_a_typed_snapshot_on_s3_and_on_disk() {
    let t = format!("profiles_{}", unique());
    sql(&format!(
        "CREATE TABLE {t} (id text, plan text, orders int, ltv float8, vip boolean, \
         signed_up timestamptz, birthday date, score numeric);
         INSERT INTO {t} VALUES
           ('u1', 'pro', 3, 120.5, true, '2026-01-02T03:04:05.006Z', '1990-05-01', 1.5),
           ('u2', NULL, 0, NULL, false, NULL, NULL, NULL),
           (NULL, 'free', 1, 1, false, NULL, NULL, NULL),
           ('', 'free', 1, 1, false, NULL, NULL, NULL);"
    ));
    let query = format!(
        "SELECT id AS user_id, plan, orders, ltv, vip, signed_up, birthday, score::float8 AS score FROM {t}"
    );
    let bucket = std::env::var("HERALD_TEST_S3_BUCKET").unwrap_or_else(|_| "herald-test".into());
    let dir = tempfile::tempdir().unwrap();
    for prefix in [
        format!("s3://{bucket}/sync-{t}"),
        dir.path().to_str().unwrap().to_string(),
    ] {
        let s = sync_profiles(&pg(), &query, &prefix, 1_700_000_000_000).unwrap();
        assert_eq!(s.users, 2);
        assert_eq!(s.skipped, 2);
        assert_eq!(
            s.location,
            format!("{prefix}/2023-11-14T22-13-20.000Z.parquet")
        );
        let snap = read_snapshot(&s.location).unwrap();
        assert_eq!(
            snap.schema,
            [
                ("plan".to_string(), Type::Str),
                ("orders".to_string(), Type::Num),
                ("ltv".to_string(), Type::Num),
                ("vip".to_string(), Type::Bool),
                ("signed_up".to_string(), Type::Ts),
                ("birthday".to_string(), Type::Ts),
                ("score".to_string(), Type::Num),
            ]
        );
        let u1: BTreeMap<String, Value> = [
            ("plan", Value::Str("pro".into())),
            ("orders", Value::Num(Num(3.0))),
            ("ltv", Value::Num(Num(120.5))),
            ("vip", Value::Bool(true)),
            ("signed_up", Value::Ts(1_767_323_045_006)),
            ("birthday", Value::Ts(641_520_000_000)),
            ("score", Value::Num(Num(1.5))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(snap.rows["u1"], u1);
        // NULLs are NULL cells (writes of NULL at the snapshot's instant), not absent.
        let u2: Vec<&str> = snap.rows["u2"]
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(u2, ["orders", "vip"]);
        assert_eq!(snap.rows["u2"].len(), 7, "every column is a cell");
    }
}

#[test]
#[ignore = "needs PostgreSQL on 127.0.0.1: run scripts/test.sh"]
fn bad_queries_are_named_and_write_nothing() {
    let t = format!("profiles_{}", unique());
    sql(&format!(
        "CREATE TABLE {t} (user_id text, score numeric, tags text[]);
         INSERT INTO {t} VALUES ('u1', 1, '{{a}}'), ('u1', 2, '{{b}}');"
    ));
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().to_str().unwrap();
    let err = |q: &str| sync_profiles(&pg(), q, prefix, 0).unwrap_err().to_string();
    let e = err(&format!("SELECT score FROM {t}"));
    assert!(e.contains("has no `user_id` column"), "{e}");
    let e = err(&format!("SELECT user_id, score FROM {t}"));
    assert!(
        e.contains("column 'score' is numeric, which a snapshot cannot hold: cast it in the query (score::float8"),
        "{e}"
    );
    let e = err(&format!("SELECT user_id, tags FROM {t}"));
    assert!(e.contains("column 'tags' is _text"), "{e}");
    let e = err(&format!("SELECT user_id, score::float8 AS s FROM {t}"));
    assert!(e.contains("user_id 'u1' is on two rows"), "{e}");
    let e = err("SELECT user_id FROM no_such_table");
    assert!(
        e.contains("the profile query") && e.contains("no_such_table"),
        "{e}"
    );
    // Nothing was written for any of them.
    assert_eq!(std::fs::read_dir(prefix).unwrap().count(), 0);
    // And the password never shows.
    let e = sync_profiles(
        "postgres://herald:s3cret@127.0.0.1:1/db",
        "SELECT 1",
        prefix,
        0,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("cannot connect") && !e.contains("s3cret"), "{e}");
}

/// Warehouse audiences use the same query path: ids from `user_id` or the first column,
/// integers kept exact, NULL and empty ids skipped, errors naming the segment.
#[test]
#[ignore = "needs PostgreSQL on 127.0.0.1: run scripts/test.sh"]
fn a_warehouse_audience_is_the_set_of_ids_its_query_returns() {
    use herald_connectors::audience::run_audience;
    let t = format!("scores_{}", unique());
    sql(&format!(
        "CREATE TABLE {t} (id bigint, name text, p float8);
         INSERT INTO {t} VALUES (9007199254740993, 'a', 0.9), (2, 'b', 0.9), (2, 'b', 0.95),
                               (3, NULL, 0.99), (4, '', 0.99), (NULL, 'n', 0.99);"
    ));
    let ids = |q: &str| {
        let a = run_audience(&pg(), "churn", q).unwrap();
        (a.members.into_iter().collect::<Vec<_>>(), a.skipped)
    };
    // The first column when there is no user_id; integers beyond 2^53 stay exact.
    assert_eq!(
        ids(&format!("SELECT id, p FROM {t} WHERE p > 0.8 AND id < 100")),
        (vec!["2".to_string(), "3".into(), "4".into()], 0)
    );
    assert_eq!(
        ids(&format!("SELECT id FROM {t} WHERE id > 100")).0,
        ["9007199254740993"]
    );
    // The user_id column wherever it is; NULL and empty ids are skipped and counted.
    assert_eq!(
        ids(&format!("SELECT p, name AS user_id FROM {t}")),
        (vec!["a".to_string(), "b".into(), "n".into()], 2)
    );
    // An empty result is an empty audience (the one way to empty it).
    assert_eq!(
        ids(&format!("SELECT name FROM {t} WHERE false")),
        (vec![], 0)
    );
    let err = |q: &str| run_audience(&pg(), "churn", q).unwrap_err().to_string();
    let e = err(&format!("SELECT p FROM {t}"));
    assert!(
        e.contains("warehouse audience 'churn'")
            && e.contains("'p' is float8")
            && e.contains("p::text"),
        "{e}"
    );
    let e = err("SELECT user_id FROM no_such_table");
    assert!(
        e.contains("warehouse audience 'churn'") && e.contains("no_such_table"),
        "{e}"
    );
    let e = err(&format!("SELECT FROM {t}"));
    assert!(e.contains("no columns"), "{e}");
    // Every id NULL or empty is a broken query, not an empty audience.
    let e = err(&format!("SELECT name FROM {t} WHERE id IN (3, 4)"));
    assert!(e.contains("all 2 rows have a NULL or empty 'name'"), "{e}");
    // char(n) ids come back padded: trimmed, like a CSV list's.
    assert_eq!(ids("SELECT 'u7'::char(6) AS user_id").0, ["u7"]);
    // The query runs read-only: a segment file cannot write to the warehouse.
    let e = err(&format!("DELETE FROM {t} RETURNING id"));
    assert!(e.contains("read-only"), "{e}");
    assert_eq!(ids(&format!("SELECT id FROM {t} WHERE id = 2")).0, ["2"]);
}

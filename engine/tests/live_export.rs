//! `herald run` with `[export]`: events, segment changes, journey events, messages and
//! delivery outcomes land as date/hour-partitioned Parquet on a real S3-compatible server
//! and as tables in a real PostgreSQL; the analytics queries of docs/analytics.md answer
//! on them; and replaying the events archive rebuilds the same segments and messages.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{pg, pg_query, unique, Herald};
use herald_connectors::store::list;
use herald_connectors::tables::parquet_rows;
use serde_json::Value as Json;

const USERS: usize = 40;

const SEGMENTS: &str = "\
CREATE SEGMENT carts AS count(*) FILTER (WHERE event = 'Cart Abandoned') >= 1;
CREATE SEGMENT buyers AS count(*) FILTER (WHERE event = 'Order Completed') >= 1;
CREATE SEGMENT pro AS plan = 'pro';
CREATE SEGMENT reached AS count(*) FILTER (WHERE event = 'Message Delivered') >= 1;
";

const JOURNEYS: &str = r#"
journey: cart
entry: { event: Cart Abandoned }
exit:
  - event: Order Completed
    goal: true
steps:
  - split:
      - { variant: nudge, weight: 50, steps: [ { send: { channel: webhook, template: nudge } } ] }
      - { variant: control, weight: 50, steps: [] }
  - wait: 1 hour
"#;

fn query(sql: &str) -> Vec<Vec<String>> {
    pg_query(sql)
}

fn count(sql: &str) -> i64 {
    query(sql)[0][0].parse().unwrap()
}

/// A webhook endpoint that accepts everything.
fn webhook(rt: &tokio::runtime::Runtime) -> (Arc<Mutex<usize>>, String) {
    let seen = Arc::new(Mutex::new(0usize));
    let s2 = Arc::clone(&seen);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(move || {
        let seen = Arc::clone(&s2);
        async move {
            *seen.lock().unwrap() += 1;
            "ok"
        }
    });
    rt.spawn(async move { axum::serve(listener, app).await });
    (seen, format!("http://{addr}/hook"))
}

/// The `sql` blocks of docs/analytics.md by their `-- name:`, for `schema`.
fn analytics_queries(schema: &str) -> BTreeMap<String, String> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/analytics.md"))
            .unwrap();
    let mut out = BTreeMap::new();
    for block in doc.split("```sql\n").skip(1) {
        let sql = block.split("```").next().unwrap();
        let name = sql
            .lines()
            .find_map(|l| l.strip_prefix("-- name: "))
            .unwrap_or_else(|| panic!("a sql block without `-- name:`:\n{sql}"))
            .trim()
            .to_string();
        out.insert(name, sql.replace("herald.", &format!("{schema}.")));
    }
    out
}

/// Final membership from change rows: segment -> members.
fn membership(changes: &[Json]) -> BTreeMap<String, BTreeSet<String>> {
    let mut sum: BTreeMap<(String, String), i64> = BTreeMap::new();
    for c in changes {
        *sum.entry((
            c["segment"].as_str().unwrap().to_string(),
            c["user_id"].as_str().unwrap().to_string(),
        ))
        .or_default() += c["diff"].as_i64().unwrap();
    }
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for ((s, u), d) in sum {
        assert!(d == 0 || d == 1, "{s}/{u} summed to {d}");
        if d == 1 {
            out.entry(s).or_default().insert(u);
        }
    }
    out
}

/// A config exporting to `schema` of the test PostgreSQL only, with `workers` and the
/// `extra` sections.
fn pg_export_config(workers: usize, schema: &str, extra: &str) -> String {
    format!(
        "[engine]\nsegments = \"segments.sql\"\nworkers = {workers}\n\
         [http]\nlisten = \"127.0.0.1:0\"\nwrite_keys = [\"wk\"]\n{extra}\
         [warehouse]\npostgres = \"{}\"\n\
         [export]\npostgres_schema = \"{schema}\"\nflush_every = \"1 second\"\n",
        pg()
    )
}

fn read_jsonl(path: &Path) -> Vec<Json> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
#[ignore = "needs PostgreSQL and an S3-compatible server on 127.0.0.1: run scripts/test.sh"]
fn every_decision_lands_in_the_warehouse_tables_and_the_archive_rebuilds_state() {
    let bucket = std::env::var("HERALD_TEST_S3_BUCKET")
        .unwrap_or_else(|_| panic!("HERALD_TEST_S3_BUCKET must be set: run scripts/services.sh"));
    let schema = unique("herald_x");
    let prefix = format!("s3://{bucket}/export-{schema}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (hooks, url) = webhook(&rt);

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("segments.sql"), SEGMENTS).unwrap();
    std::fs::write(dir.path().join("journeys.yaml"), JOURNEYS).unwrap();
    std::fs::create_dir_all(dir.path().join("templates")).unwrap();
    std::fs::write(
        dir.path().join("templates/nudge.liquid"),
        "{{ user.id }}, your cart misses you\n",
    )
    .unwrap();
    let config = format!(
        "[engine]\nsegments = \"segments.sql\"\njourneys = \"journeys.yaml\"\nworkers = 2\n\
         [http]\nlisten = \"127.0.0.1:0\"\nwrite_keys = [\"wk\"]\n\
         [notify]\ntemplates = \"templates\"\n[notify.webhook]\nurl = \"{url}\"\nsecret = \"s\"\n\
         [warehouse]\npostgres = \"{}\"\n\
         [export]\nparquet = \"{prefix}\"\npostgres_schema = \"{schema}\"\n\
         max_rows_per_file = 25\nflush_every = \"1 second\"\n",
        pg()
    );
    let mut h = Herald::start(dir.path(), &config);

    // Identify, then abandon a cart; later, half of them buy.
    let mut items: Vec<String> = (0..USERS)
        .map(|i| {
            let plan = if i % 3 == 0 { "pro" } else { "free" };
            format!(
                r#"{{"type":"identify","userId":"u{i}","messageId":"id-{i}","traits":{{"plan":"{plan}"}}}},{{"type":"track","event":"Cart Abandoned","userId":"u{i}","messageId":"cart-{i}","properties":{{"total":{i}}}}}"#
            )
        })
        .collect();
    let (status, body) = h.post(
        "/v1/batch",
        "wk",
        &format!(r#"{{"batch":[{}]}}"#, items.join(",")),
    );
    assert_eq!(status, 200, "{body}");
    h.wait_for("every cart", Duration::from_secs(60), |h| {
        h.size("carts") == USERS as i64
    });
    let nudged = || {
        h.output("journey_events.jsonl")
            .iter()
            .filter(|r| r["kind"] == "sent")
            .count()
    };
    h.wait_for("the nudges to be delivered", Duration::from_secs(60), |h| {
        let n = nudged();
        n > 0 && h.size("reached") == n as i64
    });
    items = (0..USERS)
        .step_by(2)
        .map(|i| {
            format!(
                r#"{{"type":"track","event":"Order Completed","userId":"u{i}","messageId":"order-{i}","properties":{{"revenue":{}}}}}"#,
                10 + i
            )
        })
        .collect();
    let (status, body) = h.post(
        "/v1/batch",
        "wk",
        &format!(r#"{{"batch":[{}]}}"#, items.join(",")),
    );
    assert_eq!(status, 200, "{body}");
    h.wait_for("the buyers", Duration::from_secs(60), |h| {
        h.size("buyers") == (USERS / 2) as i64
    });
    let (_, live_members) = h.get_json("/v1/segments");
    let status = h.stop();
    assert!(status.success(), "{}", h.stderr_text());

    let out = dir.path().join("herald-out");
    let changes = read_jsonl(&out.join("segment_changes.jsonl"));
    let journey_rows = read_jsonl(&out.join("journey_events.jsonl"));
    let messages = read_jsonl(&out.join("messages.jsonl"));
    let sent = journey_rows.iter().filter(|r| r["kind"] == "sent").count();
    assert!(
        sent > 0 && sent < USERS,
        "a 50/50 split sends to some: {sent}"
    );
    assert_eq!(*hooks.lock().unwrap(), sent);
    // Every accepted event: identify + cart per user, the orders, and per message the
    // Message Sent and Message Delivered feedback events.
    let events = 2 * USERS + USERS / 2 + 2 * sent;

    // Parquet: partitioned by date and hour, no file over the row bound, every row there.
    let files = list(&format!("{prefix}/")).unwrap();
    let mut rows_by_table: BTreeMap<String, u64> = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(&format!("{prefix}/")).unwrap();
        let parts: Vec<&str> = rel.split('/').collect();
        assert_eq!(parts.len(), 4, "{rel}");
        assert!(
            parts[1].starts_with("date=20") && parts[1].len() == 15,
            "{rel}"
        );
        assert!(
            parts[2].starts_with("hour=") && parts[2].len() == 7,
            "{rel}"
        );
        assert!(parts[3].ends_with(".parquet"), "{rel}");
        let n = parquet_rows(f).unwrap();
        assert!((1..=25).contains(&n), "{rel}: {n} rows");
        *rows_by_table.entry(parts[0].to_string()).or_default() += n;
    }
    assert_eq!(rows_by_table["events"], events as u64, "{rows_by_table:?}");
    assert_eq!(rows_by_table["segment_changes"], changes.len() as u64);
    assert_eq!(rows_by_table["journey_events"], journey_rows.len() as u64);
    assert_eq!(rows_by_table["messages"], messages.len() as u64);
    assert_eq!(rows_by_table["delivery_outcomes"], 2 * sent as u64);
    assert!(files.len() > 5, "small files were cut: {}", files.len());

    // PostgreSQL: the same rows.
    let t = |name: &str| count(&format!("SELECT count(*) FROM {schema}.{name}"));
    assert_eq!(t("events"), events as i64);
    assert_eq!(t("segment_changes"), changes.len() as i64);
    assert_eq!(t("journey_events"), journey_rows.len() as i64);
    assert_eq!(t("messages"), messages.len() as i64);
    assert_eq!(
        count(&format!(
            "SELECT count(*) FROM {schema}.delivery_outcomes WHERE outcome = 'delivered'"
        )),
        sent as i64
    );
    assert_eq!(
        count(&format!(
            "SELECT count(*) FROM {schema}.events WHERE (properties ->> 'revenue')::int >= 10"
        )),
        (USERS / 2) as i64
    );

    // The analytics queries of docs/analytics.md.
    let queries = analytics_queries(&schema);
    for (name, sql) in &queries {
        query(sql);
        eprintln!("docs/analytics.md {name}: ran");
    }
    let final_sizes: BTreeMap<String, i64> = {
        let mut last = BTreeMap::new();
        for r in query(&queries["segment_size_over_time"]) {
            last.insert(r[0].clone(), r[2].parse().unwrap());
        }
        last
    };
    for s in live_members["segments"].as_array().unwrap() {
        let name = s["name"].as_str().unwrap();
        assert_eq!(
            final_sizes.get(name).copied().unwrap_or(0),
            s["size"].as_i64().unwrap(),
            "size of {name}"
        );
    }
    // Conversion per variant, against journey_events.jsonl.
    let mut variant_of: BTreeMap<String, String> = BTreeMap::new();
    let mut converted: BTreeSet<String> = BTreeSet::new();
    for r in &journey_rows {
        let u = r["user_id"].as_str().unwrap().to_string();
        if let Some(v) = r["variant"].as_str() {
            variant_of.entry(u.clone()).or_insert_with(|| v.to_string());
        }
        if r["kind"] == "converted" {
            converted.insert(u);
        }
    }
    assert_eq!(converted.len(), USERS / 2);
    let conv = query(&queries["conversion_per_variant"]);
    assert_eq!(conv.len(), 2, "{conv:?}");
    for r in conv {
        let v = &r[1];
        let members: Vec<&String> = variant_of
            .iter()
            .filter(|(_, x)| *x == v)
            .map(|(u, _)| u)
            .collect();
        assert_eq!(r[2], members.len().to_string(), "entered, {v}");
        let conv_n = members.iter().filter(|u| converted.contains(**u)).count();
        assert_eq!(r[3], conv_n.to_string(), "converted, {v}");
    }
    // The funnel: every instance entered; the send step's instances are the nudged ones.
    let funnel = query(&queries["journey_funnel"]);
    let at = |kind: &str| {
        funnel
            .iter()
            .find(|r| r[2] == kind)
            .map(|r| r[3].clone())
            .unwrap_or_default()
    };
    assert_eq!(at("entered"), USERS.to_string(), "{funnel:?}");
    assert_eq!(at("sent"), sent.to_string(), "{funnel:?}");
    assert_eq!(at("converted"), (USERS / 2).to_string(), "{funnel:?}");

    // Delivery per channel, and orders after a delivered message (every order came
    // after the nudges were delivered).
    let delivery = query(&queries["delivery_per_channel"]);
    assert_eq!(
        delivery,
        vec![vec![
            "webhook".to_string(),
            sent.to_string(),
            sent.to_string(),
            sent.to_string(),
            "0".into(),
            "0".into()
        ]]
    );
    let nudged_buyers = messages
        .iter()
        .filter(|m| {
            let u = m["user_id"].as_str().unwrap();
            u[1..].parse::<usize>().unwrap() % 2 == 0
        })
        .count();
    let revenue = query(&queries["revenue_after_message"]);
    assert_eq!(revenue.len(), 1, "{revenue:?}");
    assert_eq!(revenue[0][1], nudged_buyers.to_string(), "{revenue:?}");

    // Rebuild: replaying the archive gives the same membership and the same messages.
    let rebuilt = tempfile::tempdir().unwrap();
    let until = herald_operators::time::format_rfc3339_ms(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64,
    );
    let replay = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["replay", "--segments"])
        .arg(dir.path().join("segments.sql"))
        .arg("--journeys")
        .arg(dir.path().join("journeys.yaml"))
        .args([
            "--events",
            &format!("{prefix}/events/"),
            "--until",
            &until,
            "--out",
        ])
        .arg(rebuilt.path())
        .output()
        .unwrap();
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    assert_eq!(
        membership(&read_jsonl(&rebuilt.path().join("segment_changes.jsonl"))),
        membership(&changes)
    );
    let ids = |rows: &[Json]| -> BTreeSet<String> {
        rows.iter()
            .map(|m| m["message_id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        ids(&read_jsonl(&rebuilt.path().join("messages.jsonl"))),
        ids(&messages)
    );
}

#[test]
#[ignore = "needs PostgreSQL on 127.0.0.1: run scripts/test.sh"]
fn a_warehouse_that_refuses_rows_is_retried_and_loses_nothing() {
    let schema = unique("herald_r");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("segments.sql"),
        "CREATE SEGMENT buyers AS count(*) FILTER (WHERE event = 'Order Completed') >= 1;\n",
    )
    .unwrap();
    let config = pg_export_config(1, &schema, "");
    let mut h = Herald::start(dir.path(), &config);
    // The tables exist once Herald listens; now the warehouse refuses every event row.
    query(&format!(
        "ALTER TABLE {schema}.events ADD CONSTRAINT hold CHECK (false) NOT VALID"
    ));
    let items: Vec<String> = (0..10)
        .map(|i| {
            format!(
                r#"{{"type":"track","event":"Order Completed","userId":"u{i}","messageId":"o-{i}"}}"#
            )
        })
        .collect();
    let (status, body) = h.post(
        "/v1/batch",
        "wk",
        &format!(r#"{{"batch":[{}]}}"#, items.join(",")),
    );
    assert_eq!(status, 200, "{body}");
    // Segments do not wait for the warehouse.
    h.wait_for("the buyers", Duration::from_secs(30), |h| {
        h.size("buyers") == 10
    });
    h.wait_for("a refused load", Duration::from_secs(30), |h| {
        h.errors("export_postgres") >= 1.0
    });
    assert_eq!(count(&format!("SELECT count(*) FROM {schema}.events")), 0);
    query(&format!("ALTER TABLE {schema}.events DROP CONSTRAINT hold"));
    h.wait_for("the retried load", Duration::from_secs(60), |_| {
        count(&format!("SELECT count(*) FROM {schema}.events")) == 10
    });
    assert!(h.stop().success(), "{}", h.stderr_text());
    assert!(
        h.stderr_text().contains("export_postgres: table events")
            && h.stderr_text().contains("violates check constraint"),
        "the log names the table and the server's reason:\n{}",
        h.stderr_text()
    );
    assert_eq!(
        count(&format!("SELECT count(*) FROM {schema}.segment_changes")),
        10
    );
}

/// A segment changed through the definitions API: its rows in the PostgreSQL table carry
/// the version that made them (the file's rows version 1), as the JSONL lines say, in a
/// table created by an earlier Herald without the column (it is added at start).
#[test]
#[ignore = "needs PostgreSQL on 127.0.0.1: run scripts/test.sh"]
fn segment_changes_rows_say_which_definition_version_made_them() {
    let schema = unique("herald_v");
    // The table as an earlier Herald created it.
    query(&format!(
        "CREATE SCHEMA {schema}; CREATE TABLE {schema}.segment_changes (segment text NOT NULL, \
         user_id text NOT NULL, diff bigint NOT NULL, time timestamptz NOT NULL, \
         PRIMARY KEY (segment, user_id, time, diff))"
    ));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("segments.sql"),
        "CREATE SEGMENT pro AS plan = 'pro';\nCREATE SEGMENT free AS plan = 'free';\n",
    )
    .unwrap();
    let config = pg_export_config(2, &schema, "[checkpoint]\nevery = \"1 second\"\n");
    let mut h = Herald::start(dir.path(), &config);
    let items: Vec<String> = (0..30)
        .map(|i| {
            let plan = if i % 3 == 0 { "pro" } else { "free" };
            format!(
                r#"{{"type":"identify","userId":"u{i}","messageId":"id-{i}","traits":{{"plan":"{plan}"}}}}"#
            )
        })
        .collect();
    let (status, body) = h.post(
        "/v1/batch",
        "wk",
        &format!(r#"{{"batch":[{}]}}"#, items.join(",")),
    );
    assert_eq!(status, 200, "{body}");
    h.wait_for("the plans", Duration::from_secs(30), |h| {
        h.size("pro") == 10
    });
    let (status, body) = h.request(
        "PUT",
        "/v1/segments/pro",
        common::ADMIN_KEY,
        "CREATE SEGMENT pro AS plan = 'free';",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 2, "{body}");
    h.wait_for("pro changed", Duration::from_secs(30), |h| {
        h.size("pro") == 20
    });
    assert!(h.stop().success(), "{}", h.stderr_text());

    let rows = query(&format!(
        "SELECT segment, version, diff, count(*) FROM {schema}.segment_changes \
         GROUP BY segment, version, diff ORDER BY segment, version, diff"
    ));
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        rows,
        [
            s(&["free", "1", "1", "20"]),
            // The file's pro entered 10; version 2 took them out and put the 20 free in.
            s(&["pro", "1", "1", "10"]),
            s(&["pro", "2", "-1", "10"]),
            s(&["pro", "2", "1", "20"]),
        ]
    );
    // The JSONL lines say the same.
    let lines = read_jsonl(&dir.path().join("herald-out/segment_changes.jsonl"));
    let v2 = lines.iter().filter(|l| l["version"] == 2).count();
    assert_eq!(v2, 30);
}

#[test]
fn a_warehouse_that_cannot_be_reached_at_start_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("segments.sql"),
        "CREATE SEGMENT a AS count(*) >= 1;\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("herald.toml"),
        "[engine]\nsegments = \"segments.sql\"\n[http]\nlisten = \"127.0.0.1:0\"\n\
         [warehouse]\npostgres = \"postgres://herald:s3cret@127.0.0.1:1/nowhere\"\n\
         [export]\npostgres_schema = \"herald\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["run", "--config"])
        .arg(dir.path().join("herald.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // A warehouse that is down is not the user's mistake: 69 (EX_UNAVAILABLE), not 2.
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(
        err.contains("export.postgres_schema") && err.contains("cannot connect"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
}

//! `herald run` in embedded mode (no external services): HTTP ingest in Segment's format,
//! segments on the wall clock, the query and ops API, graceful shutdown.

mod common;

use std::time::Duration;

use common::Herald;
use serde_json::Value as Json;

const SEGMENTS: &str = "\
CREATE SEGMENT clicked_recently AS
    count(*) FILTER (WHERE event = 'Clicked' AND timestamp > now() - INTERVAL '2 seconds') >= 1;
CREATE SEGMENT pro AS plan = 'pro';
CREATE SEGMENT big_spender AS
    coalesce(sum(properties.revenue) FILTER (WHERE event = 'Order Completed'), 0) >= 100;
";

fn config(workers: usize) -> String {
    format!(
        "[engine]\nsegments = \"segments.sql\"\nworkers = {workers}\n\
         [http]\nlisten = \"127.0.0.1:0\"\nwrite_keys = [\"wk\"]\nmax_batch_bytes = 65536\n"
    )
}

fn start(workers: usize) -> (tempfile::TempDir, Herald) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("segments.sql"), SEGMENTS).unwrap();
    let herald = Herald::start(dir.path(), &config(workers));
    (dir, herald)
}

#[test]
fn http_events_enter_segments_and_windows_lapse_without_new_events() {
    let (_dir, mut h) = start(2);
    let (status, body) = h.post("/v1/track", "wk", r#"{"userId":"u1","event":"Clicked"}"#);
    assert_eq!(
        (status, body.clone()),
        (200, serde_json::json!({"success": true}))
    );
    // The endpoint decides the type; anonymousId is a user key too.
    assert_eq!(
        h.post(
            "/v1/identify",
            "wk",
            r#"{"anonymousId":"a2","traits":{"plan":"pro"}}"#
        )
        .0,
        200
    );
    // A gzip batch, as the server SDKs send.
    let batch = r#"{"batch":[
        {"type":"track","userId":"u3","event":"Clicked","messageId":"m3"},
        {"type":"track","userId":"u4","event":"Order Completed","properties":{"revenue":60}},
        {"type":"track","userId":"u4","event":"Order Completed","properties":{"revenue":50}}
    ],"sentAt":"2026-01-01T00:00:00Z"}"#;
    assert_eq!(h.post_gzip("/v1/batch", "wk", batch).0, 200);

    h.wait_for("three clickers and buyers", Duration::from_secs(20), |h| {
        h.size("clicked_recently") == 2 && h.size("pro") == 1 && h.size("big_spender") == 1
    });
    // A redelivery (same messageId) changes nothing.
    assert_eq!(
        h.post(
            "/v1/track",
            "wk",
            r#"{"userId":"u3","event":"Clicked","messageId":"m3"}"#
        )
        .0,
        200
    );

    // The 2-second window closes on the wall clock with no new events.
    h.wait_for("the click window to lapse", Duration::from_secs(20), |h| {
        h.size("clicked_recently") == 0
    });

    let (status, user) = h.get_json("/v1/users/a2");
    assert_eq!(status, 200);
    assert_eq!(user["traits"]["plan"], "pro");
    assert_eq!(user["segments"], serde_json::json!(["pro"]));
    assert_eq!(h.get_json("/v1/users/nobody").0, 404);

    let (status, page) = h.get_json("/v1/segments/big_spender/members?limit=10");
    assert_eq!(status, 200);
    assert_eq!(page["members"], serde_json::json!(["u4"]));
    assert_eq!(page["next_cursor"], Json::Null);
    assert_eq!(h.get_json("/v1/segments/nope/members").0, 404);

    let (status, health) = h.get_json("/healthz");
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    let (_, metrics) = h.get("/metrics");
    for needle in [
        "herald_events_in_total{source=\"http\"} 6",
        "herald_duplicates_total 1",
        "herald_segment_size{segment=\"pro\"} 1",
        "herald_segment_changes_total{segment=\"clicked_recently\",direction=\"leave\"} 2",
        "herald_frontier_delay_ms",
    ] {
        assert!(metrics.contains(needle), "{needle} not in\n{metrics}");
    }

    let status = h.stop();
    assert!(status.success(), "exit {status:?}\n{}", h.stderr_text());
    let changes = h.output("segment_changes.jsonl");
    let count = |seg: &str, diff: i64| {
        changes
            .iter()
            .filter(|c| c["segment"] == seg && c["diff"] == diff)
            .count()
    };
    assert_eq!(
        (count("clicked_recently", 1), count("clicked_recently", -1)),
        (2, 2)
    );
    assert_eq!((count("pro", 1), count("big_spender", 1)), (1, 1));
    // Each leave is exactly 2 s after its enter's event instant (the windows are exact).
    let time = |user: &str, diff: i64| {
        let c = changes
            .iter()
            .find(|c| {
                c["user_id"] == user && c["diff"] == diff && c["segment"] == "clicked_recently"
            })
            .unwrap();
        herald_operators::time::parse_rfc3339_ms(c["time"].as_str().unwrap()).unwrap()
    };
    let leave = time("u1", -1);
    assert!(leave - time("u1", 1) <= 2_000 && leave - time("u1", 1) > 1_900);
}

#[test]
fn bad_requests_get_reasons_and_dead_letters() {
    let (_dir, mut h) = start(1);
    // Wrong and missing keys.
    let (status, body) = h.post("/v1/track", "nope", r#"{"userId":"u","event":"e"}"#);
    assert_eq!(
        (status, body["reason"].as_str()),
        (401, Some("bad_write_key"))
    );
    let r = reqwest::blocking::Client::new()
        .post(format!("{}/v1/track", h.base))
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // Not JSON; a single message breaking a rule.
    let (status, body) = h.post("/v1/track", "wk", "{not json");
    assert_eq!(
        (status, body["rejected"][0]["reason"].as_str()),
        (400, Some("invalid_json"))
    );
    let (status, body) = h.post("/v1/track", "wk", r#"{"userId":"u"}"#);
    assert_eq!(
        (status, body["rejected"][0]["reason"].as_str()),
        (400, Some("missing_event"))
    );
    // A batch with one bad message accepts the others and names the bad one.
    let (status, body) = h.post(
        "/v1/batch",
        "wk",
        r#"{"batch":[{"type":"track","userId":"ok","event":"Clicked"},{"type":"track","event":"x"},{"type":"nope","userId":"v"}]}"#,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["accepted"], 1);
    let reasons: Vec<(i64, &str)> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["index"].as_i64().unwrap(), r["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(reasons, vec![(1, "missing_user"), (2, "bad_type")]);
    // Over the request limit (64 KiB here), before and after gzip.
    let big = format!(
        r#"{{"batch":[{}]}}"#,
        vec![r#"{"type":"track","userId":"u","event":"e","properties":{"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}"#; 1200].join(",")
    );
    assert_eq!(h.post("/v1/batch", "wk", &big).0, 413);
    assert_eq!(h.post_gzip("/v1/batch", "wk", &big).0, 413);
    // Corrupt gzip.
    let r = reqwest::blocking::Client::new()
        .post(format!("{}/v1/batch", h.base))
        .basic_auth("wk", Some(""))
        .header("content-encoding", "gzip")
        .body("definitely not gzip")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);

    h.wait_for("the good event", Duration::from_secs(20), |h| {
        h.size("clicked_recently") == 1
    });
    let (_, metrics) = h.get("/metrics");
    for needle in [
        "herald_dead_letters_total{reason=\"invalid_json\"} 1",
        "herald_dead_letters_total{reason=\"missing_user\"} 1",
        "herald_http_refused_total{reason=\"too_large\"} 2",
        "herald_http_refused_total{reason=\"bad_write_key\"} 1",
    ] {
        assert!(metrics.contains(needle), "{needle} not in\n{metrics}");
    }
    assert!(h.stop().success());
    let dead = h.output("dead_letters.jsonl");
    let reasons: Vec<&str> = dead.iter().map(|d| d["reason"].as_str().unwrap()).collect();
    assert_eq!(
        reasons,
        vec!["invalid_json", "missing_event", "missing_user", "bad_type"]
    );
    assert_eq!(dead[2]["batch_index"], 1);
    assert_eq!(dead[2]["source"], "http:/v1/batch");
    assert_eq!(dead[0]["raw"], "{not json");
}

#[test]
fn a_bad_config_names_the_key_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("segments.sql"), SEGMENTS).unwrap();
    let path = dir.path().join("herald.toml");
    for (text, needle) in [
        (
            "[engine]\nsegments = \"segments.sql\"\nworkerz = 2\n",
            "workerz",
        ),
        (
            "[engine]\nsegments = \"segments.sql\"\n[http]\nlisten = \"nowhere\"\n",
            "http.listen",
        ),
        ("[engine]\nsegments = \"missing.sql\"\n", "missing.sql"),
    ] {
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["run", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {stderr}");
        assert!(stderr.contains(needle), "{needle} not in {stderr}");
    }
}

/// Compatibility with clients nobody here wrote: the official Segment and RudderStack
/// Node server SDKs (from npm, installed by `scripts/services.sh`), pointed at Herald.
#[test]
#[ignore = "needs Node.js and the SDKs from npm: run scripts/test.sh"]
fn segment_and_rudderstack_node_sdks_feed_segments() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("segments.sql"),
        "CREATE SEGMENT clicked AS count(*) FILTER (WHERE event = 'Clicked') >= 1;\n\
         CREATE SEGMENT pro AS plan = 'pro';\n\
         CREATE SEGMENT saw_pricing AS count(*) FILTER (WHERE type = 'page' AND event = 'Pricing') >= 1;\n",
    )
    .unwrap();
    let mut h = Herald::start(dir.path(), &config(2));
    common::send_with_node_sdks(&h, "wk", None);
    h.wait_for(
        "both SDKs' users in segments",
        Duration::from_secs(30),
        |h| h.size("clicked") == 2 && h.size("pro") == 2 && h.size("saw_pricing") == 1,
    );
    let (_, user) = h.get_json("/v1/users/seg-user");
    assert_eq!(user["traits"]["email"], "seg@example.com");
    assert_eq!(user["segments"], serde_json::json!(["clicked", "pro"]));
    let (_, user) = h.get_json("/v1/users/rudder-user");
    assert_eq!(user["segments"], serde_json::json!(["clicked", "pro"]));
    assert!(
        h.dead_letters_is_empty(),
        "{:?}",
        h.output("dead_letters.jsonl")
    );
    assert!(h.stop().success());
}

fn snapshot_rows(
    rows: &[(&str, &str)],
) -> std::collections::BTreeMap<
    String,
    std::collections::BTreeMap<String, herald_operators::value::Value>,
> {
    rows.iter()
        .map(|(u, plan)| {
            (
                u.to_string(),
                [(
                    "plan".to_string(),
                    herald_operators::value::Value::Str((*plan).into()),
                )]
                .into_iter()
                .collect(),
            )
        })
        .collect()
}

/// New Parquet snapshots under the configured prefix are picked up on the refresh
/// schedule and applied as diffs; a multi-file snapshot only once its `_SUCCESS` marker
/// exists; identify events and snapshots follow "latest write wins".
fn snapshots_are_picked_up_from(prefix: &str, dir: &std::path::Path) {
    use herald_connectors::snapshot::write_snapshot;
    use herald_operators::value::Type;
    let schema = [("plan".to_string(), Type::Str)];
    let base = prefix.trim_end_matches('/');
    std::fs::write(
        dir.join("segments.sql"),
        "CREATE SEGMENT pro AS plan = 'pro';\n",
    )
    .unwrap();
    write_snapshot(
        &format!("{base}/2026-11-01.parquet"),
        &snapshot_rows(&[("p1", "pro"), ("p2", "free")]),
        &schema,
    )
    .unwrap();
    let config = format!(
        "{}[snapshots]\nprefix = \"{prefix}\"\nrefresh = \"0.2 seconds\"\n",
        config(2)
    );
    let mut h = Herald::start(dir, &config);
    h.wait_for("the first snapshot", Duration::from_secs(30), |h| {
        h.size("pro") == 1
    });
    // An identify after the snapshot wins over it.
    assert_eq!(
        h.post(
            "/v1/identify",
            "wk",
            r#"{"userId":"p2","traits":{"plan":"pro"}}"#
        )
        .0,
        200
    );
    h.wait_for("p2's identify", Duration::from_secs(30), |h| {
        h.size("pro") == 2
    });
    // A newer snapshot (written after the identify, so it is the later write) moves p1
    // out, p2 back to its warehouse value, and p3 in.
    std::thread::sleep(Duration::from_millis(20));
    write_snapshot(
        &format!("{base}/2026-11-02.parquet"),
        &snapshot_rows(&[("p1", "free"), ("p2", "free"), ("p3", "pro")]),
        &schema,
    )
    .unwrap();
    h.wait_for("the second snapshot", Duration::from_secs(30), |h| {
        let (_, page) = h.get_json("/v1/segments/pro/members");
        page["members"] == serde_json::json!(["p3"])
    });
    // A directory snapshot is not read before its _SUCCESS marker.
    write_snapshot(
        &format!("{base}/2026-11-03/part-0.parquet"),
        &snapshot_rows(&[("p4", "pro")]),
        &schema,
    )
    .unwrap();
    write_snapshot(
        &format!("{base}/2026-11-03/part-1.parquet"),
        &snapshot_rows(&[("p5", "pro")]),
        &schema,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(h.size("pro"), 1, "a snapshot without _SUCCESS was applied");
    herald_connectors::store::write_all(&format!("{base}/2026-11-03/_SUCCESS"), Vec::new())
        .unwrap();
    // p3 is gone with the snapshot that had it; p2, missing from the newest snapshot,
    // keeps its identify write (docs/segments.md, "Profile snapshots").
    h.wait_for("the directory snapshot", Duration::from_secs(30), |h| {
        let (_, page) = h.get_json("/v1/segments/pro/members");
        page["members"] == serde_json::json!(["p2", "p4", "p5"])
    });
    // The query API's traits agree with the segments: p2's identify stands, and the
    // cells of p1 and p3 left with the snapshot that had them.
    for user in ["p4", "p2"] {
        let (_, j) = h.get_json(&format!("/v1/users/{user}"));
        assert_eq!(j["traits"]["plan"], "pro", "{user}: {j}");
    }
    for user in ["p1", "p3"] {
        assert_eq!(h.get_json(&format!("/v1/users/{user}")).0, 404, "{user}");
    }
    let (_, metrics) = h.get("/metrics");
    assert!(
        metrics.contains("herald_snapshots_applied_total 3"),
        "{metrics}"
    );
    assert!(h.stop().success());
}

#[test]
fn snapshots_from_a_local_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("profiles");
    std::fs::create_dir_all(&prefix).unwrap();
    snapshots_are_picked_up_from(&format!("{}/", prefix.display()), dir.path());
}

#[test]
#[ignore = "needs a real S3-compatible server on 127.0.0.1: run scripts/test.sh"]
fn snapshots_from_a_real_s3_prefix() {
    let bucket = std::env::var("HERALD_TEST_S3_BUCKET").unwrap_or_else(|_| {
        panic!("HERALD_TEST_S3_BUCKET must be set: run `eval \"$(scripts/services.sh start)\"`")
    });
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("s3://{bucket}/live-{}/profiles/", std::process::id());
    snapshots_are_picked_up_from(&prefix, dir.path());
}

/// Two processes of one timely cluster (`[cluster]`): events sent to either process reach
/// the worker that owns their user; each process answers for its users; both stop on
/// SIGTERM.
#[test]
fn a_two_process_timely_cluster_shares_the_users() {
    let (_dirs, hs) = common::start_cluster(SEGMENTS, &config(1));
    for u in 0..40 {
        let target = &hs[u % 2];
        let (status, _) = target.post(
            "/v1/track",
            "wk",
            &format!(r#"{{"userId":"c{u}","event":"Clicked"}}"#),
        );
        assert_eq!(status, 200);
    }
    let sizes =
        |hs: &[Herald]| -> Vec<i64> { hs.iter().map(|h| h.size("clicked_recently")).collect() };
    hs[0].wait_for(
        "40 clickers across the cluster",
        Duration::from_secs(30),
        |_| sizes(&hs).iter().sum::<i64>() == 40,
    );
    let split = sizes(&hs);
    assert!(
        split.iter().all(|s| *s > 0),
        "both processes own users: {split:?}"
    );
    // Each user is answered by exactly one process.
    for u in 0..40 {
        let found: Vec<u16> = hs
            .iter()
            .map(|h| h.get_json(&format!("/v1/users/c{u}")).0)
            .collect();
        assert_eq!(
            found.iter().filter(|s| **s == 200).count(),
            1,
            "c{u}: {found:?}"
        );
    }
    // Stop both together.
    for (status, stderr) in common::stop_all(hs) {
        assert!(status.success(), "exit {status:?}\n{stderr}");
    }
}

/// An output that cannot be written stops the service with an error naming it, rather
/// than dropping changes silently.
#[test]
fn an_unwritable_output_stops_the_service_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("segments.sql"), SEGMENTS).unwrap();
    let out = dir.path().join("herald-out");
    std::fs::create_dir_all(&out).unwrap();
    // Writes to /dev/full fail with "No space left on device", even for root.
    std::os::unix::fs::symlink("/dev/full", out.join("segment_changes.jsonl")).unwrap();
    let mut h = Herald::start(dir.path(), &config(1));
    // With durable state the first checkpoint, at start, already finds the file
    // unwritable, so the service may be gone before this request.
    let _ = reqwest::blocking::Client::new()
        .post(format!("{}/v1/track", h.base))
        .basic_auth("wk", Some(""))
        .header("content-type", "application/json")
        .body(r#"{"userId":"u1","event":"Clicked"}"#)
        .send();
    let status = h.wait_exit(Duration::from_secs(60));
    assert!(!status.success());
    let stderr = h.stderr_text();
    assert!(
        stderr.contains("segment_changes.jsonl") || stderr.contains("No space left"),
        "{stderr}"
    );
}

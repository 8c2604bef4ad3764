//! `herald run` with journeys (embedded mode): the API trigger, exact timers on the wall
//! clock, exits during a wait, and the outputs.

mod common;

use std::time::{Duration, Instant};

use common::Herald;

const SEGMENTS: &str =
    "CREATE SEGMENT buyers AS count(*) FILTER (WHERE event = 'Order Completed') >= 1;\n";

const JOURNEYS: &str = r#"
journey: welcome
entry:
  api: true
  where: "properties.plan = 'pro'"
steps:
  - send: { channel: webhook, template: hello }
  - wait: 2 seconds
  - send: { channel: email, template: follow_up }
---
journey: nudge
entry: { event: Cart Viewed }
exit:
  - segment_entered: buyers
    goal: true
steps:
  - wait: 3 seconds
  - send: { channel: webhook, template: come_back }
"#;

fn start() -> (tempfile::TempDir, Herald) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("segments.sql"), SEGMENTS).unwrap();
    std::fs::write(dir.path().join("journeys.yaml"), JOURNEYS).unwrap();
    let config =
        "[engine]\nsegments = \"segments.sql\"\njourneys = \"journeys.yaml\"\nworkers = 2\n\
                  [http]\nlisten = \"127.0.0.1:0\"\nwrite_keys = [\"wk\"]\n";
    let h = Herald::start(dir.path(), config);
    (dir, h)
}

fn kinds(h: &Herald, user: &str) -> Vec<String> {
    h.output("journey_events.jsonl")
        .into_iter()
        .filter(|r| r["user_id"] == user)
        .map(|r| r["kind"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn api_triggers_timers_and_exits_run_on_the_wall_clock() {
    let (_dir, mut h) = start();
    h.post(
        "/v1/identify",
        "wk",
        r#"{"userId":"t1","traits":{"email":"t1@example.com"}}"#,
    );
    let sent = Instant::now();
    let (status, body) = h.post_admin(
        "/v1/journeys/welcome/trigger",
        r#"{"user_id":"t1","properties":{"plan":"pro"}}"#,
    );
    assert_eq!(status, 200, "{body}");
    h.wait_for("the first message action", Duration::from_secs(10), |h| {
        !h.output("messages.jsonl").is_empty()
    });
    eprintln!(
        "trigger -> first message action in the file: {:?}",
        sent.elapsed()
    );
    let first = &h.output("messages.jsonl")[0];
    assert_eq!(first["template"], "hello");
    assert_eq!(first["event"]["properties"]["plan"], "pro");

    // The 2 s timer fires on the wall clock with no new input.
    h.wait_for("the timer's message", Duration::from_secs(10), |h| {
        h.output("messages.jsonl").len() == 2
    });
    let msgs = h.output("messages.jsonl");
    let at = |m: &serde_json::Value| {
        herald_operators::time::parse_rfc3339_ms(m["time"].as_str().unwrap()).unwrap()
    };
    assert_eq!(at(&msgs[1]) - at(&msgs[0]), 2000, "{msgs:?}");
    assert_eq!(msgs[1]["address"], "t1@example.com");

    // Not entered: a where that is false; refused: unknown or non-API journeys, bad bodies.
    let (s, _) = h.post_admin(
        "/v1/journeys/welcome/trigger",
        r#"{"user_id":"t2","properties":{"plan":"free"}}"#,
    );
    assert_eq!(s, 200);
    assert_eq!(
        h.post_admin("/v1/journeys/nope/trigger", r#"{"user_id":"t2"}"#)
            .0,
        404
    );
    assert_eq!(
        h.post_admin("/v1/journeys/nudge/trigger", r#"{"user_id":"t2"}"#)
            .0,
        409
    );
    assert_eq!(
        h.post_admin("/v1/journeys/welcome/trigger", r#"{"properties":{}}"#)
            .0,
        400
    );
    // A write key cannot trigger a journey (an admin action, on the admin listener).
    assert_eq!(
        h.post("/v1/journeys/welcome/trigger", "wk", r#"{"user_id":"t2"}"#)
            .0,
        404
    );

    // An exit during a wait cancels the timer: n1 converts, n2 gets the nudge.
    for u in ["n1", "n2"] {
        h.post(
            "/v1/track",
            "wk",
            &format!(r#"{{"userId":"{u}","event":"Cart Viewed"}}"#),
        );
    }
    h.post(
        "/v1/track",
        "wk",
        r#"{"userId":"n1","event":"Order Completed"}"#,
    );
    h.wait_for("n2's nudge", Duration::from_secs(15), |h| {
        kinds(h, "n2").contains(&"completed".to_string())
    });
    assert_eq!(kinds(&h, "n1"), ["entered", "step", "converted", "exited"]);
    assert!(kinds(&h, "t2").is_empty(), "{:?}", kinds(&h, "t2"));
    let (_, metrics) = h.get("/metrics");
    assert!(
        metrics.contains("herald_journey_events_total{journey=\"nudge\",kind=\"converted\"} 1"),
        "{metrics}"
    );
    assert!(h.stop().success());
}

/// Journeys with checkpoints every second.
const DURABLE: &str =
    "[engine]\nsegments = \"segments.sql\"\njourneys = \"journeys.yaml\"\nworkers = 2\n\
     [http]\nlisten = \"127.0.0.1:0\"\nwrite_keys = [\"wk\"]\n\
     [checkpoint]\nevery = \"1 second\"\n";

fn start_durable(journeys: &str) -> (tempfile::TempDir, Herald) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("segments.sql"), SEGMENTS).unwrap();
    std::fs::write(dir.path().join("journeys.yaml"), journeys).unwrap();
    let h = Herald::start(dir.path(), DURABLE);
    (dir, h)
}

fn track(h: &Herald, user: &str, event: &str) {
    let (s, b) = h.post(
        "/v1/track",
        "wk",
        &format!(r#"{{"userId":"{user}","event":"{event}"}}"#),
    );
    assert_eq!(s, 200, "{b}");
}

const DRIP: &str = r#"
journey: drip
entry: { event: Signed Up }
exit:
  - event: Unsubscribed
steps:
  - wait: 2 seconds
  - send: { channel: webhook, template: drip }
"#;

fn ms(t: &serde_json::Value) -> i64 {
    herald_operators::time::parse_rfc3339_ms(t.as_str().unwrap()).unwrap()
}

#[test]
fn a_paused_journey_admits_no_one_holds_its_instances_and_resumes_after_a_kill() {
    let (dir, mut h) = start_durable(DRIP);
    for u in ["a1", "a2"] {
        track(&h, u, "Signed Up");
    }
    h.wait_for("both entered", Duration::from_secs(10), |h| {
        kinds(h, "a1") == ["entered", "step"] && kinds(h, "a2") == ["entered", "step"]
    });

    // Paused: no entries, the timer passes a1 by, an exit still ends a2's instance.
    let (s, paused) = h.request("POST", "/v1/journeys/drip/pause", common::ADMIN_KEY, "");
    assert_eq!(s, 200, "{paused}");
    assert_eq!(paused["paused"], true);
    let paused_at = ms(&paused["effective_at"]);
    let (s, again) = h.request("POST", "/v1/journeys/drip/pause", common::ADMIN_KEY, "");
    assert_eq!((s, &again["unchanged"]), (200, &serde_json::json!(true)));
    let (s, list) = h.get_json("/v1/journeys");
    assert_eq!(s, 200);
    assert_eq!(list["journeys"][0]["name"], "drip");
    assert_eq!(list["journeys"][0]["paused"], true);
    track(&h, "b1", "Signed Up");
    track(&h, "a2", "Unsubscribed");
    h.wait_for("a2's exit", Duration::from_secs(10), |h| {
        kinds(h, "a2").last().map(String::as_str) == Some("exited")
    });
    // Past a1's 2 s wait, a checkpoint after it, then kill -9.
    std::thread::sleep(Duration::from_secs(3));
    assert!(h.output("messages.jsonl").is_empty());
    h.kill();

    let mut h = Herald::start(dir.path(), DURABLE);
    h.wait_for("the restart", Duration::from_secs(30), |h| {
        h.get_json("/v1/journeys").0 == 200
    });
    let (_, list) = h.get_json("/v1/journeys");
    assert_eq!(list["journeys"][0]["paused"], true, "{list}");
    let (_, status) = h.get_json("/v1/users/a1/journeys");
    assert_eq!(
        status["journeys"][0]["active"]["step"], "steps[0]",
        "{status}"
    );
    assert_eq!(status["journeys"][0]["paused"], true, "{status}");
    std::thread::sleep(Duration::from_secs(1));
    assert!(h.output("messages.jsonl").is_empty());
    // Refused: an unknown journey, and a read key.
    assert_eq!(
        h.request("POST", "/v1/journeys/nope/pause", common::ADMIN_KEY, "")
            .0,
        404
    );
    assert_eq!(
        h.request("POST", "/v1/journeys/drip/resume", common::READ_KEY, "")
            .0,
        401
    );

    // Resumed: a1's overdue wait ends at the resume's instant.
    let (s, resumed) = h.request("POST", "/v1/journeys/drip/resume", common::ADMIN_KEY, "");
    assert_eq!(s, 200, "{resumed}");
    let resumed_at = ms(&resumed["effective_at"]);
    assert!(resumed_at > paused_at + 2000);
    h.wait_for("a1's message", Duration::from_secs(10), |h| {
        h.output("messages.jsonl").len() == 1
    });
    let m = &h.output("messages.jsonl")[0];
    assert_eq!(
        (m["user_id"].as_str(), m["template"].as_str()),
        (Some("a1"), Some("drip"))
    );
    assert_eq!(ms(&m["time"]), resumed_at, "{m}");
    // b1, who came during the pause, never entered; b2, after it, does.
    track(&h, "b2", "Signed Up");
    h.wait_for("b2's entry", Duration::from_secs(10), |h| {
        kinds(h, "b2").first().map(String::as_str) == Some("entered")
    });
    assert!(kinds(&h, "b1").is_empty(), "{:?}", kinds(&h, "b1"));
    assert_eq!(kinds(&h, "a2"), ["entered", "step", "exited"]);
    assert!(h.stop().success());
}

/// A journey's version `n`: wait `secs`, then send template `drip{n}`.
fn drip(n: u32, secs: u32) -> String {
    format!(
        "journey: drip\nentry: {{ event: Signed Up }}\nexit:\n  - event: Unsubscribed\n\
         steps:\n  - wait: {secs} seconds\n  - send: {{ channel: webhook, template: drip{n} }}\n"
    )
}

/// `(user, template, time)` of every message.
fn messages(h: &Herald) -> Vec<(String, String, i64)> {
    h.output("messages.jsonl")
        .iter()
        .map(|m| {
            (
                m["user_id"].as_str().unwrap().to_string(),
                m["template"].as_str().unwrap().to_string(),
                ms(&m["time"]),
            )
        })
        .collect()
}

/// The processing instant of `user`'s latest `kind` row.
fn row_at(h: &Herald, user: &str, kind: &str) -> i64 {
    h.output("journey_events.jsonl")
        .iter()
        .filter(|r| r["user_id"] == user && r["kind"] == kind)
        .map(|r| ms(&r["time"]))
        .next_back()
        .unwrap()
}

#[test]
fn journey_versions_drain_or_restart_their_instances_and_survive_a_kill() {
    let (dir, mut h) = start_durable(&drip(1, 3));
    let put = |h: &Herald, path: &str, yaml: &str| h.request("PUT", path, common::ADMIN_KEY, yaml);
    track(&h, "d1", "Signed Up");
    h.wait_for("d1 entered", Duration::from_secs(10), |h| {
        kinds(h, "d1") == ["entered", "step"]
    });

    // Refused, with what is wrong: bad YAML, another name, what the running journeys do
    // not read, a read key.
    let (s, e) = put(&h, "/v1/journeys/drip", "journey: [unclosed");
    assert_eq!(s, 400, "{e}");
    assert!(e["path"].as_str().unwrap().contains("line"), "{e}");
    let (s, e) = put(
        &h,
        "/v1/journeys/drip",
        &drip(2, 1).replace("drip\n", "other\n"),
    );
    assert_eq!(s, 400, "{e}");
    let (s, e) = put(
        &h,
        "/v1/journeys/drip",
        &format!(
            "{}  - wait_until: {{ event: Never Seen, timeout: 1 hour }}\n",
            drip(2, 1)
        ),
    );
    assert_eq!(s, 422, "{e}");
    assert!(
        e["not_maintained"][0]
            .as_str()
            .unwrap()
            .contains("Never Seen"),
        "{e}"
    );
    assert_eq!(
        h.request("PUT", "/v1/journeys/drip", common::READ_KEY, &drip(2, 1))
            .0,
        401
    );

    // Version 2, drained: d1 finishes on version 1 (3 s), d2 enters version 2 (4 s).
    let (s, v2) = put(&h, "/v1/journeys/drip", &drip(2, 4));
    assert_eq!(s, 200, "{v2}");
    assert_eq!(
        (v2["version"].as_u64(), v2["migrate"].as_str()),
        (Some(2), Some("drain"))
    );
    let (_, same) = put(&h, "/v1/journeys/drip", &drip(2, 4));
    assert_eq!(same["unchanged"], true, "{same}");
    track(&h, "d2", "Signed Up");
    h.wait_for("both messages", Duration::from_secs(15), |h| {
        messages(h).len() == 2
    });
    let m = messages(&h);
    let d1 = m.iter().find(|x| x.0 == "d1").unwrap();
    let d2 = m.iter().find(|x| x.0 == "d2").unwrap();
    assert_eq!(
        (d1.1.as_str(), d1.2),
        ("drip1", row_at(&h, "d1", "entered") + 3000)
    );
    assert_eq!(
        (d2.1.as_str(), d2.2),
        ("drip2", row_at(&h, "d2", "entered") + 4000)
    );
    let (_, status) = h.get_json("/v1/users/d2/journeys");
    assert_eq!(status["journeys"][0]["entries"], 1, "{status}");

    // Version 3 with ?migrate=restart: d3, waiting on version 2, restarts on version 3.
    track(&h, "d3", "Signed Up");
    h.wait_for("d3 entered", Duration::from_secs(10), |h| {
        kinds(h, "d3") == ["entered", "step"]
    });
    // A checkpoint (every second) holds d3 waiting.
    std::thread::sleep(Duration::from_millis(1500));
    let (s, v3) = put(&h, "/v1/journeys/drip?migrate=restart", &drip(3, 2));
    assert_eq!(s, 200, "{v3}");
    let v3_at = ms(&v3["effective_at"]);
    assert_eq!(
        kinds(&h, "d3"),
        ["entered", "step", "exited", "entered", "step"]
    );
    assert_eq!(row_at(&h, "d3", "exited"), v3_at);
    let (_, status) = h.get_json("/v1/users/d3/journeys");
    assert_eq!(status["journeys"][0]["version"], 3, "{status}");
    // A kill -9 before its timer; the version and the instance come back.
    h.kill();
    let mut h = Herald::start(dir.path(), DURABLE);
    h.wait_for("d3's message", Duration::from_secs(30), |h| {
        messages(h).iter().any(|m| m.0 == "d3")
    });
    // Made after the last checkpoint, the change took effect again at its instant (at
    // or before the first time): the restart happened there.
    let restarted = row_at(&h, "d3", "exited");
    assert!(restarted <= v3_at, "{restarted} {v3_at}");
    assert_eq!(
        kinds(&h, "d3"),
        [
            "entered",
            "step",
            "exited",
            "entered",
            "step",
            "step",
            "sent",
            "completed"
        ]
    );
    let d3: Vec<_> = messages(&h).into_iter().filter(|m| m.0 == "d3").collect();
    assert_eq!(
        d3,
        [("d3".to_string(), "drip3".to_string(), restarted + 2000)]
    );
    let (_, j) = h.get_json("/v1/journeys/drip");
    assert_eq!(j["version"], 3, "{j}");
    let versions: Vec<(u64, &str)> = j["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_u64().unwrap(),
                v["migrate"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(versions, [(1, "drain"), (2, "drain"), (3, "restart")]);
    assert_eq!(j["definition"].as_str().unwrap(), drip(3, 2).trim());
    // New entries run version 3.
    track(&h, "d4", "Signed Up");
    h.wait_for("d4's message", Duration::from_secs(15), |h| {
        messages(h).iter().any(|m| m.0 == "d4")
    });
    assert_eq!(messages(&h).iter().filter(|m| m.1 == "drip3").count(), 2);
    assert!(h.stop().success());
}

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
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("segments.sql"), SEGMENTS).unwrap();
    std::fs::write(dir.path().join("journeys.yaml"), DRIP).unwrap();
    let config =
        "[engine]\nsegments = \"segments.sql\"\njourneys = \"journeys.yaml\"\nworkers = 2\n\
         [http]\nlisten = \"127.0.0.1:0\"\nwrite_keys = [\"wk\"]\n\
         [checkpoint]\nevery = \"1 second\"\n";
    let mut h = Herald::start(dir.path(), config);
    let track = |h: &Herald, user: &str, event: &str| {
        let (s, b) = h.post(
            "/v1/track",
            "wk",
            &format!(r#"{{"userId":"{user}","event":"{event}"}}"#),
        );
        assert_eq!(s, 200, "{b}");
    };
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

    let mut h = Herald::start(dir.path(), config);
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

//! Live definitions against the real binary: segments previewed, created, replaced and
//! deleted on a running Herald over a history of events, with a graceful restart and a
//! `kill -9` in between; a segment added live has exactly the members a replay of the
//! same events with it from the start gives; explain on each kind of aggregate, on NULL
//! logic and on `in_segment`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use common::{Herald, ADMIN_KEY, READ_KEY};
use herald_operators::time::format_rfc3339_ms;
use serde_json::{json, Value as Json};

const SEGMENTS: &str = "\
CREATE SEGMENT buyers AS count(*) FILTER (WHERE event = 'Order Completed') >= 1;
CREATE SEGMENT spend AS
    coalesce(sum(properties.revenue) FILTER (WHERE event = 'Order Completed'), 0) >= 100;
CREATE SEGMENT pro AS plan = 'pro';
CREATE SEGMENT clicked AS
    count(*) FILTER (WHERE event = 'Clicked' AND timestamp > now() - INTERVAL '1 hour') >= 1;
CREATE SEGMENT last_order AS max(timestamp) FILTER (WHERE event = 'Order Completed') > TIMESTAMP '2000-01-01T00:00:00Z';
";

const USERS: usize = 200;

fn config() -> String {
    "[engine]\nsegments = \"segments.sql\"\nworkers = 2\n\
     [http]\nlisten = \"127.0.0.1:0\"\nwrite_keys = [\"wk\"]\nmax_batch_bytes = 4194304\n\
     [checkpoint]\nevery = \"1 second\"\n"
        .to_string()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// User `i`'s orders (count, revenue each) and plan.
fn user(i: usize) -> (usize, f64, &'static str) {
    (
        i % 4,
        40.0 + (i % 5) as f64 * 10.0,
        if i.is_multiple_of(3) { "pro" } else { "free" },
    )
}

/// The events: a day ago, orders and an identify per user; even users clicked half an
/// hour ago.
fn events(now: i64) -> Vec<Json> {
    let mut out = Vec::new();
    for i in 0..USERS {
        let id = format!("u{i:03}");
        let (orders, revenue, plan) = user(i);
        let ts = |ms: i64| format_rfc3339_ms(ms);
        out.push(
            json!({"type": "identify", "userId": id, "messageId": format!("{id}-id"),
            "timestamp": ts(now - 86_400_000), "traits": {"plan": plan}}),
        );
        for k in 0..orders {
            out.push(
                json!({"type": "track", "event": "Order Completed", "userId": id,
                "messageId": format!("{id}-o{k}"), "timestamp": ts(now - 80_000_000 + k as i64),
                "properties": {"revenue": revenue}}),
            );
        }
        if i.is_multiple_of(2) {
            out.push(json!({"type": "track", "event": "Clicked", "userId": id,
                "messageId": format!("{id}-c"), "timestamp": ts(now - 1_800_000)}));
        }
    }
    out
}

fn expected(f: impl Fn(usize, f64, &str) -> bool) -> BTreeSet<String> {
    (0..USERS)
        .filter(|&i| {
            let (n, r, p) = user(i);
            f(n, n as f64 * r, p)
        })
        .map(|i| format!("u{i:03}"))
        .collect()
}

fn put(h: &Herald, name: &str, text: &str) -> (u16, Json) {
    h.request("PUT", &format!("/v1/segments/{name}"), ADMIN_KEY, text)
}

fn preview(h: &Herald, text: &str) -> (u16, Json) {
    h.request("POST", "/v1/segments/preview", READ_KEY, text)
}

fn strings(j: &Json) -> BTreeSet<String> {
    j.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

fn names(h: &Herald) -> BTreeMap<String, i64> {
    let (_, j) = h.get_json("/v1/segments");
    j["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["version"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// `segment_changes.jsonl` holds no row twice, and its running sum is the members.
fn changelog_agrees(h: &Herald, segment: &str, members: &BTreeSet<String>) {
    let rows = h.output("segment_changes.jsonl");
    let mut seen = BTreeSet::new();
    for r in &rows {
        assert!(seen.insert(r.to_string()), "a duplicate row {r}");
    }
    let mut sum: BTreeMap<String, i64> = BTreeMap::new();
    for r in rows.iter().filter(|r| r["segment"] == segment) {
        *sum.entry(r["user_id"].as_str().unwrap().to_string())
            .or_default() += r["diff"].as_i64().unwrap();
    }
    let from_log: BTreeSet<String> = sum
        .into_iter()
        .filter(|(_, n)| *n == 1)
        .map(|(u, _)| u)
        .collect();
    assert_eq!(&from_log, members, "the changelog of {segment}");
}

#[test]
fn segments_change_on_a_running_herald_and_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("segments.sql"), SEGMENTS).unwrap();
    let mut h = Herald::start(dir.path(), &config());
    let now = now_ms();
    let evs = events(now);
    for chunk in evs.chunks(500) {
        let body = json!({ "batch": chunk }).to_string();
        assert_eq!(h.post("/v1/batch", "wk", &body).0, 200);
    }
    let buyers = expected(|n, _, _| n >= 1);
    let pro = expected(|_, _, p| p == "pro");
    h.wait_for("the history applied", Duration::from_secs(30), |h| {
        h.size("buyers") == buyers.len() as i64 && h.size("pro") == pro.len() as i64
    });

    // Bad statements are refused as `herald check` refuses them.
    let (s, e) = put(&h, "big", "CREATE SEGMENT big AS\n  count(*) >>= 1;");
    assert_eq!(s, 400, "{e}");
    assert_eq!(e["line"], 2, "{e}");
    assert!(
        e["column"].as_u64().unwrap() > 0 && e["message"].is_string(),
        "{e}"
    );
    let (s, e) = put(&h, "big", "CREATE SEGMENT big AS count(*) >= 1;");
    assert_eq!(s, 422, "{e}");
    assert!(
        e["not_maintained"][0]
            .as_str()
            .unwrap()
            .contains("count(*)"),
        "{e}"
    );
    let (s, e) = put(&h, "big", "CREATE SEGMENT big AS in_segment('nope');");
    assert_eq!(
        (s, e["message"].as_str().unwrap().contains("nope")),
        (400, true),
        "{e}"
    );
    // A read key sees but does not change.
    assert_eq!(
        h.request(
            "PUT",
            "/v1/segments/big",
            READ_KEY,
            "CREATE SEGMENT big AS plan = 'x';"
        )
        .0,
        401
    );

    // A new segment over maintained aggregates and traits: preview, then apply.
    let big = "CREATE SEGMENT big AS\n  coalesce(sum(properties.revenue) FILTER (WHERE event = 'Order Completed'), 0) >= 150\n  AND plan = 'pro';";
    let want_big = expected(|_, sum, p| sum >= 150.0 && p == "pro");
    let (s, p) = preview(&h, big);
    assert_eq!(s, 200, "{p}");
    assert_eq!(
        (
            p["size"].as_u64(),
            p["entering"].as_u64(),
            p["leaving"].as_u64()
        ),
        (
            Some(want_big.len() as u64),
            Some(want_big.len() as u64),
            Some(0)
        ),
        "{p}"
    );
    assert_eq!(
        strings(&p["sample_entering"]),
        want_big.iter().take(10).cloned().collect(),
        "the smallest ids"
    );
    assert!(
        p["plan"]["aggregates"][0]["shared_with"]
            .as_array()
            .unwrap()
            .contains(&json!("spend")),
        "{p}"
    );
    let (s, r) = put(&h, "big", big);
    assert_eq!(s, 201, "{r}");
    assert_eq!(
        (r["version"].as_i64(), r["size"].as_u64()),
        (Some(1), Some(want_big.len() as u64)),
        "{r}"
    );
    assert_eq!(h.members("big"), want_big);
    let (s, g) = h.get_json("/v1/segments/big");
    assert_eq!(
        (s, g["source"].as_str(), g["version"].as_i64()),
        (200, Some("api"), Some(1)),
        "{g}"
    );

    // A replacement: the previewed diff is the applied one.
    let before = h.members("spend");
    let spend2 = "CREATE SEGMENT spend AS coalesce(sum(properties.revenue) FILTER (WHERE event = 'Order Completed'), 0) >= 60";
    let (_, p) = preview(&h, spend2);
    let (s, r) = put(&h, "spend", spend2);
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["version"], 2);
    let after = h.members("spend");
    assert_eq!(after, expected(|_, sum, _| sum >= 60.0));
    let entered: BTreeSet<String> = after.difference(&before).cloned().collect();
    let left: BTreeSet<String> = before.difference(&after).cloned().collect();
    assert_eq!(
        (
            p["entering"].as_u64(),
            p["leaving"].as_u64(),
            p["size"].as_u64()
        ),
        (
            Some(entered.len() as u64),
            Some(left.len() as u64),
            Some(after.len() as u64)
        ),
        "{p}"
    );
    assert!(strings(&p["sample_entering"]).is_subset(&entered));
    // Unchanged text: no new version.
    let (s, r) = put(&h, "spend", spend2);
    assert_eq!((s, r["unchanged"].as_bool()), (200, Some(true)), "{r}");

    // A segment others read cannot go; one nobody reads can.
    let (s, r) = put(
        &h,
        "pro_buyers",
        "CREATE SEGMENT pro_buyers AS in_segment('pro') AND in_segment('buyers');",
    );
    assert_eq!(s, 201, "{r}");
    assert_eq!(
        h.members("pro_buyers"),
        buyers.intersection(&pro).cloned().collect()
    );
    let (s, r) = h.request("DELETE", "/v1/segments/pro", ADMIN_KEY, "");
    assert_eq!(s, 409, "{r}");
    assert!(r["error"].as_str().unwrap().contains("pro_buyers"), "{r}");
    let (s, r) = h.request("DELETE", "/v1/segments/last_order", ADMIN_KEY, "");
    assert_eq!((s, r["deleted"].as_bool()), (200, Some(true)), "{r}");
    assert_eq!(h.get_json("/v1/segments/last_order").0, 404);
    assert!(!names(&h).contains_key("last_order"));
    h.wait_for(
        "the deletion in the changelog",
        Duration::from_secs(20),
        |h| {
            let rows = h.output("segment_changes.jsonl");
            rows.iter()
                .filter(|r| r["segment"] == "last_order" && r["diff"] == -1)
                .count()
                == buyers.len()
        },
    );

    // Explain on the live state.
    let (s, x) = h.get_json("/v1/users/u003/explain?segment=big");
    assert_eq!(s, 200, "{x}");
    // u003: 3 orders of 70, plan pro.
    assert_eq!(
        (x["member"].as_bool(), x["in_universe"].as_bool()),
        (Some(true), Some(true)),
        "{x}"
    );
    assert_eq!(x["aggregates"][0]["value"], json!(210.0), "{x}");
    assert_eq!(
        x["traits"][0],
        json!({"name": "plan", "value": "pro"}),
        "{x}"
    );
    assert_eq!(x["next_change"], Json::Null, "{x}");

    let want = |h: &Herald| {
        (
            names(h),
            h.members("big"),
            h.members("spend"),
            h.members("pro_buyers"),
        )
    };
    let before_restart = want(&h);
    assert_eq!(
        before_restart.0.keys().cloned().collect::<Vec<_>>(),
        ["big", "buyers", "clicked", "pro", "pro_buyers", "spend"]
    );

    // A graceful restart: the definitions and their memberships come back.
    assert!(h.stop().success(), "{}", h.stderr_text());
    let mut h = Herald::start(dir.path(), &config());
    h.wait_for("the restart", Duration::from_secs(30), |h| {
        names(h).contains_key("big")
    });
    assert_eq!(want(&h), before_restart);
    // kill -9 after one more change: it is applied again at the restart.
    let (s, r) = put(&h, "big", "CREATE SEGMENT big AS coalesce(sum(properties.revenue) FILTER (WHERE event = 'Order Completed'), 0) >= 200;");
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["version"], 2);
    let want_big = expected(|_, sum, _| sum >= 200.0);
    assert_eq!(h.members("big"), want_big);
    h.kill();
    let h = Herald::start(dir.path(), &config());
    h.wait_for("the restart", Duration::from_secs(30), |h| {
        names(h).contains_key("big")
    });
    h.wait_for("big restored", Duration::from_secs(30), |h| {
        h.members("big") == want_big
    });
    assert_eq!(names(&h)["big"], 2);
    let (_, g) = h.get_json("/v1/segments/big");
    assert_eq!(g["versions"].as_array().unwrap().len(), 2, "{g}");
    // Each change of a segment changed through the API says which version produced it
    // (no field: the segment file's, version 1).
    let (_, g) = h.get_json("/v1/segments/spend");
    let v2_at = g["versions"][1]["effective_at"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(g["versions"][1]["version"], 2, "{g}");
    let rows = h.output("segment_changes.jsonl");
    for r in &rows {
        let (seg, t) = (r["segment"].as_str().unwrap(), r["time"].as_str().unwrap());
        match seg {
            // Written before the change, when it was the file's version 1: no field.
            "spend" if t < v2_at.as_str() => {
                assert!(r.get("version").is_none() || r["version"] == 1, "{r}")
            }
            "spend" => assert_eq!(r["version"], 2, "{r}"),
            "big" | "pro_buyers" => assert!(r["version"].is_u64(), "{r}"),
            // Its deletion is version 2: the leaves say so.
            "last_order" if r["diff"] == -1 => assert_eq!(r["version"], 2, "{r}"),
            "last_order" => assert!(r.get("version").is_none(), "{r}"),
            _ => assert!(r.get("version").is_none(), "a file segment's row: {r}"),
        }
    }
    assert!(rows
        .iter()
        .any(|r| r["segment"] == "big" && r["version"] == 2));
    changelog_agrees(&h, "big", &want_big);
    changelog_agrees(&h, "spend", &expected(|_, sum, _| sum >= 60.0));
    changelog_agrees(&h, "last_order", &BTreeSet::new());

    // A replay of the same events with the live definitions from the start gives the same
    // members.
    let events_file = dir.path().join("events.jsonl");
    let lines: String = evs.iter().map(|e| format!("{e}\n")).collect();
    std::fs::write(&events_file, lines).unwrap();
    let final_sql = "CREATE SEGMENT big AS coalesce(sum(properties.revenue) FILTER (WHERE event = 'Order Completed'), 0) >= 200;\n\
        CREATE SEGMENT spend AS coalesce(sum(properties.revenue) FILTER (WHERE event = 'Order Completed'), 0) >= 60;\n\
        CREATE SEGMENT pro AS plan = 'pro';\n\
        CREATE SEGMENT buyers AS count(*) FILTER (WHERE event = 'Order Completed') >= 1;\n\
        CREATE SEGMENT pro_buyers AS in_segment('pro') AND in_segment('buyers');\n";
    std::fs::write(dir.path().join("final.sql"), final_sql).unwrap();
    let out = dir.path().join("replay-out");
    let status = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["replay", "--segments"])
        .arg(dir.path().join("final.sql"))
        .arg("--events")
        .arg(&events_file)
        .args(["--until", &format_rfc3339_ms(now_ms())])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let rows: Vec<Json> = std::fs::read_to_string(out.join("segment_changes.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for seg in ["big", "spend", "pro_buyers"] {
        let mut sum: BTreeMap<&str, i64> = BTreeMap::new();
        for r in rows.iter().filter(|r| r["segment"] == seg) {
            *sum.entry(r["user_id"].as_str().unwrap()).or_default() += r["diff"].as_i64().unwrap();
        }
        let replayed: BTreeSet<String> = sum
            .into_iter()
            .filter(|(_, n)| *n == 1)
            .map(|(u, _)| u.to_string())
            .collect();
        assert_eq!(replayed, h.members(seg), "{seg}: replay and live");
    }
    // `herald explain` answers from the files what the live API answers from the state.
    let at = format_rfc3339_ms(now_ms() + 60_000);
    for (user, seg) in [("u003", "big"), ("u001", "pro_buyers"), ("u000", "spend")] {
        let out = Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["explain", "--segments"])
            .arg(dir.path().join("final.sql"))
            .arg("--events")
            .arg(&events_file)
            .args(["--user", user, "--segment", seg, "--at", &at])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let offline: Json = serde_json::from_slice(&out.stdout).unwrap();
        let (s, live) = h.get_json(&format!("/v1/users/{user}/explain?segment={seg}&at={at}"));
        assert_eq!(s, 200, "{live}");
        assert_eq!(offline, live, "{user} in {seg}");
    }
}

#[test]
fn explain_shows_values_clauses_null_logic_and_the_next_lapse() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("segments.sql"), SEGMENTS).unwrap();
    let h = Herald::start(dir.path(), &config());
    let now = now_ms();
    let evs = events(now);
    let body = json!({ "batch": evs }).to_string();
    assert_eq!(h.post("/v1/batch", "wk", &body).0, 200);
    let clicked = (0..USERS).filter(|i| i.is_multiple_of(2)).count() as i64;
    h.wait_for("the history applied", Duration::from_secs(30), |h| {
        h.size("clicked") == clicked
    });

    // A windowed count: the click lapses an hour after its instant.
    let (s, x) = h.get_json("/v1/users/u002/explain?segment=clicked");
    assert_eq!(s, 200, "{x}");
    assert_eq!(x["member"], true, "{x}");
    assert_eq!(x["aggregates"][0]["value"], json!(1.0), "{x}");
    assert_eq!(
        x["next_change"],
        json!({"at": format_rfc3339_ms(now - 1_800_000 + 3_600_000), "member": false}),
        "{x}"
    );
    // Asked about an instant after it: not a member, nothing more changes.
    let later = format_rfc3339_ms(now + 3 * 3_600_000);
    let (s, y) = h.get_json(&format!(
        "/v1/users/u002/explain?segment=clicked&at={later}"
    ));
    assert_eq!(
        (s, y["member"].as_bool(), y["next_change"].clone()),
        (200, Some(false), Json::Null),
        "{y}"
    );
    assert_eq!(y["aggregates"][0]["value"], json!(0.0), "{y}");
    // The past is not in the live state.
    let past = format_rfc3339_ms(now - 86_400_000);
    let (s, z) = h.get_json(&format!("/v1/users/u002/explain?segment=clicked&at={past}"));
    assert_eq!(s, 422, "{z}");

    // max(timestamp) over orders; a user without any is NULL, and NULL > t is unknown.
    let (_, x) = h.get_json("/v1/users/u004/explain?segment=last_order");
    assert_eq!(x["member"], false, "{x}");
    assert_eq!(x["aggregates"][0]["value"], Json::Null, "{x}");
    assert_eq!(x["clauses"]["value"], Json::Null, "{x}");
    let (_, x) = h.get_json("/v1/users/u001/explain?segment=last_order");
    assert_eq!(x["member"], true, "{x}");
    assert!(x["aggregates"][0]["value"].is_string(), "a timestamp: {x}");

    // NULL logic in AND and OR, and in_segment, on a segment added live.
    let (s, r) = put(
        &h,
        "mixed",
        "CREATE SEGMENT mixed AS in_segment('buyers') AND (plan = 'pro' OR count(*) FILTER (WHERE event = 'Order Completed') >= 3);",
    );
    assert_eq!(s, 201, "{r}");
    // u004 has no orders: buyers is false and decides.
    let (_, x) = h.get_json("/v1/users/u004/explain?segment=mixed");
    assert_eq!(x["member"], false);
    assert_eq!(x["clauses"]["op"], "and", "{x}");
    assert_eq!(x["decided_by"], "in_segment('buyers')", "{x}");
    assert_eq!(
        x["segments"][0],
        json!({"name": "buyers", "value": false}),
        "{x}"
    );
    // u003: a buyer, pro: the OR holds by its first operand.
    let (_, x) = h.get_json("/v1/users/u003/explain?segment=mixed");
    assert_eq!(x["member"], true, "{x}");
    let or = &x["clauses"]["children"][1];
    assert_eq!(
        (or["op"].as_str(), or["value"].as_bool()),
        (Some("or"), Some(true)),
        "{x}"
    );
    assert_eq!(or["children"][0]["value"], true, "{x}");
    // Unknown user: outside the universe.
    let (s, x) = h.get_json("/v1/users/nobody/explain?segment=mixed");
    assert_eq!(
        (s, x["known"].as_bool(), x["in_universe"].as_bool()),
        (200, Some(false), Some(false)),
        "{x}"
    );
    assert_eq!(h.get_json("/v1/users/u001/explain?segment=nope").0, 404);
    assert_eq!(h.get_json("/v1/users/u001/explain").0, 400);
}

#[test]
fn journeys_explained_and_definitions_under_journeys() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("segments.sql"), SEGMENTS).unwrap();
    let journeys = "journey: nudge\nentry: { event: Cart Viewed }\nexit:\n  - segment_entered: buyers\n    goal: true\n\
        steps:\n  - send: { channel: email, template: hi }\n  - wait: 1 hour\n  - send: { channel: webhook, template: later }\n";
    std::fs::write(dir.path().join("journeys.yaml"), journeys).unwrap();
    let config = config().replace(
        "segments = \"segments.sql\"\n",
        "segments = \"segments.sql\"\njourneys = \"journeys.yaml\"\n",
    );
    let h = Herald::start(dir.path(), &config);
    assert_eq!(
        h.post(
            "/v1/track",
            "wk",
            r#"{"userId":"j1","event":"Cart Viewed"}"#
        )
        .0,
        200
    );
    h.wait_for("the suppressed send", Duration::from_secs(20), |h| {
        h.output("journey_events.jsonl")
            .iter()
            .any(|r| r["kind"] == "suppressed")
    });
    let (s, j) = h.get_json("/v1/users/j1/journeys");
    assert_eq!(s, 200, "{j}");
    let nudge = &j["journeys"][0];
    assert_eq!(
        (nudge["journey"].as_str(), nudge["entries"].as_u64()),
        (Some("nudge"), Some(1)),
        "{j}"
    );
    let active = &nudge["active"];
    assert_eq!(active["waiting_for"], "timer", "{j}");
    assert_eq!(active["step"], "steps[1]", "the wait: {j}");
    assert!(active["timer"].is_string(), "{j}");
    assert_eq!(j["held_sends"][0]["kind"], "suppressed", "{j}");
    assert_eq!(j["held_sends"][0]["reason"], "no_address", "{j}");
    let (s, j) = h.get_json("/v1/users/nobody/journeys");
    assert_eq!(
        (s, j["journeys"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{j}"
    );

    // With journeys: a segment a journey reads may change but not go; one is added (this
    // journey has no conditions of its own in the plan).
    let (s, r) = put(
        &h,
        "buyers",
        "CREATE SEGMENT buyers AS count(*) FILTER (WHERE event = 'Order Completed') >= 2",
    );
    assert_eq!(s, 200, "{r}");
    let (s, r) = h.request("DELETE", "/v1/segments/buyers", ADMIN_KEY, "");
    assert_eq!(s, 409, "{r}");
    assert!(r["error"].as_str().unwrap().contains("journey"), "{r}");
    let (s, r) = put(&h, "fresh", "CREATE SEGMENT fresh AS plan = 'pro'");
    assert_eq!(s, 201, "{r}");
    // The journey follows the replaced definition: two orders now end it by its goal.
    for k in 0..2 {
        let body = format!(r#"{{"userId":"j1","event":"Order Completed","messageId":"j1-o{k}"}}"#);
        assert_eq!(h.post("/v1/track", "wk", &body).0, 200);
    }
    h.wait_for("the goal exit", Duration::from_secs(20), |h| {
        h.output("journey_events.jsonl")
            .iter()
            .any(|r| r["kind"] == "converted")
    });
    let (_, j) = h.get_json("/v1/users/j1/journeys");
    assert_eq!(j["journeys"][0]["active"], Json::Null, "{j}");
}

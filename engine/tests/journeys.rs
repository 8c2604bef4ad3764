//! Journey scenarios: segments + journeys + events -> the exact journey events and message
//! actions, the same for 1 to 4 workers.
//!
//! Each directory under `tests/data/journeys/` is one scenario: `segments.sql`,
//! `journeys.yaml`, `events.jsonl` and `expected.txt`, whose first line is `until
//! <RFC3339>` and whose other lines are the journey events and messages in a compact form
//! (see `render`). Set `HERALD_BLESS=1` to rewrite the expected files after reading the
//! diff.

use std::path::{Path, PathBuf};

use herald_engine::replay::{replay, ReplayArgs};
use serde_json::Value as Json;

fn scenarios() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/journeys")
}

/// One line per journey event and message, in output order:
/// `TIME USER #INSTANCE JOURNEY KIND [PATH] [variant=V] [reason=R]` and
/// `TIME USER message JOURNEY CHANNEL TEMPLATE to=ADDRESS`.
fn render(out: &Path) -> String {
    let mut s = String::new();
    let read = |f: &str| std::fs::read_to_string(out.join(f)).unwrap();
    for line in read("journey_events.jsonl").lines() {
        let r: Json = serde_json::from_str(line).unwrap();
        let g = |k: &str| r[k].as_str().unwrap_or("").to_string();
        let mut l = format!(
            "{} {} #{} {} {}",
            g("time"),
            g("user_id"),
            r["instance"],
            g("journey"),
            g("kind")
        );
        for (k, prefix) in [
            ("step_path", ""),
            ("variant", "variant="),
            ("reason", "reason="),
        ] {
            if !g(k).is_empty() {
                l.push_str(&format!(" {prefix}{}", g(k)));
            }
        }
        s.push_str(&l);
        s.push('\n');
    }
    for line in read("messages.jsonl").lines() {
        let m: Json = serde_json::from_str(line).unwrap();
        let g = |k: &str| m[k].as_str().unwrap_or("-").to_string();
        s.push_str(&format!(
            "{} {} message {} {} {} to={}\n",
            g("time"),
            g("user_id"),
            g("journey"),
            g("channel"),
            g("template"),
            g("address")
        ));
    }
    s
}

fn run(dir: &Path, until: &str, workers: usize) -> String {
    let out = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let args = ReplayArgs {
        segments: p("segments.sql"),
        events: vec![p("events.jsonl")],
        profiles: vec![],
        until: until.to_string(),
        out: out.path().to_string_lossy().into_owned(),
        workers,
        progress: false,
        postgres: None,
        postgres_table: "segment_changes".into(),
        journeys: Some(p("journeys.yaml")),
    };
    replay(&args).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    render(out.path())
}

#[test]
fn every_scenario_gives_its_expected_journey_events_for_1_to_4_workers() {
    let bless = std::env::var_os("HERALD_BLESS").is_some();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(scenarios())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 5, "scenarios missing: {dirs:?}");
    let mut failures = Vec::new();
    for dir in dirs {
        let expected_path = dir.join("expected.txt");
        let expected = std::fs::read_to_string(&expected_path).unwrap();
        let (head, want) = expected.split_once('\n').unwrap_or((&expected, ""));
        let until = head
            .strip_prefix("until ")
            .expect("expected.txt starts with `until …`");
        let got = run(&dir, until, 1);
        if bless {
            std::fs::write(&expected_path, format!("{head}\n{got}")).unwrap();
        } else if got != want {
            failures.push(format!(
                "{}:\n--- want\n{want}--- got\n{got}",
                dir.display()
            ));
        }
        for workers in 2..=4 {
            let again = run(&dir, until, workers);
            if again != got {
                failures.push(format!(
                    "{}: {workers} workers differ from 1",
                    dir.display()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// More users than the operator steps per activation, all due at one instant: the burst is
/// taken in slices and nothing is lost or repeated.
#[test]
fn a_burst_of_timers_at_one_instant_fires_each_exactly_once() {
    use herald_engine::driver::{project_events, run_dataflow, DataflowInput};
    use herald_operators::event::{Event, EventType};
    use herald_operators::journey::{compile_journeys, parse_journeys, Kind};
    use herald_operators::lang::parse::parse_segments;

    const T0: i64 = 1_772_323_200_000;
    let file = parse_segments("CREATE SEGMENT s AS count(*) >= 1;").unwrap();
    let defs = parse_journeys(
        "journey: burst\nentry: { event: Go }\nsteps:\n  - wait: 1 hour\n  - send: { channel: webhook, template: t }\n",
    )
    .unwrap();
    let n = 40_000;
    let events: Vec<Event> = (0..n)
        .map(|i| Event {
            user: format!("u{i}"),
            kind: EventType::Track,
            event: Some("Go".into()),
            message_id: format!("m{i}"),
            timestamp: T0,
            properties: Default::default(),
            context: Default::default(),
            traits: Default::default(),
        })
        .collect();
    for workers in [1, 2] {
        let set = compile_journeys(&file, &defs).unwrap();
        let out = run_dataflow(
            DataflowInput {
                plan: set.plan.clone(),
                events: project_events(&set.plan, Some(&set), events.clone()),
                snapshots: vec![],
                lists: Default::default(),
                until: T0 + 2 * 3_600_000,
                lists_at: T0,
                workers,
                journeys: Some(set),
                keep_journey_output: true,
                inspect: None,
                on_caught_up: None,
            },
            None,
        )
        .unwrap();
        let sent: Vec<_> = out
            .journey_rows
            .iter()
            .filter(|r| r.kind == Kind::Sent)
            .collect();
        assert_eq!(sent.len(), n, "workers {workers}");
        assert!(sent.iter().all(|r| r.time == T0 + 3_600_000));
        let mut users: Vec<&str> = sent.iter().map(|r| r.user_id.as_str()).collect();
        users.sort();
        users.dedup();
        assert_eq!(users.len(), n);
        assert_eq!(out.messages.len(), n);
    }
}

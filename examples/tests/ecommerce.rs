//! The e-commerce generator end to end: its files load with Herald's own readers, bad
//! lines and redeliveries are there in the advertised amounts, the segment set parses,
//! and the output is deterministic.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use herald_connectors::csvlist::read_user_list;
use herald_connectors::snapshot::read_snapshot;
use herald_examples::{generate, Config, Summary, SEGMENTS_SQL};
use herald_operators::ast::SegmentBody;
use herald_operators::event::{parse_message, EventType, Limits};
use herald_operators::lang::parse::parse_segments;
use herald_operators::value::{Type, Value};

const START: i64 = 1_772_323_200_000; // 2026-03-01T00:00:00Z

fn config(out: &Path, seed: u64) -> Config {
    Config {
        users: 300,
        events: 30_000,
        seed,
        start_ms: START,
        days: 14.0,
        out: out.to_path_buf(),
    }
}

fn run(out: &Path, seed: u64) -> Summary {
    generate(&config(out, seed)).unwrap_or_else(|e| panic!("generate failed: {e:#}"))
}

#[test]
fn events_parse_with_the_advertised_bad_lines_and_redeliveries() {
    let dir = tempfile::tempdir().unwrap();
    let s = run(dir.path(), 7);
    assert_eq!(s.events, 30_000);
    assert_eq!(s.lines, s.events + s.duplicates + s.malformed);
    assert!(s.duplicates > 0 && s.malformed > 0, "{s:?}");
    let text = std::fs::read_to_string(&s.events_path).unwrap();
    let (mut accepted, mut rejected, mut dups) = (0u64, 0u64, 0u64);
    let mut ids = HashSet::new();
    let mut kinds = BTreeSet::new();
    let mut names = BTreeSet::new();
    let mut anonymous_only = 0;
    let mut max_seen = i64::MIN;
    let mut out_of_order = 0;
    for line in text.lines() {
        let (events, rejections) = parse_message(line.as_bytes(), None, Limits::default());
        rejected += rejections.len() as u64;
        for e in events {
            assert!(
                (START - 3 * 3_600_000..=s.end_ms).contains(&e.timestamp),
                "{line}"
            );
            if e.timestamp < max_seen {
                out_of_order += 1;
            }
            max_seen = max_seen.max(e.timestamp);
            if !ids.insert(e.message_id.clone()) {
                dups += 1;
                continue;
            }
            accepted += 1;
            kinds.insert(e.kind);
            names.extend(e.event.clone());
            if e.user.starts_with("anon-") {
                anonymous_only += 1;
            }
        }
    }
    assert_eq!(accepted, s.events);
    assert_eq!(dups, s.duplicates);
    assert_eq!(rejected, s.malformed);
    assert!(anonymous_only > 0);
    assert!(out_of_order > 0, "lines should only be roughly sorted");
    assert_eq!(
        kinds,
        BTreeSet::from([EventType::Track, EventType::Identify, EventType::Page])
    );
    for name in [
        "Signed Up",
        "Product Viewed",
        "Product Added",
        "Checkout Started",
        "Order Completed",
        "Source Created",
        "Home",
    ] {
        assert!(names.contains(name), "no '{name}' events");
    }
}

#[test]
fn profiles_and_beta_list_load_with_the_connectors() {
    let dir = tempfile::tempdir().unwrap();
    let s = run(dir.path(), 11);
    let snap = read_snapshot(&s.profiles_path.to_string_lossy()).unwrap();
    assert_eq!(snap.rows.len() as u64, s.profile_rows);
    assert!(s.profile_rows > 300 / 2, "most users have a profile: {s:?}");
    assert_eq!(
        snap.schema,
        vec![
            ("plan".to_string(), Type::Str),
            ("country".to_string(), Type::Str),
            ("lifetime_value".to_string(), Type::Num),
            ("signup_at".to_string(), Type::Ts),
            ("is_employee".to_string(), Type::Bool),
        ]
    );
    for cells in snap.rows.values() {
        let Some(Value::Ts(t)) = cells.get("signup_at") else {
            panic!("signup_at missing: {cells:?}");
        };
        assert!(*t <= s.snapshot_at);
    }
    let beta = read_user_list(&s.beta_path.to_string_lossy()).unwrap();
    assert_eq!(beta.len() as u64, s.beta_ids);
    assert!(beta.contains("beta-invite-0"));
}

#[test]
fn segment_set_parses_and_is_copied_next_to_the_list() {
    let file = parse_segments(SEGMENTS_SQL).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = file.segments.iter().map(|d| d.name.as_str()).collect();
    assert!(names.len() >= 12, "{names:?}");
    for spec in ["power_buyers", "stalled_signups", "vip", "vip_stalled"] {
        assert!(names.contains(&spec), "{spec} missing");
    }
    let csv = file
        .segments
        .iter()
        .find_map(|d| match &d.body {
            SegmentBody::Csv { url } => Some(url.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(csv, "beta.csv");
    let dir = tempfile::tempdir().unwrap();
    let s = run(dir.path(), 3);
    assert_eq!(
        std::fs::read_to_string(&s.segments_path).unwrap(),
        SEGMENTS_SQL
    );
    assert_eq!(s.segments_path.parent(), s.beta_path.parent());
}

#[test]
fn the_same_seed_gives_the_same_bytes() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let (sa, sb, sc) = (run(a.path(), 5), run(b.path(), 5), run(c.path(), 6));
    for file in ["events.jsonl", "profiles.parquet", "beta.csv"] {
        let read = |d: &Path| std::fs::read(d.join(file)).unwrap();
        assert_eq!(
            read(a.path()),
            read(b.path()),
            "{file} differs between runs"
        );
        assert_ne!(read(a.path()), read(c.path()), "{file} ignores the seed");
    }
    assert_eq!(sa.lines, sb.lines);
    assert_ne!(sa.lines, 0);
    let _ = sc;
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1);
    cfg.users = 0;
    assert!(generate(&cfg).is_err());
    cfg.users = 10;
    cfg.days = f64::NAN;
    assert!(generate(&cfg).is_err());
    cfg.days = 1.0;
    cfg.out = dir.path().join("events.jsonl/not-a-dir");
    std::fs::write(dir.path().join("events.jsonl"), b"a file").unwrap();
    assert!(generate(&cfg).is_err());
    cfg.out = dir.path().join("fine");
    cfg.events = 0;
    let s = generate(&cfg).unwrap();
    assert_eq!(s.lines, 0);
}

//! Tests of the random generators: determinism, shapes, and that generated segment
//! files parse and cover every aggregate and operator.

use std::collections::BTreeSet;

use herald_operators::ast::{AggKind, Expr, SegmentBody};
use herald_operators::event::{parse_message, Limits};
use herald_operators::lang::parse::parse_segments;

use serde_json::Value as Json;

use crate::gen::{event_to_json, random_events, random_segment_file, random_snapshots};

const T0: i64 = 1_772_323_200_000;
const HOUR: i64 = 3_600_000;

#[test]
fn generators_are_deterministic() {
    assert_eq!(
        random_events(7, 10, 100, T0, 10 * HOUR),
        random_events(7, 10, 100, T0, 10 * HOUR)
    );
    assert_eq!(
        random_snapshots(7, 10, T0, 10 * HOUR),
        random_snapshots(7, 10, T0, 10 * HOUR)
    );
    assert_eq!(random_segment_file(7, 5), random_segment_file(7, 5));
    assert_ne!(random_segment_file(7, 5), random_segment_file(8, 5));
}

#[test]
fn events_have_unique_ids_in_range_and_some_shared_timestamps() {
    let evs = random_events(3, 20, 2_000, T0, 48 * HOUR);
    let ids: BTreeSet<_> = evs.iter().map(|e| &e.message_id).collect();
    assert_eq!(ids.len(), evs.len());
    assert!(evs
        .iter()
        .all(|e| (T0..=T0 + 48 * HOUR).contains(&e.timestamp)));
    let stamps: BTreeSet<_> = evs.iter().map(|e| e.timestamp).collect();
    assert!(stamps.len() < evs.len() * 9 / 10);
    assert!(evs
        .iter()
        .any(|e| e.properties.get("revenue").is_some_and(Json::is_string)));
    assert!(evs
        .iter()
        .any(|e| e.trait_writes().iter().any(|(_, v)| v.is_null())));
    assert!(random_events(3, 0, 10, T0, HOUR).is_empty());
}

#[test]
fn events_round_trip_through_the_message_parser() {
    for e in random_events(11, 10, 300, T0, 48 * HOUR) {
        let text = event_to_json(&e).to_string();
        let (mut got, rej) = parse_message(text.as_bytes(), None, Limits::default());
        assert!(rej.is_empty(), "{text}: {rej:?}");
        assert_eq!(got.pop(), Some(e), "{text}");
    }
}

fn aggs(e: &Expr, out: &mut BTreeSet<(AggKind, bool)>) {
    let mut stack = vec![e];
    while let Some(e) = stack.pop() {
        match e {
            Expr::Agg(a) => {
                out.insert((a.kind, a.distinct));
            }
            Expr::Cmp(_, a, b) | Expr::Arith(_, a, b) | Expr::And(a, b) | Expr::Or(a, b) => {
                stack.extend([&**a, &**b])
            }
            Expr::Neg(a) | Expr::Not(a) | Expr::Lower(a) | Expr::Upper(a) => stack.push(a),
            Expr::IsNull { expr, .. } | Expr::HashBucket { key: expr, .. } => stack.push(expr),
            Expr::InList { expr, list, .. } => {
                stack.push(expr);
                stack.extend(list);
            }
            Expr::Between {
                expr, low, high, ..
            } => stack.extend([&**expr, &**low, &**high]),
            Expr::Like { expr, pattern, .. } => stack.extend([&**expr, &**pattern]),
            Expr::Coalesce(l) => stack.extend(l),
            _ => {}
        }
    }
}

#[test]
fn segment_files_parse_and_cover_every_aggregate() {
    let mut seen = BTreeSet::new();
    let mut text = String::new();
    for seed in 0..300 {
        let src = random_segment_file(seed, 1 + (seed as usize % 8));
        let file = parse_segments(&src).unwrap_or_else(|e| panic!("seed {seed}: {e}\n{src}"));
        for def in &file.segments {
            if let SegmentBody::Expr(e) = &def.body {
                aggs(e, &mut seen);
            }
        }
        text.push_str(&src);
    }
    for kind in [
        AggKind::Count,
        AggKind::Sum,
        AggKind::Avg,
        AggKind::Min,
        AggKind::Max,
        AggKind::First,
        AggKind::Last,
    ] {
        assert!(
            seen.iter().any(|(k, _)| *k == kind),
            "{kind:?} never generated"
        );
    }
    assert!(seen.contains(&(AggKind::Count, true)));
    for needle in [
        "in_segment(",
        "hash_bucket(",
        " LIKE ",
        " BETWEEN ",
        " IN (",
        " IS NULL",
        "NOT (",
        " OR ",
        "coalesce(",
        "timestamp < now()",
        "timestamp > now()",
        "signup_at",
    ] {
        assert!(text.contains(needle), "{needle} never generated");
    }
}

#[test]
fn snapshots_hold_only_known_users_at_whole_hours() {
    let mut any = false;
    for seed in 0..20 {
        for s in random_snapshots(seed, 12, T0, 240 * HOUR) {
            any = true;
            assert_eq!((s.at - T0) % HOUR, 0);
            for user in s.rows.keys() {
                assert!(user.starts_with('u') || user.starts_with('p'), "{user}");
            }
        }
    }
    assert!(any);
}

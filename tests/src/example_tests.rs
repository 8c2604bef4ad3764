//! The e-commerce example through the reference evaluator: every segment of
//! `examples/ecommerce/segments.sql` has members at some point of a generated run, so the
//! example demonstrates each of them (and the generator emits what they look for).

use std::collections::{BTreeMap, HashSet};

use herald_connectors::csvlist::read_user_list;
use herald_connectors::snapshot::read_snapshot;
use herald_examples::{generate, Config};
use herald_operators::ast::SegmentBody;
use herald_operators::event::{parse_message, Limits};
use herald_operators::lang::parse::parse_segments;

use crate::{members_at, Snapshot, World};

const DAY: i64 = 86_400_000;

#[test]
fn every_example_segment_has_members_at_some_point() {
    let dir = tempfile::tempdir().unwrap();
    let start = 1_772_323_200_000; // 2026-03-01T00:00:00Z
    let s = generate(&Config {
        users: 400,
        events: 40_000,
        seed: 2026,
        start_ms: start,
        days: 30.0,
        out: dir.path().to_path_buf(),
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    let text = std::fs::read_to_string(&s.events_path).unwrap();
    let mut seen = HashSet::new();
    let mut events = Vec::new();
    for line in text.lines() {
        let (accepted, _) = parse_message(line.as_bytes(), None, Limits::default());
        events.extend(
            accepted
                .into_iter()
                .filter(|e| seen.insert(e.message_id.clone())),
        );
    }
    let snap = read_snapshot(&s.profiles_path.to_string_lossy()).unwrap();
    let src = std::fs::read_to_string(&s.segments_path).unwrap();
    let file = parse_segments(&src).unwrap_or_else(|e| panic!("{e}"));
    let mut csv_lists = BTreeMap::new();
    for def in &file.segments {
        if let SegmentBody::Csv { url } = &def.body {
            // Relative to the segment file's directory.
            let path = dir.path().join(url);
            csv_lists.insert(
                def.name.clone(),
                read_user_list(&path.to_string_lossy()).unwrap(),
            );
        }
    }
    let world = World {
        events,
        snapshots: vec![Snapshot {
            at: s.snapshot_at,
            rows: snap.rows,
        }],
        csv_lists,
    };
    let mut best: BTreeMap<String, usize> = BTreeMap::new();
    for now in [start + 5 * DAY, s.snapshot_at, start + 21 * DAY, s.end_ms] {
        for (name, members) in members_at(&file, &world, now) {
            let n = best.entry(name).or_default();
            *n = (*n).max(members.len());
        }
    }
    eprintln!("example segment sizes (max over instants): {best:?}");
    for (name, n) in &best {
        assert!(*n > 0, "segment {name} is always empty; sizes: {best:?}");
    }
    assert_eq!(best.len(), file.segments.len());
}

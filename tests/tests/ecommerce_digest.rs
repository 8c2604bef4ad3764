//! The e-commerce example's changes are exactly those of the core Herald had before the
//! keyed-state rewrite: the SHA-256 of `segment_changes.jsonl` for a generated data set
//! (3 000 users, 60 000 events, a profile snapshot and a CSV list), with the windows live
//! and with every window lapsed, for 1 and 3 workers.
//!
//! The digests were computed with the interval core (temporal facts in a differential
//! arrangement, reduce, temporal memberships; commit e83a0f0) on the same generated files.
//! A change to what the core emits must be deliberate: the spec changed, the digests are
//! recomputed, and the reason is written here.

use herald_engine::replay::{replay, ReplayArgs};
use herald_examples::{generate, Config};
use sha2::{Digest, Sha256};

const START: i64 = 1_772_323_200_000; // 2026-03-01T00:00:00Z

fn digest_of_replay(until: &str, workers: usize) -> String {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let s = generate(&Config {
        users: 3_000,
        events: 60_000,
        seed: 11,
        start_ms: START,
        days: 30.0,
        out: dir.path().to_path_buf(),
    })
    .unwrap_or_else(|e| panic!("generate: {e:#}"));
    let out = dir.path().join("out");
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    replay(&ReplayArgs {
        segments: path(&s.segments_path),
        events: vec![path(&s.events_path)],
        profiles: vec![format!("{}@2026-03-16T00:00:00Z", path(&s.profiles_path))],
        until: until.into(),
        out: path(&out),
        workers,
        progress: false,
        postgres: None,
        postgres_table: "segment_changes".into(),
        journeys: None,
    })
    .unwrap_or_else(|e| panic!("replay: {e}"));
    let bytes = std::fs::read(out.join("segment_changes.jsonl"))
        .unwrap_or_else(|e| panic!("reading the changes: {e}"));
    hex::encode(Sha256::digest(&bytes))
}

#[test]
fn changes_with_windows_live_are_those_of_the_interval_core() {
    for workers in [1, 3] {
        assert_eq!(
            digest_of_replay("2026-03-31T00:00:00Z", workers),
            "a98e9079531c9eae88bf2e872231852d2a52545703bbe94d06cd9e1d5b59efbc",
            "workers = {workers}"
        );
    }
}

#[test]
fn changes_after_every_window_lapsed_are_those_of_the_interval_core() {
    assert_eq!(
        digest_of_replay("2026-05-10T00:00:00Z", 2),
        "ff515bcfd225e0750a86efd6f554bc02b7651c411713eabb9cc316153dea7f40"
    );
}

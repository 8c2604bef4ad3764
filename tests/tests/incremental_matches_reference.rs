//! The incremental engine agrees with the naive reference evaluator.
//!
//! Random event streams x random segment files (through the real parser) x random
//! profile snapshots x worker counts 1-4: the running sum of the dataflow's changes at
//! random instants must equal the reference's membership at those instants, every
//! running sum must stay 0 or 1, and the changes must be identical for every worker count.

use std::collections::{BTreeMap, BTreeSet};

use herald_engine::driver::{project_events, run_dataflow, DataflowInput};
use herald_operators::change::SegmentChange;
use herald_operators::lang::parse::parse_segments;
use herald_operators::plan::Plan;
use herald_tests::gen::{random_events, random_segment_file, random_snapshots};
use herald_tests::{members_at, World};
use proptest::prelude::*;

const T0: i64 = 1_772_323_200_000; // 2026-03-01T00:00:00Z
const HOUR: i64 = 3_600_000;

/// Members of each segment at `now` according to the changes: running sums.
fn members_from_changes(changes: &[SegmentChange], now: i64) -> BTreeMap<String, BTreeSet<String>> {
    let mut sums: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for c in changes.iter().take_while(|c| c.time <= now) {
        *sums.entry((&c.segment, &c.user_id)).or_default() += c.diff;
    }
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for ((seg, user), n) in sums {
        assert!(
            n == 0 || n == 1,
            "running sum of ({seg}, {user}) at {now} is {n}, not 0 or 1"
        );
        if n == 1 {
            out.entry(seg.to_string())
                .or_default()
                .insert(user.to_string());
        }
    }
    out
}

fn run(plan: &Plan, world: &World, until: i64, workers: usize) -> Vec<SegmentChange> {
    let lists = world
        .csv_lists
        .iter()
        .filter_map(|(name, users)| plan.segment_index(name).map(|i| (i, users.clone())))
        .collect();
    let out = run_dataflow(
        DataflowInput {
            plan: plan.clone(),
            events: project_events(plan, None, world.events.iter().cloned()),
            snapshots: world
                .snapshots
                .iter()
                .map(|s| (s.at, std::sync::Arc::new(s.rows.clone())))
                .collect(),
            lists,
            until,
            lists_at: T0,
            workers,
            journeys: None,
            keep_journey_output: true,
            inspect: None,
            on_caught_up: None,
        },
        None,
    );
    match out {
        Ok(o) => o.changes,
        Err(e) => panic!("dataflow failed: {e}"),
    }
}

fn check_case(seed: u64, n_segments: usize, n_users: usize, n_events: usize, workers: usize) {
    let span = 10 * 24 * HOUR;
    let source = random_segment_file(seed, n_segments);
    let file = match parse_segments(&source) {
        Ok(f) => f,
        Err(e) => panic!("generated segment file does not parse: {e}\n{source}"),
    };
    let plan = Plan::compile(&file);
    let world = World {
        events: random_events(seed, n_users, n_events, T0, span),
        snapshots: random_snapshots(seed, n_users, T0, span),
        csv_lists: BTreeMap::new(),
    };
    let until = T0 + span + 8 * 24 * HOUR;
    let changes = run(&plan, &world, until, workers);
    // Instants to compare at: spread over the run, plus the instants of changes and
    // one millisecond either side of them, where off-by-one errors would show.
    let mut rng = seed;
    let mut instants: Vec<i64> = (0..6)
        .map(|_| {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            T0 - HOUR + (rng >> 11) as i64 % (until - T0 + HOUR)
        })
        .collect();
    for c in changes.iter().step_by((changes.len() / 6).max(1)) {
        instants.extend([c.time - 1, c.time, c.time + 1]);
    }
    instants.push(until);
    for now in instants.into_iter().filter(|t| *t <= until) {
        let got = members_from_changes(&changes, now);
        let mut want = members_at(&file, &world, now);
        want.retain(|_, m| !m.is_empty());
        assert_eq!(
            got, want,
            "membership differs at {now} (seed {seed}, {workers} workers)\nsegments:\n{source}"
        );
    }
}

#[test]
fn spec_examples_match_reference_on_random_streams() {
    for seed in 0..4 {
        check_case(seed, 6, 12, 300, 1 + (seed as usize % 4));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn incremental_equals_reference(
        seed in any::<u64>(),
        n_segments in 1usize..8,
        n_users in 1usize..20,
        n_events in 0usize..400,
        workers in 1usize..=4,
    ) {
        check_case(seed, n_segments, n_users, n_events, workers);
    }
}

#[test]
fn output_is_identical_for_every_worker_count() {
    let source = random_segment_file(99, 8);
    let file = parse_segments(&source).unwrap_or_else(|e| panic!("{e}\n{source}"));
    let plan = Plan::compile(&file);
    let world = World {
        events: random_events(99, 50, 2_000, T0, 10 * 24 * HOUR),
        snapshots: random_snapshots(99, 50, T0, 10 * 24 * HOUR),
        csv_lists: BTreeMap::new(),
    };
    let until = T0 + 20 * 24 * HOUR;
    let one = run(&plan, &world, until, 1);
    assert!(!one.is_empty(), "the case should produce changes");
    for workers in 2..=4 {
        assert_eq!(
            run(&plan, &world, until, workers),
            one,
            "{workers} workers differ from 1"
        );
    }
}

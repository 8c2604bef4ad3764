//! The replay's answer does not depend on the order of lines: events at one instant are
//! applied in the spec's order, (timestamp, messageId), so even floating-point sums
//! (0.1 + 0.2 + 0.3 is not 0.3 + 0.2 + 0.1) come out the same.

use herald_engine::driver::{project_events, run_dataflow, DataflowInput};
use herald_operators::event::{parse_message, Limits};
use herald_operators::lang::parse::parse_segments;
use herald_operators::plan::Plan;

const SEGMENTS: &str = "CREATE SEGMENT exact AS sum(properties.amount) > 0.6;";

fn changes(lines: &[&str], workers: usize) -> Vec<(String, String, i64, i64)> {
    let plan = Plan::compile(&parse_segments(SEGMENTS).expect("segments parse"));
    let events = lines
        .iter()
        .flat_map(|l| parse_message(l.as_bytes(), None, Limits::default()).0);
    let out = run_dataflow(
        DataflowInput {
            events: project_events(&plan, None, events),
            plan,
            snapshots: vec![],
            lists: Default::default(),
            until: 1_772_323_300_000,
            lists_at: 1_772_323_200_000,
            workers,
            journeys: None,
            keep_journey_output: true,
            inspect: None,
            on_caught_up: None,
        },
        None,
    )
    .unwrap_or_else(|e| panic!("dataflow: {e}"));
    out.changes
        .into_iter()
        .map(|c| (c.segment, c.user_id, c.diff, c.time))
        .collect()
}

#[test]
fn float_sums_at_one_instant_do_not_depend_on_line_order() {
    let line = |id: &str, amount: &str| {
        format!(
            r#"{{"type":"track","event":"Paid","userId":"u","messageId":"{id}","timestamp":"2026-03-01T00:00:10Z","properties":{{"amount":{amount}}}}}"#
        )
    };
    let (a, b, c) = (line("m1", "0.1"), line("m2", "0.2"), line("m3", "0.3"));
    let forward = changes(&[&a, &b, &c], 1);
    for workers in [1, 2] {
        assert_eq!(
            changes(&[&c, &b, &a], workers),
            forward,
            "reversed, {workers} workers"
        );
        assert_eq!(
            changes(&[&b, &c, &a], workers),
            forward,
            "rotated, {workers} workers"
        );
    }
    // (0.1 + 0.2) + 0.3, in message id order, is 0.6000000000000001 > 0.6: the user is in
    // (in reverse line order it would be 0.6, and out).
    assert_eq!(forward.len(), 1, "{forward:?}");
}

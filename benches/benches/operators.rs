//! Micro-benchmarks of the per-event and per-user work on the replay hot path, isolated
//! from timely: accepting a message (`parse_message`, and `Plan::parse_projected`, which
//! keeps only what the plan reads), applying an event to a user's
//! segment state (`SegmentState::apply_event`), evaluating every segment of one user at
//! an instant (`SegmentState::evaluate`), and compiling a segment file.
//!
//! Run: `cargo bench -p herald-benches --bench operators`
//! (figures and machine in `docs/benchmarks.md`).

// criterion_group! generates an undocumented pub fn.
#![allow(missing_docs)]

use std::hint::black_box;
use std::rc::Rc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use herald_operators::event::{parse_message, Limits};
use herald_operators::lang::parse::parse_segments;
use herald_operators::plan::Plan;
use herald_operators::state::SegmentState;
use herald_operators::time::to_time;

const SEGMENTS: &str = include_str!("../segments20.sql");

const ORDER: &[u8] = br#"{"type":"track","event":"Order Completed","userId":"user-004217","messageId":"m-000001","timestamp":"2026-03-04T10:00:00.000Z","properties":{"revenue":129.5,"currency":"USD","order_id":"o-1","product_id":"p-17"},"context":{"ip":"10.0.0.1","library":{"name":"analytics.js","version":"4.1.0"}}}"#;

fn plan() -> Plan {
    let file = match parse_segments(SEGMENTS) {
        Ok(f) => f,
        Err(e) => panic!("benches/segments20.sql does not parse: {e}"),
    };
    Plan::compile(&file)
}

fn bench(c: &mut Criterion) {
    let plan = Rc::new(plan());
    let mut g = c.benchmark_group("per_event");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_message", |b| {
        b.iter(|| parse_message(black_box(ORDER), None, Limits::default()))
    });
    let no_journeys = |_: Option<&str>| false;
    g.bench_function("parse_projected", |b| {
        b.iter(|| plan.parse_projected(black_box(ORDER), Limits::default(), &no_journeys))
    });
    let (events, _) = plan.parse_projected(ORDER, Limits::default(), &no_journeys);
    let event = events.into_iter().next().expect("the bench event parses");
    // Applying the same order again and again: its window entries pile up, so the state is
    // rebuilt every 64 iterations (a user with at most 64 orders in a week).
    let t = to_time(event.timestamp);
    let mut state = SegmentState::new(plan.clone(), -1);
    let mut n = 0;
    g.bench_function("apply_event_20_segments", |b| {
        b.iter(|| {
            n += 1;
            if n % 64 == 0 {
                state = SegmentState::new(plan.clone(), -1);
            }
            let u = state.intern(&event.user);
            state.apply_event(u, black_box(&event), t)
        })
    });
    g.finish();

    // A user with ten orders an hour apart, evaluated at the last one.
    let mut state = SegmentState::new(plan.clone(), -1);
    let u = state.intern(&event.user);
    let mut last = t;
    for i in 0..10 {
        let mut e = event.clone();
        e.timestamp += i * 3_600_000;
        e.message_id = format!("m-{i}");
        last = to_time(e.timestamp);
        state.apply_event(u, &e, last);
    }
    let mut g = c.benchmark_group("per_user");
    g.throughput(Throughput::Elements(1));
    g.bench_function("evaluate_user_20_segments", |b| {
        b.iter(|| {
            let mut changes = 0;
            state.evaluate(u, black_box(last), &mut |_, _, _| changes += 1);
            changes
        })
    });
    g.finish();

    c.bench_function("compile_segments20", |b| {
        b.iter(|| Plan::compile(&parse_segments(black_box(SEGMENTS)).expect("parses")))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

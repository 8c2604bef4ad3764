//! Micro-benchmarks of the per-event and per-user work on the replay hot path, isolated
//! from timely: accepting a message (`parse_message`), projecting an event into facts
//! (`Plan::event_facts`), evaluating every segment for one user (`Plan::evaluate_user`),
//! and compiling a segment file.
//!
//! Run: `cargo bench -p herald-benches --bench operators`
//! (figures and machine in `docs/benchmarks.md`).

// criterion_group! generates an undocumented pub fn.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use herald_operators::event::{parse_message, Limits};
use herald_operators::lang::parse::parse_segments;
use herald_operators::plan::{FactVal, Plan, TimedFact};

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
    let plan = plan();
    let mut g = c.benchmark_group("per_event");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse_message", |b| {
        b.iter(|| parse_message(black_box(ORDER), None, Limits::default()))
    });
    let (events, _) = parse_message(ORDER, None, Limits::default());
    let event = events.into_iter().next().expect("the bench event parses");
    let mut out: Vec<TimedFact> = Vec::new();
    g.bench_function("event_facts_20_segments", |b| {
        b.iter(|| {
            out.clear();
            plan.event_facts(black_box(&event), &mut out);
            out.len()
        })
    });
    g.finish();

    // A user with a realistic spread of facts: ten orders, a signup, some views.
    let mut facts: Vec<TimedFact> = Vec::new();
    for i in 0..10 {
        let mut e = event.clone();
        e.timestamp += i * 3_600_000;
        e.message_id = format!("m-{i}");
        plan.event_facts(&e, &mut facts);
    }
    let mut consolidated: Vec<(u32, FactVal)> = facts.into_iter().map(|(_, f, _, _)| f).collect();
    consolidated.sort();
    let mut counted: Vec<((u32, FactVal), isize)> = Vec::new();
    for f in consolidated {
        match counted.last_mut() {
            Some((last, n)) if *last == f => *n += 1,
            _ => counted.push((f, 1)),
        }
    }
    let input: Vec<(&(u32, FactVal), isize)> = counted.iter().map(|(f, n)| (f, *n)).collect();
    let mut g = c.benchmark_group("per_user");
    g.throughput(Throughput::Elements(1));
    g.bench_function("evaluate_user_20_segments", |b| {
        b.iter(|| plan.evaluate_user(black_box("user-004217"), black_box(&input)))
    });
    g.finish();

    c.bench_function("compile_segments20", |b| {
        b.iter(|| Plan::compile(&parse_segments(black_box(SEGMENTS)).expect("parses")))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! State carried over to a changed segment file equals state built with that file from
//! the start.
//!
//! Run A feeds a random event stream to file A and takes a full checkpoint at an instant
//! `F`. File B keeps some of A's segments (one with its condition negated), drops one,
//! and adds one over A's aggregates under a new name. Run B' restores A's parts carried
//! over to B (`SegmentPart::remap`, every user evaluated again at `F`) and feeds the
//! events from `F` on; run B feeds every event to B from the start. For every segment of
//! B, the membership B' starts from (A's, for kept segments) plus its changes equals run
//! B's, at `F` and at every instant after; after `F` the changes are the same.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use herald_operators::dataflow::{
    build_segments_durable, CheckpointReq, Durability, JourneysPart, PartSink, Restored,
    SegmentPart,
};
use herald_operators::event::Event;
use herald_operators::lang::parse::parse_segments;
use herald_operators::plan::Plan;
use herald_operators::time::Time;
use herald_tests::gen::{random_events, random_segment_file};
use timely::dataflow::operators::{Inspect, Probe};

const T0: i64 = 1_772_323_200_000;
const HOUR: i64 = 3_600_000;

struct Collect(Arc<Mutex<BTreeMap<usize, Vec<u8>>>>, usize);

impl PartSink for Collect {
    fn segments(&self, _at: Time, part: SegmentPart) {
        let bytes = bincode::serialize(&part).unwrap();
        self.0.lock().unwrap().insert(self.1, bytes);
    }
    fn journeys(&self, _at: Time, _part: JourneysPart) {}
}

/// Changes `(time, segment name, user, diff)`, sorted.
type Changes = Vec<(Time, String, String, isize)>;

/// Runs `segments` over the events from `from` (restoring the collected parts carried
/// over from `old`, when given), taking a full checkpoint at `checkpoint`.
fn run(
    segments: &str,
    events: &[Event],
    workers: usize,
    from: Option<(Time, &str)>,
    checkpoint: Option<Time>,
    parts: Arc<Mutex<BTreeMap<usize, Vec<u8>>>>,
    until: Time,
) -> Changes {
    let plan = Plan::compile(&parse_segments(segments).unwrap());
    let remap = from.map(|(_, old)| {
        let old = Plan::compile(&parse_segments(old).unwrap());
        plan.remap_from(&old)
            .expect("B reads only what A's state holds")
    });
    let names: Vec<String> = plan.segments.iter().map(|s| s.name.clone()).collect();
    let out: Arc<Mutex<Changes>> = Arc::default();
    let events = Arc::new(events.to_vec());
    let sink = Arc::clone(&out);
    let start = from.map_or(0, |(at, _)| at);
    let restoring = from.is_some();
    timely::execute(timely::Config::process(workers), move |w| {
        let (index, peers) = (w.index(), w.peers());
        let plan = Rc::new(plan.clone());
        let restored = remap.as_ref().map(|r| {
            let mut part: SegmentPart =
                bincode::deserialize(&parts.lock().unwrap()[&index]).unwrap();
            part.remap(r);
            Restored {
                at: start,
                segments: vec![part],
                journeys: vec![],
                reevaluate: true,
            }
        });
        let durability = Durability {
            parts: Rc::new(Collect(Arc::clone(&parts), index)),
            restored,
        };
        let probe = timely::dataflow::operators::probe::Handle::new();
        let (sink, names) = (Arc::clone(&sink), names.clone());
        let mut inputs = w.dataflow::<Time, _, _>(|scope| {
            let (inputs, outputs) =
                build_segments_durable(scope, plan.clone(), -1, None, Some(durability));
            outputs
                .changes
                .inner
                .inspect(move |((s, u), t, r)| {
                    let name = names[*s as usize].clone();
                    sink.lock().unwrap().push((*t, name, u.clone(), *r));
                })
                .probe_with(&probe);
            inputs
        });
        inputs.advance_to(start);
        if !restoring && index == 0 {
            inputs.set_snapshot_clock(None, i64::MIN);
        }
        let mut mine: Vec<&Event> = events
            .iter()
            .enumerate()
            .filter(|(i, e)| i % peers == index && e.timestamp as Time >= start)
            .map(|(_, e)| e)
            .collect();
        mine.sort_by_key(|e| (e.timestamp, e.message_id.clone()));
        let mut pending_ck = checkpoint.filter(|c| *c > start);
        let mut feed = mine.into_iter().peekable();
        loop {
            let next_ev = feed.peek().map(|e| e.timestamp as Time);
            let t = match (next_ev, pending_ck) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(t) => t,
                    None => break,
                },
            };
            inputs.advance_to(t);
            if pending_ck == Some(t) {
                if index == 0 {
                    inputs.request_checkpoint(CheckpointReq {
                        full: true,
                        since: 0,
                    });
                }
                pending_ck = None;
            }
            while let Some(e) = feed.next_if(|e| e.timestamp as Time == t) {
                inputs.events.update(plan.project(e.clone(), false), 1);
            }
            inputs.flush();
            w.step();
        }
        inputs.advance_to(until);
        inputs.flush();
        while probe.less_than(&until) {
            w.step();
        }
    })
    .unwrap();
    let mut out = std::mem::take(&mut *out.lock().unwrap());
    out.sort();
    out
}

/// Membership of each segment just after instant `at` (changes at or before it).
fn members_through(changes: &Changes, at: Time) -> BTreeMap<(String, String), isize> {
    let mut m: BTreeMap<(String, String), isize> = BTreeMap::new();
    for (_, s, u, r) in changes.iter().filter(|c| c.0 <= at) {
        *m.entry((s.clone(), u.clone())).or_default() += r;
    }
    m.retain(|_, n| *n != 0);
    m
}

/// File B from file A's statements: `extra` (A's first condition under a new name)
/// first, A's second segment negated, A's last dropped (no segment names a later one).
fn changed_file(a: &str) -> String {
    let statements: Vec<&str> = a
        .split("CREATE SEGMENT ")
        .skip(1)
        .map(|s| s.trim().trim_end_matches(';'))
        .collect();
    let cond = |s: &str| s.split_once(" AS").unwrap().1.trim().to_string();
    let mut b = format!("CREATE SEGMENT extra AS {};\n", cond(statements[0]));
    for (i, s) in statements[..statements.len() - 1].iter().enumerate() {
        let name = s.split_once(" AS").unwrap().0.trim();
        let c = cond(s);
        let c = if i == 1 { format!("NOT ({c})") } else { c };
        b.push_str(&format!("CREATE SEGMENT {name} AS {c};\n"));
    }
    b
}

fn check(seed: u64, workers: usize) {
    let span = 48 * HOUR;
    let events = random_events(seed, 40, 600, T0, span);
    let a = random_segment_file(seed, 6);
    let b = changed_file(&a);
    let until = (T0 + span + 72 * HOUR) as Time;
    let f = (T0 + 20 * HOUR + 17) as Time;

    let parts: Arc<Mutex<BTreeMap<usize, Vec<u8>>>> = Arc::default();
    let run_a = run(
        &a,
        &events,
        workers,
        None,
        Some(f),
        Arc::clone(&parts),
        until,
    );
    let whole_b = run(&b, &events, workers, None, None, Arc::default(), until);
    let carried = run(&b, &events, workers, Some((f, &a)), None, parts, until);

    // B' starts from A's memberships before `F` for the segments B kept.
    let kept: BTreeSet<String> = Plan::compile(&parse_segments(&b).unwrap())
        .segments
        .iter()
        .map(|s| s.name.clone())
        .collect();
    let mut start = members_through(&run_a, f - 1);
    start.retain(|(s, _), _| kept.contains(s));
    let carried_total = |at: Time| {
        let mut m = start.clone();
        for ((s, u), r) in members_through(&carried, at) {
            *m.entry((s, u)).or_default() += r;
        }
        m.retain(|_, n| *n != 0);
        m
    };
    for at in [f, f + 3 * HOUR as Time, until] {
        assert_eq!(
            carried_total(at),
            members_through(&whole_b, at),
            "seed {seed}, {workers} workers: membership at {at} (F = {f})\nA:\n{a}\nB:\n{b}"
        );
    }
    let after = |c: &Changes| -> Changes { c.iter().filter(|x| x.0 > f).cloned().collect() };
    assert_eq!(
        after(&carried),
        after(&whole_b),
        "seed {seed}, {workers} workers: changes after F\nB:\n{b}"
    );
}

#[test]
fn state_carried_over_to_a_changed_file_equals_state_built_with_it() {
    for seed in 0..6 {
        for workers in [1, 2] {
            check(seed, workers);
        }
    }
}

//! A dataflow restored from a checkpoint continues exactly as the one that wrote it.
//!
//! Run A feeds a random event stream (segments from the generator, and journeys that
//! wait, send, branch and write traits back into the segment state) and asks for a
//! checkpoint at a few instants: a full part first, then deltas. Every part goes through
//! bincode, as on disk. Run B, for each checkpoint, restores the chain up to it, feeds
//! the journey writes the part carried and the events at or after its instant, and must
//! emit exactly run A's changes and journey output from that instant on, for 1 and 2
//! workers.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use herald_operators::dataflow::{
    build_segments_durable, CheckpointReq, Durability, JourneysPart, PartSink, Restored,
    SegmentPart,
};
use herald_operators::event::Event;
use herald_operators::journey::{compile_journeys, parse_journeys, JOut};
use herald_operators::lang::parse::parse_segments;
use herald_operators::time::Time;
use herald_tests::gen::{random_events, random_segment_file};
use timely::dataflow::operators::{Inspect, Probe};

const T0: i64 = 1_772_323_200_000;
const HOUR: i64 = 3_600_000;

const JOURNEYS: &str = r#"
journey: nudge
entry: {event: Order Completed}
reentry: always
steps:
  - wait: 2 hours
  - update_trait: {name: plan, value: pro}
  - wait_until: {event: Product Viewed, timeout: 5 hours, on_event: [{send: {channel: webhook, template: t}}], on_timeout: []}
---
journey: welcome
entry: {event: Signed Up}
steps:
  - send: {channel: email, template: t}
  - wait: 1 day
  - update_trait: {name: country, value: DE}
"#;

/// Serialized parts by (checkpoint instant, worker).
#[derive(Default, Clone)]
struct Parts {
    segments: BTreeMap<(Time, usize), Vec<u8>>,
    journeys: BTreeMap<(Time, usize), Vec<u8>>,
}

struct Collect {
    worker: usize,
    parts: Arc<Mutex<Parts>>,
}

impl PartSink for Collect {
    fn segments(&self, at: Time, part: SegmentPart) {
        let bytes = bincode::serialize(&part).unwrap();
        self.parts
            .lock()
            .unwrap()
            .segments
            .insert((at, self.worker), bytes);
    }
    fn journeys(&self, at: Time, part: JourneysPart) {
        let bytes = bincode::serialize(&part).unwrap();
        self.parts
            .lock()
            .unwrap()
            .journeys
            .insert((at, self.worker), bytes);
    }
}

/// What a run emitted: changes `(time, segment, user, diff)` and journey rows and
/// messages as JSON, sorted.
type Output = (Vec<(Time, u16, String, isize)>, Vec<(Time, String)>);

struct Setup {
    segments: String,
    events: Vec<Event>,
    until: Time,
}

/// Runs the dataflow from `from` (a checkpoint instant and its chain, or the start),
/// requesting checkpoints at `checkpoints` (the first full, the rest deltas).
fn run(
    setup: &Setup,
    workers: usize,
    from: Option<(Time, Vec<Time>)>,
    checkpoints: &[Time],
    parts: Arc<Mutex<Parts>>,
) -> Output {
    let file = parse_segments(&setup.segments).unwrap();
    let defs = parse_journeys(JOURNEYS).unwrap();
    let set = compile_journeys(&file, &defs).unwrap();
    let out: Arc<Mutex<Output>> = Arc::default();
    let events = Arc::new(setup.events.clone());
    let (until, checkpoints) = (setup.until, checkpoints.to_vec());
    let sink = Arc::clone(&out);
    timely::execute(timely::Config::process(workers), move |w| {
        let index = w.index();
        let peers = w.peers();
        let plan = Rc::new(set.plan.clone());
        let jset = Rc::new(set.clone());
        // What this worker restores: its chain of parts, and the writes they carried.
        let mut writes: Vec<Event> = Vec::new();
        let restored = from.as_ref().map(|(at, chain)| {
            let p = parts.lock().unwrap();
            let mut r = Restored {
                at: *at,
                ..Default::default()
            };
            for t in chain {
                let seg: SegmentPart = bincode::deserialize(&p.segments[&(*t, index)]).unwrap();
                r.segments.push(seg);
                let j: JourneysPart = bincode::deserialize(&p.journeys[&(*t, index)]).unwrap();
                if t == at {
                    writes = j.writes.clone();
                }
                r.journeys.push(j.machine);
            }
            r
        });
        let start = from.as_ref().map_or(0, |(at, _)| *at);
        let durability = Durability {
            parts: Rc::new(Collect {
                worker: index,
                parts: Arc::clone(&parts),
            }),
            restored,
            journeys_paused: Vec::new(),
        };
        let probe = timely::dataflow::operators::probe::Handle::new();
        let sink = Arc::clone(&sink);
        let sink2 = Arc::clone(&sink);
        let mut inputs = w.dataflow::<Time, _, _>(|scope| {
            let (inputs, outputs) = build_segments_durable(
                scope,
                plan.clone(),
                -1,
                Some(jset.clone()),
                Some(durability),
            );
            outputs
                .changes
                .inner
                .inspect(move |((s, u), t, r)| {
                    sink.lock().unwrap().0.push((*t, *s, u.clone(), *r));
                })
                .probe_with(&probe);
            if let Some(j) = outputs.journeys {
                j.inspect_core(move |x| {
                    let Ok((t, data)) = x else { return };
                    for o in data.iter() {
                        let line = match o {
                            JOut::Row(r) => serde_json::to_string(r).unwrap(),
                            JOut::Message(m) => serde_json::to_string(m).unwrap(),
                            JOut::Write(e, at) => format!("write {at} {}", e.message_id),
                        };
                        sink2.lock().unwrap().1.push((*t.expect_singleton(), line));
                    }
                })
                .probe_with(&probe);
            }
            inputs
        });
        inputs.advance_to(start);
        if from.is_none() && index == 0 {
            inputs.set_snapshot_clock(None, i64::MIN);
        }
        // The writes a restored part carried enter at its instant.
        for e in writes {
            let keep = jset.wants(&e);
            inputs.events.update(plan.project(e, keep), 1);
        }
        // Events by instant (their timestamp), this worker's share.
        let mut mine: Vec<&Event> = events
            .iter()
            .enumerate()
            .filter(|(i, e)| i % peers == index && e.timestamp as Time >= start)
            .map(|(_, e)| e)
            .collect();
        mine.sort_by_key(|e| (e.timestamp, e.message_id.clone()));
        let mut ck = checkpoints.iter().filter(|c| **c > start).peekable();
        let mut prev_ck = start;
        let mut first = from.is_none();
        let mut feed = mine.into_iter().peekable();
        loop {
            let next_ev = feed.peek().map(|e| e.timestamp as Time);
            let next_ck = ck.peek().copied().copied();
            let t = match (next_ev, next_ck) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(t) => t,
                    None => break,
                },
            };
            inputs.advance_to(t);
            if next_ck == Some(t) {
                if index == 0 {
                    inputs.request_checkpoint(CheckpointReq {
                        full: first,
                        since: prev_ck,
                    });
                }
                first = false;
                prev_ck = t;
                ck.next();
            }
            while let Some(e) = feed.next_if(|e| e.timestamp as Time == t) {
                let keep = jset.wants(e);
                inputs.events.update(plan.project(e.clone(), keep), 1);
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
    out.0.sort();
    out.1.sort();
    out
}

fn check(seed: u64, workers: usize) {
    let span = 48 * HOUR;
    let mut events = random_events(seed, 40, 600, T0, span);
    // Journeys enter on these; the generator names them among its track events.
    events.retain(|e| e.timestamp < T0 + span);
    let setup = Setup {
        // The journeys' trait writes show in these two.
        segments: random_segment_file(seed, 6)
            + "\nCREATE SEGMENT written_pro AS plan = 'pro';\nCREATE SEGMENT written_de AS country = 'DE';\n",
        events,
        until: (T0 + span + 72 * HOUR) as Time,
    };
    let mut cks: Vec<Time> = [6, 13, 20, 31, 40]
        .iter()
        .map(|h| (T0 + h * HOUR + 17) as Time)
        .collect();
    // One checkpoint falls at the instant a journey's trait write enters the segment
    // state (one millisecond after the step that wrote it), so the part must carry it.
    let probe = run(&setup, workers, None, &[], Arc::default());
    let write_at = probe
        .1
        .iter()
        .find_map(|(_, l)| {
            l.strip_prefix("write ")?
                .split(' ')
                .next()?
                .parse::<Time>()
                .ok()
        })
        .expect("a journey writes a trait");
    cks.push(write_at);
    cks.sort_unstable();
    cks.dedup();
    let parts: Arc<Mutex<Parts>> = Arc::default();
    let whole = run(&setup, workers, None, &cks, Arc::clone(&parts));
    assert!(
        !whole.0.is_empty() && !whole.1.is_empty(),
        "seed {seed}: nothing happened"
    );
    for (k, &at) in cks.iter().enumerate() {
        let restored = run(
            &setup,
            workers,
            Some((at, cks[..=k].to_vec())),
            &[],
            Arc::new(Mutex::new(parts.lock().unwrap().clone())),
        );
        let want: Output = (
            whole.0.iter().filter(|c| c.0 >= at).cloned().collect(),
            whole.1.iter().filter(|c| c.0 >= at).cloned().collect(),
        );
        assert_eq!(
            restored.0, want.0,
            "seed {seed}, {workers} workers: changes after restoring at checkpoint {k}"
        );
        assert_eq!(
            restored.1, want.1,
            "seed {seed}, {workers} workers: journey output after restoring at checkpoint {k}"
        );
    }
}

#[test]
fn a_restored_dataflow_continues_exactly() {
    for seed in 0..4 {
        for workers in [1, 2] {
            check(seed, workers);
        }
    }
}

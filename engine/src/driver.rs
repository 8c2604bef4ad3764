//! Drives the segment dataflow over timely workers in event time.
//!
//! Owns [`run_dataflow`]: given a compiled plan, accepted events, profile snapshots and
//! static lists, it runs the dataflow on `workers` threads with the clock following event
//! timestamps (ms) up to `until`, and returns every membership change at or before
//! `until`, in a deterministic order.
//!
//! How the work is split: every worker walks the same time-ordered event list and the same
//! schedule of instants, so all advance their inputs in lockstep; each turns only its share
//! of events (every `peers`-th) into facts, so fact extraction runs in parallel, and the
//! dataflow exchanges facts to the worker that owns the user. Worker 0 alone feeds
//! snapshot diffs, the snapshot clock and static lists.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;

use differential_dataflow::input::InputSession;
use herald_operators::dataflow::build_segments;
use herald_operators::event::Event;
use herald_operators::plan::{FactVal, Plan, SegmentKind, SnapshotRows, TimedFact};
use herald_operators::time::{to_time, Time};
use indicatif::ProgressBar;
use timely::dataflow::operators::probe::Handle as ProbeHandle;

use crate::EngineError;

/// Updates fed between two waits for the dataflow to catch up: bounds the memory held in
/// input buffers while keeping enough work in flight for every worker.
pub const FEED_BATCH: usize = 32 * 1024;

/// One change of membership, as reported.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChangeRow {
    /// Instant of the change (ms).
    pub time: i64,
    /// Segment name.
    pub segment: String,
    /// User key.
    pub user_id: String,
    /// +1 entered, -1 left.
    pub diff: i64,
}

/// Everything a replay feeds into the dataflow.
pub struct DataflowInput {
    /// The compiled segment set.
    pub plan: Plan,
    /// Accepted, deduplicated events, in any order.
    pub events: Vec<Event>,
    /// Profile snapshots with the instant each is applied at.
    pub snapshots: Vec<(i64, SnapshotRows)>,
    /// Static list members by segment index.
    pub lists: BTreeMap<usize, BTreeSet<String>>,
    /// The last instant (ms) to compute.
    pub until: i64,
    /// Instant at which static lists are applied (the replay's start).
    pub lists_at: i64,
    /// Worker threads.
    pub workers: usize,
    /// Called once by worker 0 when the dataflow has caught up with `until`, while all
    /// its state is still live (benchmarks measure memory here).
    pub on_caught_up: Option<Arc<dyn Fn() + Send + Sync>>,
}

/// What the dataflow produced.
pub struct DataflowOutput {
    /// Changes at or before `until`, sorted by (time, segment, user, diff).
    pub changes: Vec<ChangeRow>,
    /// Events applied (at or before `until`).
    pub applied: u64,
    /// Events after `until`, not applied.
    pub after_until: u64,
}

/// A change as a worker captures it: (segment index, user, diff, time).
type RawChange = (u16, String, isize, Time);

/// A snapshot's facts, kept to diff the next snapshot against.
type SnapshotFacts = BTreeSet<(String, (u32, FactVal))>;

/// One scheduled input at an instant: an event (by index) or worker 0's snapshot or lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Item {
    Lists,
    Snapshot(usize),
    Event(usize),
}

/// Runs the dataflow; see the module docs.
pub fn run_dataflow(
    input: DataflowInput,
    progress: Option<ProgressBar>,
) -> Result<DataflowOutput, EngineError> {
    let DataflowInput {
        plan,
        events,
        mut snapshots,
        lists,
        until,
        lists_at,
        workers,
        on_caught_up,
    } = input;
    if workers == 0 {
        return Err(EngineError::Usage("--workers must be at least 1".into()));
    }
    snapshots.sort_by_key(|(at, _)| *at);
    // The schedule: every input item at its instant, in time order; ties keep
    // lists < snapshots < events so an event at a snapshot's instant sees that snapshot.
    let mut schedule: Vec<(i64, Item)> = Vec::with_capacity(events.len() + snapshots.len() + 1);
    let mut after_until = 0u64;
    for (i, e) in events.iter().enumerate() {
        if e.timestamp <= until {
            schedule.push((e.timestamp, Item::Event(i)));
        } else {
            after_until += 1;
        }
    }
    let applied = schedule.len() as u64;
    for (i, (at, _)) in snapshots.iter().enumerate() {
        if *at <= until {
            schedule.push((*at, Item::Snapshot(i)));
        }
    }
    if !lists.is_empty() {
        schedule.push((lists_at.min(until), Item::Lists));
    }
    schedule.sort_unstable();

    let names: Vec<String> = plan.segments.iter().map(|s| s.name.clone()).collect();
    let shared = Arc::new(Shared {
        plan,
        events,
        snapshots,
        lists,
        schedule,
        until,
    });
    let progress = Arc::new(progress);
    let on_caught_up = Arc::new(on_caught_up);
    let guards = timely::execute(timely::Config::process(workers), move |worker| {
        let shared = Arc::clone(&shared);
        let progress = Arc::clone(&progress);
        let on_caught_up = Arc::clone(&on_caught_up);
        let index = worker.index();
        let peers = worker.peers();
        let plan = Rc::new(shared.plan.clone());
        let out: Rc<RefCell<Vec<RawChange>>> = Rc::default();
        let sink = Rc::clone(&out);
        let limit = to_time(shared.until);
        let probe = ProbeHandle::new();
        let mut inputs = worker.dataflow::<Time, _, _>(|scope| {
            let (inputs, changes) = build_segments(scope, plan.clone());
            changes
                .inspect(move |((seg, user), t, r)| {
                    if *t <= limit {
                        sink.borrow_mut().push((*seg, user.clone(), *r, *t));
                    }
                })
                .probe_with(&probe);
            inputs
        });

        // No snapshot yet: every identify write is fresh against an instant before all time.
        if index == 0 {
            inputs.set_snapshot_clock(None, i64::MIN);
        }
        let mut facts: Vec<TimedFact> = Vec::new();
        let mut prev_snapshot: Option<(i64, SnapshotFacts)> = None;
        let mut fed = 0usize;
        let mut event_counter = 0usize;
        for &(at, item) in &shared.schedule {
            let t = to_time(at);
            if *inputs.facts.time() < t {
                inputs.advance_to(t);
            }
            match item {
                Item::Event(i) => {
                    event_counter += 1;
                    if event_counter % peers != index {
                        continue;
                    }
                    let ev = &shared.events[i];
                    facts.clear();
                    plan.event_facts(ev, &mut facts);
                    for f in facts.drain(..) {
                        inputs.facts.update(f, 1);
                        fed += 1;
                    }
                    for (slot, val) in plan.trait_writes(ev) {
                        inputs.writes.update(
                            (
                                ev.user.clone(),
                                slot,
                                ev.timestamp,
                                ev.message_id.clone(),
                                val,
                            ),
                            1,
                        );
                        fed += 1;
                    }
                    if index == 0 {
                        if let Some(p) = progress.as_ref() {
                            if event_counter.is_multiple_of(4096) {
                                p.set_position(event_counter as u64);
                            }
                        }
                    }
                }
                Item::Snapshot(i) if index == 0 => {
                    let (snap_at, rows) = &shared.snapshots[i];
                    let next = plan.snapshot_facts(rows);
                    let empty = BTreeSet::new();
                    let prev = prev_snapshot.as_ref().map(|(_, s)| s).unwrap_or(&empty);
                    for gone in prev.difference(&next) {
                        feed_fact(&mut inputs.facts, gone, t, -1);
                        fed += 1;
                    }
                    for new in next.difference(prev) {
                        feed_fact(&mut inputs.facts, new, t, 1);
                        fed += 1;
                    }
                    inputs.set_snapshot_clock(
                        Some(prev_snapshot.as_ref().map_or(i64::MIN, |(a, _)| *a)),
                        *snap_at,
                    );
                    prev_snapshot = Some((*snap_at, next));
                }
                Item::Lists if index == 0 => {
                    for (seg, members) in &shared.lists {
                        if let SegmentKind::List { slot, .. } = plan.segments[*seg].kind {
                            for user in members {
                                inputs
                                    .facts
                                    .update((user.clone(), (slot, FactVal::Unit), t, Time::MAX), 1);
                                fed += 1;
                            }
                        }
                    }
                }
                _ => {}
            }
            if fed >= FEED_BATCH {
                fed = 0;
                inputs.flush();
                let now = *inputs.facts.time();
                worker.step_while(|| probe.less_than(&now));
            }
        }
        // Run the clock past `until` so every lapse up to it is emitted, then stop: later
        // instants are not asked for, so the dataflow is dropped rather than drained.
        inputs.advance_to(limit + 1);
        inputs.flush();
        worker.step_while(|| probe.less_than(&(limit + 1)));
        if index == 0 {
            if let Some(hook) = on_caught_up.as_ref() {
                hook();
            }
        }
        for id in worker.installed_dataflows() {
            worker.drop_dataflow(id);
        }
        if index == 0 {
            if let Some(p) = progress.as_ref() {
                p.finish_and_clear();
            }
        }
        let result = out.borrow_mut().split_off(0);
        result
    })
    .map_err(|e| EngineError::Dataflow(e.to_string()))?;

    let mut raw: BTreeMap<(Time, u16, String), isize> = BTreeMap::new();
    for r in guards.join() {
        let part = r.map_err(|e| EngineError::Dataflow(e.to_string()))?;
        for (seg, user, diff, t) in part {
            *raw.entry((t, seg, user)).or_default() += diff;
        }
    }
    let mut changes: Vec<ChangeRow> = raw
        .into_iter()
        .filter(|(_, d)| *d != 0)
        .map(|((t, seg, user), d)| ChangeRow {
            time: t as i64,
            segment: names[seg as usize].clone(),
            user_id: user,
            diff: d as i64,
        })
        .collect();
    changes.sort();
    Ok(DataflowOutput {
        changes,
        applied,
        after_until,
    })
}

fn feed_fact(
    input: &mut InputSession<Time, TimedFact, isize>,
    (user, fact): &(String, (u32, FactVal)),
    t: Time,
    diff: isize,
) {
    input.update((user.clone(), fact.clone(), t, Time::MAX), diff);
}

struct Shared {
    plan: Plan,
    events: Vec<Event>,
    snapshots: Vec<(i64, SnapshotRows)>,
    lists: BTreeMap<usize, BTreeSet<String>>,
    schedule: Vec<(i64, Item)>,
    until: i64,
}

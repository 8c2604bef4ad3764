//! Drives the segment dataflow over timely workers in event time.
//!
//! Owns [`run_dataflow`]: given a compiled plan, accepted events, profile snapshots and
//! static lists, it runs the dataflow on `workers` threads with the clock following event
//! timestamps (ms) up to `until`, and returns every membership change at or before
//! `until`, in a deterministic order.
//!
//! How the work is split: each worker owns the events of the users whose hash lands on it
//! (the same hash the dataflow exchanges by, so nothing crosses threads on the way in) and
//! feeds them in time order; the input frontier is the slowest worker's. Worker 0 alone
//! feeds snapshot diffs, the snapshot clock and static lists.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use differential_dataflow::input::InputSession;
use herald_connectors::snapshot::merge_sorted;
use herald_operators::change::{consolidate, SegmentChange};
use herald_operators::dataflow::{
    build_segments, user_hash, Change, JourneyBytes, SegmentInputs, StateHandle, UserFact,
};
use herald_operators::event::Event;
use herald_operators::journey::{JOut, JourneyRow, JourneySet, MessageAction};
use herald_operators::plan::{FactVal, Plan, SegmentKind, SnapshotRows};
use herald_operators::project::Projected;
use herald_operators::state::{StateBytes, StateCounters};
use herald_operators::time::{to_time, Time};
use herald_operators::value::Value;
use indicatif::ProgressBar;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::{Inspect, Probe};

use crate::EngineError;

/// Updates fed between two waits for the dataflow to catch up: bounds the memory held in
/// input buffers while keeping enough work in flight for every worker.
pub const FEED_BATCH: usize = 128 * 1024;

/// Everything a replay feeds into the dataflow.
pub struct DataflowInput {
    /// The compiled segment set.
    pub plan: Plan,
    /// Accepted, deduplicated events, projected by `plan` ([`project_events`]), in any order.
    pub events: Vec<Projected>,
    /// Profile snapshots with the instant each is applied at.
    pub snapshots: Vec<(i64, Arc<SnapshotRows>)>,
    /// Static list members by segment index.
    pub lists: BTreeMap<usize, BTreeSet<String>>,
    /// The last instant (ms) to compute.
    pub until: i64,
    /// Instant at which static lists are applied (the replay's start).
    pub lists_at: i64,
    /// Worker threads.
    pub workers: usize,
    /// Journeys to run (their `plan` is the one above).
    pub journeys: Option<JourneySet>,
    /// Keep journey events and message actions (false: only count them, for benchmarks
    /// that measure the journeys' own state).
    pub keep_journey_output: bool,
    /// Called once by worker 0 when the dataflow has caught up with `until`, while all
    /// its state is still live (benchmarks measure memory here).
    pub on_caught_up: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Called by every worker when the dataflow has caught up with `until`, with its
    /// segment state (`herald explain` reads a user's there).
    pub inspect: Option<StateLook>,
}

/// A look at one worker's segment state once the dataflow has caught up.
pub type StateLook = Arc<dyn Fn(&StateHandle) + Send + Sync>;

/// What the dataflow produced.
pub struct DataflowOutput {
    /// Changes at or before `until`, sorted by (time, segment, user, diff).
    pub changes: Vec<SegmentChange>,
    /// Events applied (at or before `until`).
    pub applied: u64,
    /// Events after `until`, not applied.
    pub after_until: u64,
    /// Journey events at or before `until`, sorted by (time, journey, user, instance, seq).
    pub journey_rows: Vec<JourneyRow>,
    /// Message actions at or before `until`, sorted by (time, journey, user, message id).
    pub messages: Vec<MessageAction>,
    /// Journey events and message actions emitted (kept or not).
    pub journey_counts: (u64, u64),
    /// Segment state of all workers at `until`, counted from the state structures.
    pub state: StateBytes,
    /// All workers' segment state counters.
    pub counters: StateCounters,
    /// Journey state of all workers at `until`, counted from the structures.
    pub journey_bytes: JourneyBytes,
}

/// Worker 0's extra inputs at an instant: static lists or a snapshot (by index).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Extra {
    Lists,
    Snapshot(usize),
}

/// Projects whole events for [`DataflowInput::events`]: the events some journey listens
/// to keep their body.
pub fn project_events(
    plan: &Plan,
    journeys: Option<&JourneySet>,
    events: impl IntoIterator<Item = Event>,
) -> Vec<Projected> {
    events
        .into_iter()
        .map(|e| {
            let keep = journeys.is_some_and(|j| j.wants(&e));
            plan.project(e, keep)
        })
        .collect()
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
        journeys,
        keep_journey_output,
        on_caught_up,
        inspect,
    } = input;
    if workers == 0 {
        return Err(EngineError::Usage("--workers must be at least 1".into()));
    }
    snapshots.sort_by_key(|(at, _)| *at);
    // Each worker owns the events of the users whose hash lands on it, so the dataflow's
    // exchange keeps them local; each share is fed in time order.
    // Each event's owner is hashed once; the shares are sized from those owners, so no
    // share grows by copying. Events after `until` have no owner.
    let owners: Vec<Option<u32>> = events
        .iter()
        .map(|e| (e.timestamp <= until).then(|| (user_hash(&e.user) % workers as u64) as u32))
        .collect();
    let mut sizes = vec![0usize; workers];
    for w in owners.iter().flatten() {
        sizes[*w as usize] += 1;
    }
    let mut shares: Vec<Vec<Projected>> = sizes.iter().map(|&n| Vec::with_capacity(n)).collect();
    let applied = sizes.iter().sum::<usize>() as u64;
    let after_until = events.len() as u64 - applied;
    for (e, owner) in events.into_iter().zip(owners) {
        if let Some(w) = owner {
            shares[w as usize].push(e);
        }
    }
    // In the spec's event order, (timestamp, messageId): within an instant the order
    // still matters to floating-point sums, which must not depend on the order of lines
    // or files (message ids are compared only on timestamp ties, which are rare).
    for share in &mut shares {
        share.sort_by(|a, b| (a.timestamp, &a.message_id).cmp(&(b.timestamp, &b.message_id)));
    }
    let shares: Vec<Mutex<Vec<Projected>>> = shares.into_iter().map(Mutex::new).collect();
    // Worker 0's schedule of lists and snapshots; at equal instants lists, then
    // snapshots, then events, so an event at a snapshot's instant sees that snapshot.
    let mut extras: Vec<(i64, Extra)> = snapshots
        .iter()
        .enumerate()
        .filter(|(_, (at, _))| *at <= until)
        .map(|(i, (at, _))| (*at, Extra::Snapshot(i)))
        .collect();
    if !lists.is_empty() {
        extras.push((lists_at.min(until), Extra::Lists));
    }
    extras.sort_unstable();

    let names: Vec<String> = plan.segments.iter().map(|s| s.name.clone()).collect();
    let shared = Arc::new(Shared {
        plan,
        journeys,
        shares,
        snapshots,
        lists,
        extras,
        until,
    });
    let progress = Arc::new(progress);
    let on_caught_up = Arc::new(on_caught_up);
    let inspect = Arc::new(inspect);
    let guards = timely::execute(timely::Config::process(workers), move |worker| {
        let shared = Arc::clone(&shared);
        let progress = Arc::clone(&progress);
        let on_caught_up = Arc::clone(&on_caught_up);
        let inspect = Arc::clone(&inspect);
        let index = worker.index();
        let plan = Rc::new(shared.plan.clone());
        let journeys = shared.journeys.clone().map(Rc::new);
        let out: Rc<RefCell<Vec<(Change, Time, isize)>>> = Rc::default();
        let sink = Rc::clone(&out);
        let jout: Rc<RefCell<Vec<JOut>>> = Rc::default();
        let jsink = Rc::clone(&jout);
        let jcount: Rc<RefCell<(u64, u64)>> = Rc::default();
        let jcounter = Rc::clone(&jcount);
        let limit = to_time(shared.until);
        let probe = ProbeHandle::new();
        let mut state = None;
        let mut journey_state = None;
        let mut inputs = worker.dataflow::<Time, _, _>(|scope| {
            // Replay input is deduplicated by the reader (the same rule), so the state need not.
            let (inputs, outputs) = build_segments(scope, plan.clone(), -1, journeys);
            state = Some(outputs.state);
            journey_state = outputs.journey_state;
            outputs
                .changes
                .inspect(move |(change, t, r)| {
                    if *t <= limit {
                        sink.borrow_mut().push((change.clone(), *t, *r));
                    }
                })
                .probe_with(&probe);
            if let Some(j) = outputs.journeys {
                j.inspect(move |o| {
                    let (t, message) = match o {
                        JOut::Row(r) => (r.time, false),
                        JOut::Message(m) => (m.time, true),
                        JOut::Write(..) => return,
                    };
                    if t <= limit as i64 {
                        let mut c = jcounter.borrow_mut();
                        if message {
                            c.1 += 1;
                        } else {
                            c.0 += 1;
                        }
                        if keep_journey_output {
                            jsink.borrow_mut().push(o.clone());
                        }
                    }
                })
                .probe_with(&probe);
            }
            inputs
        });

        // No snapshot yet: every identify write is fresh against an instant before all time.
        if index == 0 {
            inputs.set_snapshot_clock(None, i64::MIN);
        }
        let my_events = match shared.shares[index].lock() {
            Ok(mut share) => std::mem::take(&mut *share),
            Err(_) => Vec::new(),
        };
        let my_extras: &[(i64, Extra)] = if index == 0 { &shared.extras } else { &[] };
        let mut extras = my_extras.iter().peekable();
        let mut snapshots = SnapshotFeeder::default();
        let mut fed = 0usize;
        let mut counter = 0u64;
        let mut feed_extra = |inputs: &mut SegmentInputs, extra: Extra, fed: &mut usize| match extra
        {
            Extra::Snapshot(i) => {
                let (snap_at, rows) = &shared.snapshots[i];
                *fed += snapshots.apply(&plan, inputs, *snap_at, Arc::clone(rows));
            }
            Extra::Lists => *fed += feed_lists(&plan, inputs, &shared.lists),
        };
        for ev in my_events {
            while let Some(&&(at, extra)) = extras.peek().filter(|(at, _)| *at <= ev.timestamp) {
                extras.next();
                advance(&mut inputs, to_time(at));
                feed_extra(&mut inputs, extra, &mut fed);
            }
            // Each event carries its own instant; the inputs' timely time only moves at
            // batch boundaries (below), so the dataflow sees one message per batch rather
            // than one per instant. Shares are sorted, so `t` is never behind the inputs.
            let t = to_time(ev.timestamp).max(*inputs.events.time());
            inputs.events.update_at(ev, t, 1);
            fed += 1;
            counter += 1;
            if index == 0 && counter.is_multiple_of(4096) {
                if let Some(p) = progress.as_ref() {
                    // Worker 0 sees about 1/peers of the events.
                    p.set_position(counter * worker.peers() as u64);
                }
            }
            if fed >= FEED_BATCH {
                fed = 0;
                advance(&mut inputs, t);
                inputs.flush();
                let now = *inputs.facts.time();
                worker.step_while(|| probe.less_than(&now));
            }
        }
        for &(at, extra) in extras {
            advance(&mut inputs, to_time(at));
            feed_extra(&mut inputs, extra, &mut fed);
        }
        // Run the clock past `until` so every lapse up to it is emitted, then stop: later
        // instants are not asked for, so the dataflow is dropped rather than drained.
        inputs.advance_to(limit + 1);
        inputs.flush();
        worker.step_while(|| probe.less_than(&(limit + 1)));
        let (bytes, counters) = state
            .as_ref()
            .map(|s| (s.bytes(), s.counters()))
            .unwrap_or_default();
        let jbytes = journey_state
            .as_ref()
            .map(|j| j.bytes())
            .unwrap_or_default();
        if index == 0 {
            if let Some(hook) = on_caught_up.as_ref() {
                hook();
            }
        }
        if let (Some(look), Some(st)) = (inspect.as_ref(), state.as_ref()) {
            look(st);
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
        let journey_out = jout.borrow_mut().split_off(0);
        let counts = *jcount.borrow();
        (result, journey_out, counts, (bytes, jbytes), counters)
    })
    .map_err(|e| EngineError::Dataflow(e.to_string()))?;

    let mut changes: Vec<SegmentChange> = Vec::new();
    let mut journey_rows = Vec::new();
    let mut messages = Vec::new();
    let mut journey_counts = (0, 0);
    let mut state = StateBytes::default();
    let mut journey_bytes = JourneyBytes::default();
    let mut counters = StateCounters::default();
    for r in guards.join() {
        let (part, journey_part, counts, (bytes, jbytes), c) =
            r.map_err(|e| EngineError::Dataflow(e.to_string()))?;
        state.add(&bytes);
        journey_bytes.add(&jbytes);
        counters.add(&c);
        journey_counts.0 += counts.0;
        journey_counts.1 += counts.1;
        changes.reserve(part.len());
        changes.extend(
            part.into_iter()
                .map(|((seg, user), t, diff)| SegmentChange {
                    segment: names[seg as usize].clone(),
                    user_id: user,
                    diff: diff as i64,
                    time: t as i64,
                }),
        );
        for o in journey_part {
            match o {
                JOut::Row(r) => journey_rows.push(r),
                JOut::Message(m) => messages.push(m),
                JOut::Write(..) => {}
            }
        }
    }
    journey_rows.sort();
    messages.sort_by(|a, b| {
        (a.time, &a.journey, &a.user_id, &a.message_id).cmp(&(
            b.time,
            &b.journey,
            &b.user_id,
            &b.message_id,
        ))
    });
    consolidate(&mut changes);
    Ok(DataflowOutput {
        changes,
        applied,
        after_until,
        journey_rows,
        messages,
        journey_counts,
        state,
        counters,
        journey_bytes,
    })
}

/// Feeds profile snapshots as diffs of their facts: each snapshot retracts the facts of
/// the previous one that it no longer has and adds the new ones, at the inputs' current
/// time, and moves the snapshot clock. Rows are compared user by user (both snapshots
/// are sorted by user), and facts are computed only for the users whose row changed, so
/// a refresh that changes 1% of rows costs one pass of row comparisons plus 1% of the
/// fact work.
#[derive(Default)]
pub struct SnapshotFeeder {
    prev: Option<(i64, Arc<SnapshotRows>)>,
}

impl SnapshotFeeder {
    /// A feeder whose last applied snapshot was `prev` (restored from a checkpoint).
    pub fn restored(prev: Option<(i64, Arc<SnapshotRows>)>) -> SnapshotFeeder {
        SnapshotFeeder { prev }
    }

    /// The last applied snapshot.
    pub fn prev(&self) -> Option<&(i64, Arc<SnapshotRows>)> {
        self.prev.as_ref()
    }

    /// Feeds the last applied snapshot's cells of trait `slots` alone: the traits a
    /// changed segment file reads and the restored state lacks (its other cells are in
    /// the state already). Returns the number of updates fed.
    pub fn feed_new_traits(&self, plan: &Plan, inputs: &mut SegmentInputs, slots: &[u32]) -> usize {
        let Some((_, rows)) = &self.prev else {
            return 0;
        };
        let mut fed = 0;
        for (user, cells) in rows.iter() {
            for fact in plan.snapshot_facts(cells) {
                if slots.contains(&fact.0) {
                    feed_fact(&mut inputs.facts, user, &fact, 1);
                    fed += 1;
                }
            }
        }
        fed
    }

    /// Applies the snapshot taken at `at` (ms); returns the number of updates fed.
    pub fn apply(
        &mut self,
        plan: &Plan,
        inputs: &mut SegmentInputs,
        at: i64,
        rows: Arc<SnapshotRows>,
    ) -> usize {
        let empty = SnapshotRows::new();
        let prev = self.prev.as_ref().map_or(&empty, |(_, r)| &**r);
        let mut fed = 0;
        for (user, before, after) in merge_sorted(prev, &rows) {
            if before == after {
                continue; // an unchanged row costs no fact work
            }
            let facts = |cells: Option<&BTreeMap<String, Value>>| {
                cells.map(|c| plan.snapshot_facts(c)).unwrap_or_default()
            };
            let (old, new) = (facts(before), facts(after));
            for (from, to, diff) in [(&old, &new, -1), (&new, &old, 1)] {
                for fact in from.iter().filter(|f| to.binary_search(f).is_err()) {
                    feed_fact(&mut inputs.facts, user, fact, diff);
                    fed += 1;
                }
            }
        }
        inputs.set_snapshot_clock(Some(self.prev.as_ref().map_or(i64::MIN, |(a, _)| *a)), at);
        self.prev = Some((at, rows));
        fed
    }
}

/// Feeds the difference between static list memberships `before` (as a checkpoint
/// holds them) and `after` (the files now): a list file edited between runs.
pub fn feed_list_changes(
    plan: &Plan,
    inputs: &mut SegmentInputs,
    before: &BTreeMap<usize, BTreeSet<String>>,
    after: &BTreeMap<usize, BTreeSet<String>>,
) -> usize {
    let empty = BTreeSet::new();
    let mut fed = 0;
    let segs: BTreeSet<usize> = before.keys().chain(after.keys()).copied().collect();
    for seg in segs {
        let Some(SegmentKind::List { slot, .. }) = plan.segments.get(seg).map(|s| &s.kind) else {
            continue;
        };
        let (b, a) = (
            before.get(&seg).unwrap_or(&empty),
            after.get(&seg).unwrap_or(&empty),
        );
        for (from, to, diff) in [(b, a, -1), (a, b, 1)] {
            for user in from.difference(to) {
                inputs
                    .facts
                    .update((user.clone(), (*slot, FactVal::Unit)), diff);
                fed += 1;
            }
        }
    }
    fed
}

/// Feeds static list members as facts, from the inputs' current instant on; returns the number fed.
pub fn feed_lists(
    plan: &Plan,
    inputs: &mut SegmentInputs,
    lists: &BTreeMap<usize, BTreeSet<String>>,
) -> usize {
    let mut fed = 0;
    for (seg, members) in lists {
        if let SegmentKind::List { slot, .. } = plan.segments[*seg].kind {
            for user in members {
                inputs
                    .facts
                    .update((user.clone(), (slot, FactVal::Unit)), 1);
                fed += 1;
            }
        }
    }
    fed
}

/// Feeds warehouse audience results as diffs: each result of a segment's query retracts
/// the members of its last one that it no longer has and adds the new ones, at the
/// inputs' current time (the instant the result arrived).
#[derive(Default)]
pub struct AudienceFeeder {
    prev: BTreeMap<usize, BTreeSet<String>>,
}

impl AudienceFeeder {
    /// A feeder whose last results were `prev` (restored from a checkpoint).
    pub fn restored(prev: BTreeMap<usize, BTreeSet<String>>) -> AudienceFeeder {
        AudienceFeeder { prev }
    }

    /// The last result of each audience.
    pub fn prev(&self) -> &BTreeMap<usize, BTreeSet<String>> {
        &self.prev
    }

    /// Applies segment `seg`'s new member set; returns `(entered, left)`. A segment that
    /// is not a warehouse audience is ignored.
    pub fn apply(
        &mut self,
        plan: &Plan,
        inputs: &mut SegmentInputs,
        seg: usize,
        members: BTreeSet<String>,
    ) -> (usize, usize) {
        let Some(SegmentKind::Warehouse { slot, .. }) = plan.segments.get(seg).map(|s| &s.kind)
        else {
            return (0, 0);
        };
        let prev = self.prev.entry(seg).or_default();
        let mut left = 0;
        let fact = (*slot, FactVal::Unit);
        for gone in prev.difference(&members) {
            feed_fact(&mut inputs.facts, gone, &fact, -1);
            left += 1;
        }
        let mut entered = 0;
        for new in members.difference(prev) {
            feed_fact(&mut inputs.facts, new, &fact, 1);
            entered += 1;
        }
        *prev = members;
        (entered, left)
    }
}

/// Feeds `diff` of a user's fact, from the inputs' current instant on.
fn feed_fact(
    input: &mut InputSession<Time, UserFact, isize>,
    user: &str,
    fact: &(u32, FactVal),
    diff: isize,
) {
    input.update((user.to_string(), fact.clone()), diff);
}

struct Shared {
    plan: Plan,
    journeys: Option<JourneySet>,
    shares: Vec<Mutex<Vec<Projected>>>,
    snapshots: Vec<(i64, Arc<SnapshotRows>)>,
    lists: BTreeMap<usize, BTreeSet<String>>,
    extras: Vec<(i64, Extra)>,
    until: i64,
}

/// Advances every input to `t` if it is not there yet.
fn advance(inputs: &mut SegmentInputs, t: Time) {
    if *inputs.facts.time() < t {
        inputs.advance_to(t);
    }
}

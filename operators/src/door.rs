//! The door: turns a user's append-only event stream into the facts the segments read,
//! keeping running accumulators for aggregates that never forget.
//!
//! Owns [`facts_at_the_door`], a timely operator keyed by user. For every aggregate without
//! a time window — `sum`, `avg`, `min`, `max`, `first`, `last` — only the running value can
//! matter, because events are never retracted. Storing one fact per event in the
//! arrangement would make each user's reduce input grow with their history; instead the
//! door keeps the running value per (user, aggregate) and emits `-old +new` when it moves,
//! so the arrangement holds one fact per user and aggregate. Likewise only the latest
//! identify write per (user, trait) is passed on. Counts (which consolidate by themselves),
//! distinct counts and every windowed aggregate go through as facts, so windows still
//! retract at exact instants.
//!
//! Invariants: input records are processed in time order (stashed until the frontier
//! passes them; ties broken by message id), so the emitted collection at every time equals
//! the aggregate of the events at or before it, independent of arrival order and of the
//! worker count. Redelivered events (same user and `messageId` within the dedup horizon)
//! are dropped here, so at-least-once sources are harmless. Events must only be inserted (positive diffs); a retraction cannot be
//! undone from a running value and is counted in [`RETRACTED_EVENTS`] and ignored.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use differential_dataflow::{AsCollection, VecCollection};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;

use crate::ast::AggKind;
use crate::dataflow::TraitWrite;
use crate::event::Event;
use crate::journey::JourneySet;
use crate::plan::{type_rank, FactVal, Plan, TimedFact};
use crate::time::Time;
use crate::value::Value;

/// Event retractions seen by the door (events are append-only; these are ignored).
pub static RETRACTED_EVENTS: AtomicU64 = AtomicU64::new(0);

/// Duplicate events dropped by the door (same user and `messageId` within the horizon).
pub static DUPLICATE_EVENTS: AtomicU64 = AtomicU64::new(0);

/// Remembers `(user, messageId)` pairs seen within the dedup horizon, per worker.
///
/// A message is a duplicate when the same user sent the same id with a timestamp at most
/// `horizon_ms` away. Entries are forgotten once the dataflow clock is a horizon past
/// the instant they *arrived* (checked every few thousand admissions), so memory is
/// bounded by the events of one horizon, and old-timestamped events (a rebuild from a
/// topic's start) are remembered as long as fresh ones. A negative horizon disables it.
/// Keys are 128-bit xxh3 hashes; values are (event timestamp, arrival instant).
struct DoorDedup {
    horizon_ms: i64,
    seen: HashMap<u128, (i64, Time)>,
    since_prune: usize,
}

impl DoorDedup {
    fn admit(&mut self, ev: &Event, now: Time) -> bool {
        if self.horizon_ms < 0 {
            return true;
        }
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(ev.user.as_bytes());
        h.update(&[0]);
        h.update(ev.message_id.as_bytes());
        let key = h.digest128();
        if let Some((first, _)) = self.seen.get(&key) {
            if ev.timestamp.abs_diff(*first) <= self.horizon_ms as u64 {
                return false;
            }
        }
        self.seen.insert(key, (ev.timestamp, now));
        self.since_prune += 1;
        if self.since_prune >= 4096.max(self.seen.len()) {
            self.since_prune = 0;
            let cutoff = now.saturating_sub(self.horizon_ms as u64);
            self.seen.retain(|_, (_, arrived)| *arrived >= cutoff);
        }
        true
    }
}

/// The hash that places a user's state on a worker. Readers that split events by this
/// hash modulo the worker count keep the door's exchange local.
pub fn user_hash(user: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(user.as_bytes())
}

/// A running accumulator for one (user, aggregate).
#[derive(Clone, Debug, PartialEq)]
enum Acc {
    Sum(f64),
    Avg(f64, f64),
    /// Min or max: the best value of the highest-ranked type seen.
    Extreme(Value),
    /// First or last: `(timestamp, message id, value)`.
    Ordered(i64, String, Value),
}

impl Acc {
    fn fact(&self) -> FactVal {
        match self {
            Acc::Sum(s) => FactVal::Val(Value::num(*s)),
            Acc::Avg(s, n) => FactVal::Val(Value::num(s / n)),
            Acc::Extreme(v) => FactVal::Val(v.clone()),
            Acc::Ordered(t, m, v) => FactVal::Ordered(*t, m.clone(), v.clone()),
        }
    }
}

/// Folds one event's contribution into an accumulator; returns the new accumulator.
fn fold(kind: AggKind, acc: Option<&Acc>, ev: &Event, v: Value) -> Option<Acc> {
    match kind {
        AggKind::Sum | AggKind::Avg => {
            let x = v.as_f64()?;
            Some(match (kind, acc) {
                (AggKind::Sum, Some(Acc::Sum(s))) => Acc::Sum(s + x),
                (AggKind::Sum, _) => Acc::Sum(x),
                (_, Some(Acc::Avg(s, n))) => Acc::Avg(s + x, n + 1.0),
                _ => Acc::Avg(x, 1.0),
            })
        }
        AggKind::Min | AggKind::Max => {
            if v.is_null() {
                return None;
            }
            match acc {
                Some(Acc::Extreme(cur)) => {
                    let better = match type_rank(&v).cmp(&type_rank(cur)) {
                        std::cmp::Ordering::Greater => true,
                        std::cmp::Ordering::Less => false,
                        std::cmp::Ordering::Equal if kind == AggKind::Min => v < *cur,
                        std::cmp::Ordering::Equal => v > *cur,
                    };
                    better.then_some(Acc::Extreme(v))
                }
                _ => Some(Acc::Extreme(v)),
            }
        }
        AggKind::First | AggKind::Last => {
            let key = (ev.timestamp, ev.message_id.as_str());
            match acc {
                Some(Acc::Ordered(t, m, _)) => {
                    let cur = (*t, m.as_str());
                    let better = if kind == AggKind::First {
                        key < cur
                    } else {
                        key > cur
                    };
                    better.then(|| Acc::Ordered(ev.timestamp, ev.message_id.clone(), v))
                }
                _ => Some(Acc::Ordered(ev.timestamp, ev.message_id.clone(), v)),
            }
        }
        AggKind::Count => None,
    }
}

/// What the door emits: facts for the arrangement, trait writes for the clock join, and
/// the accepted events the journeys listen to.
#[derive(Clone, Debug, PartialEq)]
pub enum DoorOut {
    /// A fact with its validity interval.
    Fact(TimedFact),
    /// A trait write.
    Write(TraitWrite),
    /// An accepted (deduplicated) event for the journey operator.
    Event(Event),
}

/// Per-user state at the door: one slot per accumulated aggregate, one per trait.
#[derive(Default)]
struct UserDoor {
    accs: Vec<Option<Acc>>,
    writes: Vec<Option<TraitState>>,
}

/// The state a (user, instant) group found before its first event touched each slot.
struct Group {
    user: String,
    time: Time,
    accs: Vec<(usize, Option<Acc>)>,
    writes: Vec<(usize, Option<TraitState>)>,
}

/// The latest identify write of a trait: `(timestamp, message id, value)`.
type TraitState = (i64, String, Value);

impl Group {
    /// Emits `-before +after` for every slot the group moved.
    fn emit(
        self,
        users: &HashMap<String, UserDoor>,
        plan: &Plan,
        accumulated: &[usize],
        give: &mut dyn FnMut(DoorOut, Time, isize),
    ) {
        let Some(state) = users.get(&self.user) else {
            return;
        };
        let t = self.time;
        for (k, prev) in self.accs {
            let slot = plan.agg_slot(accumulated[k]);
            let now = state.accs[k].as_ref().map(Acc::fact);
            let before = prev.as_ref().map(Acc::fact);
            if now == before {
                continue;
            }
            if let Some(b) = before {
                give(
                    DoorOut::Fact((self.user.clone(), (slot, b), t, Time::MAX)),
                    t,
                    -1,
                );
            }
            if let Some(n) = now {
                give(
                    DoorOut::Fact((self.user.clone(), (slot, n), t, Time::MAX)),
                    t,
                    1,
                );
            }
        }
        for (k, prev) in self.writes {
            let slot = plan.trait_slot(k);
            if let Some((ts, msg, v)) = prev {
                give(DoorOut::Write((self.user.clone(), slot, ts, msg, v)), t, -1);
            }
            if let Some((ts, msg, v)) = state.writes[k].clone() {
                give(DoorOut::Write((self.user.clone(), slot, ts, msg, v)), t, 1);
            }
        }
    }
}

/// Builds the door operator; see the module docs.
pub fn facts_at_the_door<'s>(
    events: VecCollection<'s, Time, Event, isize>,
    plan: Rc<Plan>,
    dedup_horizon_ms: i64,
    journeys: Option<Rc<JourneySet>>,
) -> VecCollection<'s, Time, DoorOut, isize> {
    let accumulated: Vec<usize> = (0..plan.aggs.len())
        .filter(|&i| plan.accumulated_at_door(i))
        .collect();
    let n_traits = plan.traits.len();
    events
        .inner
        .unary_frontier(
            Exchange::new(|(e, _, _): &(Event, Time, isize)| user_hash(&e.user)),
            "facts_at_the_door",
            move |_cap, _info| {
                let mut stash: Vec<(Event, Time, isize)> = Vec::new();
                let mut cap: Option<Capability<Time>> = None;
                let mut users: HashMap<String, UserDoor> = HashMap::new();
                let mut facts: Vec<TimedFact> = Vec::new();
                let mut args: Vec<(usize, Value)> = Vec::new();
                let mut dedup = DoorDedup {
                    horizon_ms: dedup_horizon_ms,
                    seen: HashMap::new(),
                    since_prune: 0,
                };
                move |(input, frontier), output| {
                    input.for_each_stamp(|c, data| {
                        if let Some(c) = c.retain_least(output.output_index()) {
                            if cap.as_ref().is_none_or(|k| c.time() < k.time()) {
                                cap = Some(c);
                            }
                        }
                        for batch in data {
                            stash.append(batch);
                        }
                    });
                    let Some(c) = cap.as_mut() else { return };
                    // Nothing is ready until the frontier passes the earliest stashed
                    // instant (the capability's): skip the sort until then.
                    if frontier.less_equal(c.time()) {
                        return;
                    }
                    stash.sort_unstable_by(|a, b| {
                        (a.1, &a.0.user, &a.0.message_id).cmp(&(b.1, &b.0.user, &b.0.message_id))
                    });
                    let ready = stash.partition_point(|(_, t, _)| !frontier.less_equal(t));
                    let mut session = output.session(&*c);
                    // The net change of the current (user, instant) group: emitted as soon
                    // as the group ends, before any later event of that user moves the state.
                    let mut group: Option<Group> = None;
                    for (ev, t, r) in stash.drain(..ready) {
                        if r <= 0 {
                            RETRACTED_EVENTS.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        if !dedup.admit(&ev, t) {
                            DUPLICATE_EVENTS.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        if group
                            .as_ref()
                            .is_some_and(|g| g.user != ev.user || g.time != t)
                        {
                            if let Some(g) = group.take() {
                                g.emit(&users, &plan, &accumulated, &mut |d, t, r| {
                                    session.give((d, t, r))
                                });
                            }
                        }
                        if journeys.as_ref().is_some_and(|j| j.wants(&ev)) {
                            session.give((DoorOut::Event(ev.clone()), t, r));
                        }
                        facts.clear();
                        plan.event_facts(&ev, &mut facts);
                        for f in facts.drain(..) {
                            session.give((DoorOut::Fact(f), t, r));
                        }
                        let state = users.entry(ev.user.clone()).or_insert_with(|| UserDoor {
                            accs: vec![None; accumulated.len()],
                            writes: vec![None; n_traits],
                        });
                        let g = group.get_or_insert_with(|| Group {
                            user: ev.user.clone(),
                            time: t,
                            accs: Vec::new(),
                            writes: Vec::new(),
                        });
                        args.clear();
                        plan.door_args(&ev, &accumulated, &mut args);
                        for (k, v) in args.drain(..) {
                            let kind = plan.aggs[accumulated[k]].agg.kind;
                            if let Some(next) = fold(kind, state.accs[k].as_ref(), &ev, v) {
                                let prev = state.accs[k].replace(next);
                                if !g.accs.iter().any(|(j, _)| *j == k) {
                                    g.accs.push((k, prev));
                                }
                            }
                        }
                        for (slot, val) in plan.trait_writes(&ev) {
                            let k = plan.trait_of_slot(slot);
                            let newer = state.writes[k].as_ref().is_none_or(|(ts, msg, _)| {
                                (ev.timestamp, ev.message_id.as_str()) > (*ts, msg.as_str())
                            });
                            if newer {
                                let prev = state.writes[k].replace((
                                    ev.timestamp,
                                    ev.message_id.clone(),
                                    val,
                                ));
                                if !g.writes.iter().any(|(j, _)| *j == k) {
                                    g.writes.push((k, prev));
                                }
                            }
                        }
                    }
                    if let Some(g) = group.take() {
                        g.emit(&users, &plan, &accumulated, &mut |d, t, r| {
                            session.give((d, t, r))
                        });
                    }
                    drop(session);
                    match stash.iter().map(|(_, t, _)| *t).min() {
                        Some(t) => c.downgrade(&t),
                        None => cap = None,
                    }
                }
            },
        )
        .as_collection()
}

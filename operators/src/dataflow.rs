//! The segment dataflow: timely/differential operators that keep membership exact.
//!
//! Shape (every operator named):
//!
//! ```text
//! events --door (running values, latest trait writes; see `door`)--┐
//! facts (user, slot, value, [from, until)) --temporal--> (user, (slot, value))  ──┐
//! door's trait writes (user, slot, ts, msg, value) ──join── snapshot clock ───────┤
//!                                                                                 ▼
//!                         arrangement "events_by_user" (one per worker, all segments)
//!                                                                                 │
//!                           reduce "segment_membership": Plan::evaluate_user      │
//!                                                                                 ▼
//!         (user, membership intervals) --temporal--> consolidate --> (segment, user) ±1
//! ```
//!
//! Invariants: all data is keyed by user, so each user's state lives on exactly one worker
//! (exchange by hash of the user key), in one process or across a timely cluster. Facts
//! and memberships carry explicit instants; the two temporal operators turn them into
//! updates at those instants (possibly in the future), which differential holds until the
//! frontier reaches them. So a fact leaving a 7-day window is retracted at exactly t+7d
//! with no new input, as soon as the input frontier passes that instant.
//!
//! Does not own input (see the engine's replay driver) or output formatting.

use std::rc::Rc;

use differential_dataflow::input::{Input, InputSession};
use differential_dataflow::{AsCollection, VecCollection};
use serde::{Deserialize, Serialize};
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{ConnectLoop, Feedback};
use timely::dataflow::{Scope, Stream};

use crate::door::{facts_at_the_door, DoorOut};
use crate::event::Event;
use crate::journey::machine::{JIn, JOut};
use crate::journey::operator::run_journeys;
use crate::journey::JourneySet;
use crate::plan::{FactVal, Plan, TimedFact};
use crate::time::Time;
use crate::value::Value;

/// Number of buckets the snapshot clock is replicated into, so that joining trait writes
/// with it spreads over workers instead of landing on the one worker that owns key `()`.
pub const CLOCK_BUCKETS: u32 = 64;

/// An identify trait write: `(user, trait slot, timestamp, message id, value)`.
pub type TraitWrite = (String, u32, i64, String, Value);

/// A change of membership: `(segment index, user)`, with the diff on the update.
pub type Change = (u16, String);

/// The input handles of the segment dataflow.
pub struct SegmentInputs {
    /// Accepted events (insert only: events are never retracted).
    pub events: InputSession<Time, Event, isize>,
    /// Facts from snapshot cells, profile presence and lists, with their validity interval.
    pub facts: InputSession<Time, TimedFact, isize>,
    /// The current snapshot's instant, replicated into [`CLOCK_BUCKETS`] rows.
    pub clock: InputSession<Time, (u32, i64), isize>,
}

impl SegmentInputs {
    /// Advances every input to `t`.
    pub fn advance_to(&mut self, t: Time) {
        self.events.advance_to(t);
        self.facts.advance_to(t);
        self.clock.advance_to(t);
    }

    /// Flushes buffered updates into the dataflow.
    pub fn flush(&mut self) {
        self.events.flush();
        self.facts.flush();
        self.clock.flush();
    }

    /// Sets the snapshot clock from `old` (None: no snapshot yet) to `new`, at the inputs'
    /// current time.
    pub fn set_snapshot_clock(&mut self, old: Option<i64>, new: i64) {
        for b in 0..CLOCK_BUCKETS {
            if let Some(o) = old {
                self.clock.update((b, o), -1);
            }
            self.clock.update((b, new), 1);
        }
    }
}

/// Which clock bucket a user's trait writes join in.
pub fn clock_bucket(user: &str) -> u32 {
    (xxhash_rust::xxh3::xxh3_64(user.as_bytes()) % CLOCK_BUCKETS as u64) as u32
}

/// Turns `(data, [from, until))` records into updates at `from` and `until`: the
/// temporal filter. An update at time `t` with diff `r` contributes `r` over
/// `[max(from, t), until)`.
fn temporal<'s, D, F>(
    input: VecCollection<'s, Time, D, isize>,
    mut split: F,
) -> VecCollection<'s, Time, <F as SplitOut<D>>::Out, isize>
where
    D: Clone + 'static,
    F: SplitOut<D> + 'static,
{
    input
        .inner
        .flat_map(move |(d, t, r)| {
            let mut out = Vec::with_capacity(2);
            split.split(d, &mut |data, from, until| {
                let start = from.max(t);
                if until > start {
                    if until != Time::MAX {
                        out.push((data.clone(), until, -r));
                    }
                    out.push((data, start, r));
                }
            });
            out
        })
        .as_collection()
}

/// Splits a record into `(data, from, until)` triples for [`temporal`].
trait SplitOut<D> {
    type Out: Clone + 'static;
    fn split(&mut self, d: D, emit: &mut dyn FnMut(Self::Out, Time, Time));
}

struct FactSplit;
impl SplitOut<TimedFact> for FactSplit {
    type Out = (String, (u32, FactVal));
    fn split(
        &mut self,
        (user, fact, from, until): TimedFact,
        emit: &mut dyn FnMut(Self::Out, Time, Time),
    ) {
        emit((user, fact), from, until)
    }
}

struct MembershipSplit;
impl SplitOut<(String, (u16, Time, Time))> for MembershipSplit {
    type Out = Change;
    fn split(
        &mut self,
        (user, (seg, from, until)): (String, (u16, Time, Time)),
        emit: &mut dyn FnMut(Change, Time, Time),
    ) {
        emit((seg, user), from, until)
    }
}

/// What reduce "segment_membership" says about a user.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum UserOut {
    /// A membership interval `(segment, from, until)`.
    Member(u16, Time, Time),
    /// The current value of an exposed trait (position in `Plan::exposed`).
    Trait(u16, Value),
}

/// The segment dataflow's outputs.
pub struct SegmentOutputs<'s> {
    /// Consolidated changes of the user's (visible) segments.
    pub changes: VecCollection<'s, Time, Change, isize>,
    /// What the journeys emit, when there are journeys.
    pub journeys: Option<Stream<'s, Time, Vec<JOut>>>,
}

/// Builds the segment dataflow for `plan` in `scope`, dropping events whose user and
/// `messageId` repeat within `dedup_horizon_ms` (negative: no dedup). With `journeys`
/// (whose `plan` must be the one given here) the journey operator runs on the same
/// state, and its `update_trait` writes loop back to the door one millisecond later.
/// Returns the inputs and the outputs.
pub fn build_segments<'s>(
    scope: Scope<'s, Time>,
    plan: Rc<Plan>,
    dedup_horizon_ms: i64,
    journeys: Option<Rc<JourneySet>>,
) -> (SegmentInputs, SegmentOutputs<'s>) {
    let (events_in, events) = scope.new_collection::<Event, isize>();
    let (facts_in, facts) = scope.new_collection::<TimedFact, isize>();
    let (clock_in, clock) = scope.new_collection::<(u32, i64), isize>();

    // update_trait writes come back as identify events, one millisecond later. The loop
    // makes every instant wait for the journeys to finish the one before (a write at t is
    // an input at t + 1), so it is built only when some journey writes traits.
    let (feedback, events) = match &journeys {
        Some(set) if set.writes_traits() => {
            let (handle, cycle) = scope.feedback::<Vec<(Event, Time, isize)>>(1);
            (Some(handle), events.concat(cycle.as_collection()))
        }
        _ => (None, events),
    };
    let door = facts_at_the_door(events, plan.clone(), dedup_horizon_ms, journeys.clone());
    let event_facts = door.clone().flat_map(|d| match d {
        DoorOut::Fact(f) => Some(f),
        _ => None,
    });
    let journey_events = door.clone().flat_map(|d| match d {
        DoorOut::Event(e) => Some((e.user.clone(), JIn::Event(e))),
        _ => None,
    });
    let writes = door.flat_map(|d| match d {
        DoorOut::Write(w) => Some(w),
        _ => None,
    });
    let facts = temporal(facts.concat(event_facts), FactSplit);

    // A write is fresh while no snapshot at or after its instant has been applied.
    let write_facts = writes.map(|w| (clock_bucket(&w.0), w)).join_map(
        clock,
        |_bucket, (user, slot, ts, msg, val), at| {
            (
                user.clone(),
                (
                    *slot,
                    FactVal::Write {
                        fresh: *ts >= *at,
                        ts: *ts,
                        msg: msg.clone(),
                        val: val.clone(),
                    },
                ),
            )
        },
    );

    let visible = plan.visible as u16;
    let user_out = facts.concat(write_facts).reduce_named(
        "events_by_user",
        move |user: &String, input, output| {
            // One record per membership interval: differential then diffs the old and new
            // intervals itself, so only intervals that moved flow downstream.
            let mut traits = Vec::new();
            let exposed = (!plan.exposed.is_empty()).then_some(&mut traits);
            for (seg, from, until) in plan.evaluate(user, input, exposed) {
                output.push((UserOut::Member(seg, from, until), 1isize));
            }
            for (k, v) in traits {
                output.push((UserOut::Trait(k, v), 1isize));
            }
        },
    );
    let memberships = user_out.clone().flat_map(|(user, o)| match o {
        UserOut::Member(seg, from, until) => Some((user, (seg, from, until))),
        UserOut::Trait(..) => None,
    });
    let all_changes = temporal(memberships, MembershipSplit).consolidate();
    let changes = all_changes.clone().filter(move |(seg, _)| *seg < visible);

    let journey_out = journeys.map(|set| {
        let traits = user_out.flat_map(|(user, o)| match o {
            UserOut::Trait(k, v) => Some((user, JIn::Trait(k, v))),
            UserOut::Member(..) => None,
        });
        let input = all_changes
            .map(|(seg, user)| (user, JIn::Member(seg)))
            .concat(traits)
            .concat(journey_events);
        let out = run_journeys(input, set);
        if let Some(feedback) = feedback {
            out.clone()
                .flat_map(|o| match o {
                    JOut::Write(ev, t) => Some((ev, t, 1isize)),
                    _ => None,
                })
                .connect_loop(feedback);
        }
        out
    });
    (
        SegmentInputs {
            events: events_in,
            facts: facts_in,
            clock: clock_in,
        },
        SegmentOutputs {
            changes,
            journeys: journey_out,
        },
    )
}
